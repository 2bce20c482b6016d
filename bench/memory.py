"""Memory of one self-play training step at Mistral-7B's width, measured on the CPU, extrapolated to
32 layers, and laid out per GPU for FSDP2 over 8 ranks.

    python bench/memory.py          # fp32 and autocast cells, LM head, FSDP2 on 2 ranks, the 8-GPU plan
    python bench/memory.py --precision fp32 --precision autocast --precision bf16   # + bf16 (wall times: README)
    python bench/memory.py --only step --precision bf16   # one part (--only step|head|fsdp), --layers 2
    torchrun --standalone --nproc_per_node 2 bench/memory.py --fsdp   # the FSDP2 cells alone, per-rank JSON
    python bench/memory.py --device cuda --only step --layers 2   # on a GPU (not yet run on one):
                                                                  # torch.cuda.max_memory_allocated
    python bench/memory.py --only step --precision lora   # the LoRA cells alone and the one-GPU table

The model has the 7B preset's shapes (d 4096, hidden 14336, 32 heads, 8 KV heads, V 32000) and 1 or
2 layers. The step is train.py's self-play micro-batch: 1 prompt with its real and 1 generated
response, 2 sequences x 1024 tokens (the last 512 of each scored), s(y) through
space.sequence_logprobs, space_loss, backward, RMSProp (the papers' optimizer). Precisions:
  fp32      fp32 weights and compute
  autocast  fp32 weights under bf16 autocast: train.py in one process. Skipped, with a message,
            unless the CPU has native bf16 (avx512_bf16 or amx_bf16), since emulated bf16 runs
            other kernels than a GPU does
  bf16      bf16 weights and activations, no autocast: what FSDP2's MixedPrecisionPolicy
            (param_dtype=bf16) computes on each GPU. Opt-in (--precision bf16; give --precision once
            per precision wanted) to keep the default run under 15 minutes; when present, the
            8-GPU plan takes its activations from it
  lora      train.py --lora 16 --bf16 in one process: the frozen base in bf16, rank-16 adapters on
            every projection (wq wk wv wo w1 w2 w3, lora.add_lora) in fp32 under bf16 autocast,
            RMSProp over the adapters alone. Opt-in (--precision lora), with checkpointing only; it
            adds the one-GPU table (7B on one 80, 48 or 24 GB GPU, with and without LoRA)
each with and without activation checkpointing (parallel.parallelize's checkpoint_wrapper per block).

Method. Each configuration runs in a fresh process. It builds the model and RMSProp and takes one
warm-up step on 2 x 16 tokens, so that the gradients and the optimizer state exist and one-off
library set-up is done; the gradients are then zeroed, not freed. The baseline is the resident
memory at that point (weights, gradients, optimizer state). Before each phase of the measured
step (forward with the loss, backward, optimizer step) the kernel's peak-RSS counter is reset by
writing 5 to /proc/self/clear_refs, and the phase's peak is VmHWM minus the baseline. glibc serves
every allocation over 1 MiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed blocks leave the process
and RSS is honest. "kept by forward" is VmRSS after the forward minus the baseline. A saved-tensor
hook also counts what autograd keeps for backward, each storage once, split into activations and
copies of weights (autocast's bf16 casts): exact and device-independent, except that blocks under
checkpointing hide their tensors from it.

Derived: per block = peak(2 layers) - peak(1 layer); fixed = peak(1 layer) - per block (embedding,
final norm, head, loss, the [V, d] head-gradient transient, and with checkpointing the one block
recomputed in backward); 32 layers = fixed + 32 x per block. The LM-head rows run the head and
loss alone on hidden [2, 1024, 4096] in fp32 and in bf16 tensors: sequence_logprobs against the
naive log_softmax over the full [2048, 32000] logits, each in a fresh process, peak above hidden,
the head and its (pre-allocated) gradient.

FSDP2 (issue 16 item 4): under torchrun on 2 gloo ranks, one core each, at 7B width with 2 layers,
sharded by parallel.parallelize (fully_shard per block, then the root; bf16 compute, fp32 reduce),
2 sequences x 32 tokens per micro-batch (the unsharded-gradient term does not depend on tokens).
After a warm-up step, three steps in turn: 1 micro-batch; 4 micro-batches reduce-scattered once
after the last (set_requires_gradient_sync(False) before it, as train.py does); 4 reduce-scattered
after each. Per rank: peak RSS above the resident memory before the step, and the bytes FSDP2 handed
to reduce-scatter and all-gather (counted by wrapping torch.distributed's reduce_scatter_single and
all_gather_single, which FSDP2 calls).

The 1-minute load average is printed before (other jobs) and after (which includes this benchmark's
own threads); other jobs stretch the times, not the memory. The total is printed as wall time and
as the children's CPU time (user + system), whose half is the wall time on 2 idle cores.
"""
import argparse
import json
import resource
import time
from dataclasses import replace

import torch
import torch.distributed as dist

import common
import parallel
from common import Meter, naive_logprobs
from lora import add_lora
from model import PRESETS, Transformer
from space import sequence_logprobs, space_loss

# -----------------------------------------------------------------------------
ARGS = PRESETS["mistral-7b"]
SEQ, PROMPT = 1024, 512           # tokens per sequence, of which prompt; the rest is scored
WARM_SEQ = 16                     # the warm-up step's sequence length
FSDP_SEQ, MICRO = 32, 4           # FSDP2 cells: tokens per sequence, micro-batches per step
FSDP_CELLS = [(1, "last"), (MICRO, "last"), (MICRO, "every")]
RANKS, LAYERS = 8, ARGS.n_layers  # the paper's run: 8 GPUs, 32 layers
PRECISIONS = {"fp32": (torch.float32, False), "autocast": (torch.float32, True), "bf16": (torch.bfloat16, False),
              "lora": (torch.bfloat16, True)}
LORA_R = 16                       # the lora cells' rank (α = 2r); every projection adapted
MB, GB = 1e6, 1e9
# -----------------------------------------------------------------------------

BLOCK_PARAMS = (ARGS.dim * ARGS.head_dim * 2 * (ARGS.n_heads + ARGS.n_kv_heads)   # wq, wo, wk, wv
                + 3 * ARGS.dim * ARGS.hidden_dim + 2 * ARGS.dim)                  # w1, w2, w3, norms
ROOT_PARAMS = 2 * ARGS.vocab_size * ARGS.dim + ARGS.dim                             # embedding, head, norm
PARAMS = LAYERS * BLOCK_PARAMS + ROOT_PARAMS                                        # 7,241,732,096
KV = ARGS.n_kv_heads * ARGS.head_dim
LORA_PARAMS = LAYERS * LORA_R * (2 * (ARGS.dim + ARGS.n_heads * ARGS.head_dim) + 2 * (ARGS.dim + KV)
                                 + 3 * (ARGS.dim + ARGS.hidden_dim))                # r (in + out) per projection


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """What autograd keeps for backward, each storage once: copies of weights (autocast's bf16
    casts, found by walking views and casts back to a parameter) apart from activations. The
    weights themselves are baseline and not counted."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen = {}
        super().__init__(self.pack, lambda t: t)

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.seen and ptr not in self.params:
            fn = t.grad_fn
            while fn is not None and type(fn).__name__ in ("TBackward0", "ViewBackward0", "ToCopyBackward0"):
                fn = fn.next_functions[0][0]
            kind = "weights" if type(fn).__name__ == "AccumulateGrad" else "activations"
            self.seen[ptr] = (kind, t.untyped_storage().nbytes())
        return t

    def total(self, kind):
        return sum(n for k, n in self.seen.values() if k == kind)


def make_batch(seq, prompt, device):
    """One prompt's real and generated response: tokens, targets, mask, each [2, seq]."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(ARGS.vocab_size, (2, seq + 1), generator=g)
    mask = torch.zeros(2, seq, dtype=torch.bool)
    mask[:, prompt:] = True                                        # the response positions are scored
    return ids[:, :-1].to(device), ids[:, 1:].to(device), mask.to(device)


def self_play_loss(model, batch, use_autocast, device):
    """SPACE's loss (K = μ = 1) on one prompt through the fused log-probs, as train.micro_loss does."""
    tokens, targets, mask = batch
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
        hidden = model(tokens, return_hidden=True)                               # [2, T, d]
        s = sequence_logprobs(hidden, model.output.weight, targets, mask)        # [2]: real, generated
        ref = torch.zeros(2, device=device)   # θ_t's scores: their values cost no memory
        return space_loss(s[:1], s[1:].view(1, 1), ref[:1], ref[1:].view(1, 1))

# -----------------------------------------------------------------------------
# The measurements, each in a fresh process


def measure_step(precision, ac, layers, device):
    """One training step of a `layers`-layer model at 7B width: bytes above weights, grads and state."""
    torch.manual_seed(0)
    dtype, use_autocast = PRECISIONS[precision]
    model = Transformer(replace(ARGS, n_layers=layers)).to(device=device, dtype=dtype)
    if precision == "lora":  # the base frozen in bf16, fp32 adapters: only they have gradients and state
        add_lora(model, LORA_R, 2 * LORA_R)
    model = parallel.parallelize(model, 1, activation_checkpointing=ac)
    opt = torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=1e-7)
    self_play_loss(model, make_batch(WARM_SEQ, WARM_SEQ // 2, device), use_autocast, device).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)                               # the gradients stay: baseline
    batch = make_batch(SEQ, PROMPT, device)
    meter, saved, out = Meter(device), SavedBytes(model), {}
    out["base"] = base = meter.now()
    t0 = time.perf_counter()
    for phase in ("forward", "backward", "optimizer"):
        meter.reset()
        if phase == "forward":
            with saved:
                loss = self_play_loss(model, batch, use_autocast, device)
            out["kept"] = meter.now() - base                       # what forward leaves for backward
        elif phase == "backward":
            loss.backward()
        else:
            opt.step()
        out[phase] = meter.peak() - base
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {**out, "saved_act": saved.total("activations"), "saved_w": saved.total("weights"),
            "seconds": time.perf_counter() - t0}


def measure_head(variant, dtype_name):
    """The LM head and SPACE's loss alone: peak bytes above hidden, the head and its gradient."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    fn = sequence_logprobs if variant == "space" else naive_logprobs
    torch.manual_seed(0)
    weight = (torch.randn(ARGS.vocab_size, ARGS.dim) * ARGS.dim**-0.5).to(dtype).requires_grad_()  # [V, d]
    meter = Meter(torch.device("cpu"))

    def step(seq, prompt):
        hidden = torch.randn(2, seq, ARGS.dim, dtype=dtype).requires_grad_()     # [2, T, d]
        _, targets, mask = make_batch(seq, prompt, torch.device("cpu"))
        meter.reset()
        base = meter.now()
        s = fn(hidden, weight, targets, mask)                                    # [2]
        zero = torch.zeros(1)
        space_loss(s[:1], s[1:].view(1, 1), zero, zero.view(1, 1)).backward()
        return meter.peak() - base

    step(WARM_SEQ, WARM_SEQ // 2)                                  # warm-up; weight.grad now exists
    weight.grad.zero_()
    t0 = time.perf_counter()
    return {"peak": step(SEQ, PROMPT), "seconds": time.perf_counter() - t0}


def measure_fsdp():
    """Under torchrun: the FSDP_CELLS steps in turn; rank 0 prints every rank's figures as JSON."""
    dist.init_process_group("gloo")
    rank, world, device = dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    torch.manual_seed(0)
    model = Transformer(replace(ARGS, n_layers=2))
    model = parallel.parallelize(model, world, bf16=True)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-7)
    sent = {}

    def counted(name, fn, pos, key):                               # FSDP2 calls these through `dist.`
        def wrapper(*a, **k):
            t = a[pos] if len(a) > pos else k[key]
            sent[name] = sent.get(name, 0) + t.numel() * t.element_size()
            return fn(*a, **k)
        return wrapper
    dist.reduce_scatter_single = counted("rs_bytes", dist.reduce_scatter_single, 1, "input")
    dist.all_gather_single = counted("ag_bytes", dist.all_gather_single, 0, "output_tensor")

    def step(n, every, batch, base=0):
        """Returns the most memory held between backward passes: the gradients as they wait."""
        held = 0
        for i in range(n):
            model.set_requires_gradient_sync(every or i == n - 1)
            (self_play_loss(model, batch, False, device) / n).backward()
            held = max(held, meter.now() - base)
        opt.step()
        opt.zero_grad(set_to_none=True)                            # as train.py: sharded grads freed
        return held

    meter, results = Meter(device), {}
    step(1, True, make_batch(WARM_SEQ, WARM_SEQ // 2, device))     # warm-up: optimizer state exists
    for micro, sync in FSDP_CELLS:
        dist.barrier()
        sent.clear()
        base = meter.now()
        meter.reset()
        t0 = time.perf_counter()
        held = step(micro, sync == "every", make_batch(FSDP_SEQ, FSDP_SEQ // 2, device), base)
        results[f"{micro} {sync}"] = {"base": base, "peak": meter.peak() - base, "held": held,
                                      "seconds": time.perf_counter() - t0, **sent}
    everyone = [None] * world
    dist.all_gather_object(everyone, results)
    if rank == 0:
        print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "ranks": everyone}))
    dist.destroy_process_group()

# -----------------------------------------------------------------------------
# The parent: run the cells, derive, print


def child(cmd, torchrun=False):
    """Run this file again in fresh process(es) (2 gloo ranks under torchrun) and return the JSON of its last line."""
    return common.run_child([__file__, *cmd], mmap=True, nproc=2 if torchrun else 0)


def step_tables(cells, device):
    """The cells, then per block / fixed / 32 layers. Returns the derived figures in bytes."""
    tokens = 2 * SEQ
    print(f"\n### One step at 7B width, measured ({device}); MB above weights, gradients and RMSProp state\n")
    print("| precision | ckpt | layers | baseline | kept by forward | peak fwd | peak bwd | peak opt step "
          "| saved: activations | saved: weight copies | step s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (p, ac, n), c in cells.items():
        print(f"| {p} | {'yes' if ac else 'no'} | {n} | {c['base'] / MB:.0f} | {c['kept'] / MB:.0f} "
              f"| {c['forward'] / MB:.0f} | {c['backward'] / MB:.0f} | {c['optimizer'] / MB:.0f} "
              f"| {c['saved_act'] / MB:.0f} | {c['saved_w'] / MB:.0f} | {c['seconds']:.0f} |")
    derived = {}
    print(f"\n### Per block and fixed (2 layers minus 1, measured), {LAYERS} layers (extrapolated)\n")
    print(f"| precision | ckpt | per block: peak MB | per block: kept by forward MB | of which weight copies MB "
          f"| activations per token per block | fixed: peak MB | {LAYERS} layers: peak GB |")
    print("|---|---|---|---|---|---|---|---|")
    for (p, ac, n), two in cells.items():
        if n != 2 or (p, ac, 1) not in cells:
            continue
        one = cells[(p, ac, 1)]
        peak1, peak2 = (max(c["forward"], c["backward"]) for c in (one, two))
        block, kept, copies = peak2 - peak1, two["kept"] - one["kept"], two["saved_w"] - one["saved_w"]
        fixed = peak1 - block
        d = derived[(p, ac)] = {"block": block, "kept": kept, "copies": copies, "fixed": fixed,
                                "total": fixed + LAYERS * block}
        per_token = (kept - copies) / tokens
        print(f"| {p} | {'yes' if ac else 'no'} | {block / MB:.0f} | {kept / MB:.0f} | {copies / MB:.0f} "
              f"| {per_token / 1e3:.0f} KB = {per_token / 2 / 1e3:.0f}k bf16 values | {fixed / MB:.0f} "
              f"| {d['total'] / GB:.1f} |")
    print()
    for p in PRECISIONS:
        if (p, False) in derived and (p, True) in derived:
            a, b = derived[(p, False)], derived[(p, True)]
            print(f"{p}: checkpointing makes the per-block figure {a['block'] / b['block']:.0f}x smaller "
                  f"({a['block'] / MB:.0f} -> {b['block'] / MB:.0f} MB), the {LAYERS}-layer peak "
                  f"{a['total'] / GB:.1f} -> {b['total'] / GB:.1f} GB")
    return derived


def head_table(heads):
    print(f"\n### LM head and loss alone, measured: hidden [2, {SEQ}, {ARGS.dim}], V = {ARGS.vocab_size}, "
          f"{2 * (SEQ - PROMPT)} of {2 * SEQ} tokens scored; MB above hidden, the head and its gradient\n")
    print("| path | dtype | peak MB | of which the [V, d] gradient before it is added to .grad | the rest | s |")
    print("|---|---|---|---|---|---|")
    for (v, dt), c in heads.items():
        grad = ARGS.vocab_size * ARGS.dim * (4 if dt == "fp32" else 2)
        name = "space.sequence_logprobs" if v == "space" else f"naive log_softmax over [{2 * SEQ}, {ARGS.vocab_size}]"
        print(f"| {name} | {dt} | {c['peak'] / MB:.0f} | {grad / MB:.0f} | {(c['peak'] - grad) / MB:.0f} "
              f"| {c['seconds']:.0f} |")


def fsdp_table(out):
    """Per rank, the three FSDP2 steps; returns the accumulation term in bytes and its arithmetic."""
    P, world = out["params"], len(out["ranks"])
    print(f"\n### FSDP2 on {world} gloo ranks, 7B width, 2 layers ({P / 1e6:.0f} M parameters), 2 x {FSDP_SEQ} "
          "tokens per micro-batch, measured: per rank, MB above the resident memory before the step\n")
    print("| micro-batches | reduce-scatter | rank | before the step | held after a backward | peak "
          "| reduce-scattered GB (x fp32 model) | all-gathered GB | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for micro, sync in FSDP_CELLS:
        for r, ranks in enumerate(out["ranks"]):
            c = ranks[f"{micro} {sync}"]
            print(f"| {micro} | {'after each' if sync == 'every' else 'after the last'} | {r} | {c['base'] / MB:.0f} "
                  f"| {c['held'] / MB:.0f} | {c['peak'] / MB:.0f} | {c['rs_bytes'] / GB:.2f} ({c['rs_bytes'] / (4 * P):.2f}) "
                  f"| {c['ag_bytes'] / GB:.2f} | {c['seconds']:.0f} |")
    cell = {k: max((r[f"{k[0]} {k[1]}"] for r in out["ranks"]), key=lambda c: c["peak"]) for k in FSDP_CELLS}
    acc, every, one = cell[(MICRO, "last")], cell[(MICRO, "every")], cell[(1, "last")]
    print(f"\nHeld between micro-batches: accumulated {acc['held'] / MB:.0f} MB (arithmetic, unsharded fp32 "
          f"gradients 4 B x P = {4 * P / MB:.0f} MB), reduce-scattered each time {every['held'] / MB:.0f} MB "
          f"(sharded, 4 B x P / {world} = {4 * P / world / MB:.0f} MB). Peak over 1 micro-batch: accumulated "
          f"{(acc['peak'] - one['peak']) / MB:+.0f} MB, reduce-scattered each time {(every['peak'] - one['peak']) / MB:+.0f} MB.")
    return {"held": acc["held"], "P": P}


def plan_table(derived, fsdp):
    """Per GPU under FSDP2 over 8 ranks, next to the README's arithmetic."""
    src = next(p for p in ("bf16", "autocast", "fp32") if (p, True) in derived and (p, False) in derived)
    shard, gathered = 4 * PARAMS / RANKS, (2 * BLOCK_PARAMS + ROOT_PARAMS) * 2
    reduce_buf = BLOCK_PARAMS * (2 + 4)             # a block's unsharded bf16 grads + their fp32 reduce-scatter input
    accumulated = 4 * PARAMS                        # unsharded fp32 grads kept across micro-batches
    state = 3 * shard + gathered

    def act(ac):
        d = derived[(src, ac)]
        if src == "bf16":
            return d["total"], f"M: bf16, {d['fixed'] / MB:.0f} MB + {LAYERS} x {d['block'] / MB:.0f} MB"
        # autocast keeps fp32 residuals and bf16 weight copies that FSDP2 has not: an upper bound
        total = d["total"] - LAYERS * d["copies"]
        return total, (f"M: {src} minus its weight copies, {d['fixed'] / MB:.0f} MB + {LAYERS} x "
                       f"{(d['block'] - d['copies']) / MB:.0f} MB; an upper bound (fp32 residual stream)")
    print(f"\n### Per GPU: FSDP2 over {RANKS} ranks, {PARAMS / 1e9:.2f} B parameters, bf16 compute, 1 prompt per "
          f"micro-batch (M = measured on the CPU and extrapolated, A = arithmetic)\n")
    print("| what | GB | how | README (arithmetic) |")
    print("|---|---|---|---|")
    rows = [("fp32 weights, sharded", shard, "A: 4 B x P / 8", "3.6"),
            ("fp32 gradients, sharded", shard, "A: 4 B x P / 8", "3.6"),
            ("RMSProp state, sharded", shard, "A: 4 B x P / 8", "3.6"),
            ("bf16 weights gathered: 2 blocks + the root", gathered, "A: (2 x 218 M + 262 M) x 2 B", "1.4")]
    act_ckpt, how_ckpt = act(True)
    act_full, how_full = act(False)
    rows += [("activations and step transients, no checkpointing", act_full, how_full, "10.5"),
             ("activations and step transients, checkpointing", act_ckpt, how_ckpt, "0.9 + head < 0.02"),
             ("one block's reduce-scatter: bf16 gradients + fp32 input", reduce_buf, "A: 218 M x 6 B", "not listed")]
    if fsdp:
        rows.append(("unsharded fp32 gradients held across micro-batches (train.py now), in place of the "
                     "sharded ones", accumulated, f"A: 4 B x P; the 2-rank run held {fsdp['held'] / (4 * fsdp['P']):.2f}x "
                     "its 4 B x P", "not listed"))
    for name, b, how, readme in rows:
        print(f"| {name} | {b / GB:.1f} | {how} | {readme} |")
    ckpt = state + act_ckpt + reduce_buf
    print(f"| **peak, checkpointing, reduce-scatter every micro-batch** | **{ckpt / GB:.1f}** | sum | 13 |")
    print(f"| **peak, checkpointing, accumulated as train.py does** | **{(ckpt - shard + accumulated) / GB:.1f}** "
          f"| sum | 13 |")
    print(f"| **peak, no checkpointing, reduce-scatter every micro-batch** | **{(state + act_full + reduce_buf) / GB:.1f}** "
          f"| sum | 23 |")
    micro = 64 // RANKS                             # the paper preset: 64 prompts, 1 per micro-batch
    gather = 2 * (2 * LAYERS * BLOCK_PARAMS + ROOT_PARAMS)
    print(f"\nCommunication per optimizer step and rank (A), with the paper preset's {micro} micro-batches: all-gather "
          f"{micro} x {gather / GB:.1f} GB = {micro * gather / GB:.0f} GB either way (bf16; blocks gathered in forward and "
          f"again in backward); reduce-scatter input {4 * PARAMS / GB:.0f} GB accumulated, {micro} x {4 * PARAMS / GB:.0f} = "
          f"{micro * 4 * PARAMS / GB:.0f} GB reduce-scattered each time (fp32). A ring moves 7/8 of each.")
    print(f"\nNot in the sums (A, GPU only): NCCL buffers, the caching allocator's fragmentation, RMSProp's foreach "
          f"sqrt on CUDA (one more state shard, {shard / GB:.1f} GB, at the optimizer step, when activations are gone), "
          f"and generation (README: bf16 θ_t 14.5 GB + KV cache 6.3 GB).")


def one_gpu_table(derived):
    """7B on one GPU, with and without LoRA: what training and generation hold (bytes on the GPU)."""
    lora_act = derived[("lora", True)]["total"]
    full = next((p for p in ("autocast", "fp32") if (p, True) in derived), None)
    full_act = derived[(full, True)]["total"] if full else None
    kv = 64 * (PROMPT + 256) * 2 * LAYERS * KV * 2   # paper preset: 64 prompts x (512 + 256) tokens, bf16 K and V
    rows = [
        ("full fine-tuning, RMSProp (fp32 weights, gradients, one moment: 12 B x P)", 12 * PARAMS, full_act, full),
        ("full fine-tuning, AdamW (two moments: 16 B x P)", 16 * PARAMS, full_act, full),
        (f"LoRA r = {LORA_R} on every projection, RMSProp: bf16 base 2 B x P + fp32 adapters, gradients, "
         f"state ({LORA_PARAMS / 1e6:.0f} M x 12 B)", 2 * PARAMS + 12 * LORA_PARAMS, lora_act, "lora"),
        (f"LoRA r = {LORA_R}, AdamW ({LORA_PARAMS / 1e6:.0f} M x 16 B)", 2 * PARAMS + 16 * LORA_PARAMS, lora_act, "lora"),
    ]
    print(f"\n### 7B on one GPU, activation checkpointing, 1 prompt per micro-batch (A: arithmetic; M: activations "
          f"measured here at 1 and 2 layers, extrapolated to {LAYERS})\n")
    print("| training | weights + gradients + state GB | activations GB | total GB | 80 GB | 48 GB | 24 GB |")
    print("|---|---|---|---|---|---|---|")
    for name, state, act, src in rows:
        if act is None:
            print(f"| {name} | {state / GB:.1f} (A) | not measured in this run | > {state / GB:.0f} "
                  + "| " + " | ".join("no" if state > c * GB else "?" for c in (80, 48, 24)) + " |")
            continue
        total = state + act
        print(f"| {name} | {state / GB:.1f} (A) | {act / GB:.1f} (M, {src}) | {total / GB:.1f} | "
              + " | ".join("fits" if total < c * GB else "no" for c in (80, 48, 24)) + " |")
    gen = 2 * PARAMS + kv
    print(f"\nGeneration on one GPU (A): θ_t whole in bf16 ({2 * PARAMS / GB:.1f} GB, the adapter merged) + the KV "
          f"cache of 64 prompts x 768 tokens ({kv / GB:.1f} GB: {2 * LAYERS * KV * 2 / 1e3:.0f} KB a token) = "
          f"{gen / GB:.1f} GB. With LoRA the bf16 base is θ_t itself, so that is all the GPU holds (the fp32 master, "
          f"{4 * PARAMS / GB:.0f} GB, stays in host memory); full fine-tuning in one process also keeps its fp32 "
          f"weights on the GPU: {(4 * PARAMS + gen) / GB:.1f} GB.")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["step", "head", "fsdp"], action="append", help="run only these parts")
    ap.add_argument("--precision", choices=list(PRECISIONS), action="append",
                    help="the step cells' precisions (default: fp32 and autocast)")
    ap.add_argument("--layers", type=int, choices=[1, 2], action="append", help="default: 1 and 2")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the step cells on a GPU")
    ap.add_argument("--step", nargs=3, metavar=("PRECISION", "CKPT", "LAYERS"), help=argparse.SUPPRESS)
    ap.add_argument("--head", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    ap.add_argument("--fsdp", action="store_true", help="the FSDP2 cells (run under torchrun)")
    args = ap.parse_args()
    if args.step:
        p, ac, n = args.step
        return print(json.dumps(measure_step(p, ac == "1", int(n), torch.device(args.device))))
    if args.head:
        return print(json.dumps(measure_head(*args.head)))
    if args.fsdp:
        return measure_fsdp()

    t_start = time.time()
    parts = args.only or ["step", "head", "fsdp"]
    precisions = sorted(set(args.precision or ["fp32", "autocast"]), key=list(PRECISIONS).index)
    cpu_bf16 = (common.native_bf16() or [None])[0]
    flag = cpu_bf16 if args.device == "cpu" else args.device
    if flag is None:
        print(f"skipped {', '.join(p for p in precisions if p != 'fp32')} and the bf16 head rows: this CPU has no "
              "native bf16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo), and emulated bf16 runs other kernels")
        precisions = ["fp32"]
    print(f"Mistral-7B width (d {ARGS.dim}, hidden {ARGS.hidden_dim}, {ARGS.n_heads} heads, {ARGS.n_kv_heads} KV heads, "
          f"V {ARGS.vocab_size}); torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {flag}; "
          f"load average before: {common.load_avg()}", flush=True)
    derived, fsdp = {}, None
    if "step" in parts:
        cells = {}
        for p in precisions:
            for ac in (True,) if p == "lora" else (False, True):
                for n in sorted(args.layers or [1, 2]):
                    cells[(p, ac, n)] = child(["--step", p, str(int(ac)), str(n), "--device", args.device])
        derived = step_tables(cells, args.device)
    if "head" in parts:
        heads = {(v, dt): child(["--head", v, dt]) for dt in (["fp32", "bf16"] if cpu_bf16 else ["fp32"])
                 for v in ("naive", "space")}
        head_table(heads)
    if "fsdp" in parts:
        fsdp = fsdp_table(child(["--fsdp"], torchrun=True))
    if any((p, True) in derived and (p, False) in derived for p in PRECISIONS):
        plan_table(derived, fsdp)
    if ("lora", True) in derived:
        one_gpu_table(derived)
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"\ntotal {time.time() - t_start:.0f} s wall, {cpu.ru_utime + cpu.ru_stime:.0f} s CPU in the children; "
          f"load average after: {common.load_avg()} (this includes the benchmark's own threads)")


if __name__ == "__main__":
    main()
