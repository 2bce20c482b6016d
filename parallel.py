"""
How train.py's one loop runs on many GPUs, and on one: the process group, FSDP2 (or HSDP across
nodes), decisions made once by rank 0, and θ_t gathered whole for generation.

    rank, world, device, mesh = setup_distributed(shard_size, timeout_minutes)   # one process, or under torchrun
    model = parallelize(model, world, mesh, bf16=True, activation_checkpointing=True)  # fully_shard per block
    value = from_rank0(lambda: ...)                         # rank 0 decides, every rank follows
    batch = to_device(host_tensor, device)                  # host -> device, asynchronous on a GPU

The same code runs as one process (no process group, no sharding: `python train.py`) or under
torchrun (`torchrun --nproc_per_node 8 train.py ...`: nccl on GPUs, gloo on CPUs).
"""
import datetime
import os
import time

import torch
import torch.distributed as dist

from model import Transformer

# -----------------------------------------------------------------------------
# The process group and the mesh


def setup_distributed(shard_size=0, timeout_minutes=60.0):
    """(rank, world, device, mesh). mesh is None for one process, a 1-D mesh for FSDP, or a 2-D
    (replicate, shard) mesh for HSDP when shard_size (ranks per shard group, 0: all) is below the world
    size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return 0, 1, device, None
    # device_id binds the process group to this rank's GPU up front. The timeout is how long a rank
    # waits in a collective: NCCL's default 10 minutes is shorter than rank 0's export of a 14.5 GB
    # checkpoint, or than one rank's generation outlasting another's.
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    from torch.distributed.device_mesh import init_device_mesh
    shard = shard_size or world
    if world % shard:
        raise SystemExit(f"--shard-size {shard} does not divide the {world} ranks")
    if shard == world:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    else:  # HSDP: all-gather and reduce-scatter within a node, one all-reduce across nodes
        mesh = init_device_mesh(device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))
    return dist.get_rank(), world, device, mesh


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host batch -> device. On a GPU through pinned memory, so the copy runs asynchronously and the
    host goes on preparing the next batch instead of waiting for it."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def print0(*a):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(values, device) -> list[float]:
    """Sum numbers (floats or 0-d tensors) over the ranks, in fp64 so the sum does not depend on how
    the work was split. One read-back to the host for all of them."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# -----------------------------------------------------------------------------
# Rank 0 decides, every rank follows


def from_rank0(fn):
    """fn() evaluated on rank 0 only and handed to every rank. Decisions that read the filesystem
    (is there a checkpoint? which parts exist?) are made once, so ranks on different nodes cannot
    disagree and split, and data read once is not read again by every rank."""
    value = [fn() if not dist.is_initialized() or dist.get_rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(value, src=0)
    return value[0]


def check_shared_out(out, rank, world):
    """Across nodes OUT must be one filesystem: checkpoints, generation parts and the demo tokenizer are
    written by one rank and read by the others. Rank 0 writes a fresh token; a rank that cannot read
    it back stops the run now, with the reason, instead of hanging later in a collective."""
    if world == 1:
        return
    path = os.path.join(out, ".shared-fs-check")

    def write():
        token = f"{os.getpid()}-{time.time_ns()}"
        with open(path, "w") as f:
            f.write(token)
        return token
    token = from_rank0(write)
    try:
        with open(path) as f:
            seen = f.read() == token
    except OSError:
        seen = False
    everyone = [None] * world
    dist.all_gather_object(everyone, seen)
    blind = [r for r, ok in enumerate(everyone) if not ok]
    if blind:
        raise SystemExit(f"ranks {blind} cannot read {path}, which rank 0 just wrote: --out must be on a "
                         "filesystem shared by every node (checkpoints, self-play parts and the tokenizer are "
                         "written by one rank and read by the others)")


# -----------------------------------------------------------------------------
# Sharding, and gathering back


def parallelize(model, world, mesh=None, bf16=False, activation_checkpointing=False):
    """FSDP2, as torchtitan applies it: optional activation checkpointing, fully_shard per block, then
    the root. The root keeps its weights gathered after forward because the loss uses output.weight
    (the fused log-prob takes hidden states and the head's weight) outside the forward call. On a 2-D
    mesh fully_shard is HSDP: sharded along "shard", replicated along "replicate". bf16: FSDP computes
    in bf16 and reduces gradients in fp32 (one process autocasts instead: train.autocast)."""
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    if world == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def frozen_copy(model, dtype, device) -> Transformer:
    """The full weights gathered onto every rank as a plain, unsharded Transformer in eval mode.
    Generation runs a different number of forward passes on each rank, which sharded weights (one
    collective per block per pass) would deadlock on."""
    state = {}
    for name, t in model.state_dict().items():  # under FSDP, shards: gather one tensor at a time
        if ".lora_" in name:
            continue  # --lora: θ_t is the base; a fresh adapter (B = 0) adds nothing to it
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        state[name] = t.to(device=device, dtype=dtype, copy=True)
    with torch.device("meta"):
        copy = Transformer(model.args)
    copy.load_state_dict(state, assign=True)
    if copy.args.tie_embeddings:
        copy.output.weight = copy.tok_embeddings.weight
    return copy.eval().requires_grad_(False)


