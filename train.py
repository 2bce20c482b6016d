"""
Self-play fine-tuning, one loop from SFT through T self-play iterations: SPACE (Wang et al., NeurIPS
2025) by default, SPIN (Chen et al., ICML 2024) and its self-play IPO / SimPO baselines, or plain SFT
and GEM continued on the same data as controls.

    python train.py                                      # the built-in demo on a CPU (a few minutes)
    python train.py --preset smoke                       # the demo shrunk to under a minute (tests)
    torchrun --nproc_per_node 2 train.py --preset smoke  # the same on 2 processes: FSDP2 over gloo
    python train.py --out out/demo --resume              # continue a killed run where it stopped
    torchrun --nproc_per_node 8 train.py --preset paper --model zephyr-7b-sft-full \\
        --data ultrachat_50k.jsonl --method space --out runs/space   # the paper's recipe (README)

The algorithm (both papers' Algorithm 1). θ_0 is the SFT model (trained here from scratch for the
demo, or loaded with --model). For t = 0 .. T-1:
  1. θ_t, frozen: every rank samples K responses y' for its share of the prompts, and scores the
     real and the generated responses once, s_θt(y|x). The samples and scores go to OUT/iter_t/
     selfplay.jsonl, so no second model is kept in memory while training.
  2. θ is trained from θ_t for E epochs on the loss of --method, with r(y) = s_θ(y|x) − s_θt(y|x).
  3. θ_{t+1} ← θ, exported to OUT/iter_{t+1}/ in the Hugging Face layout.
Before each iteration and after the last, θ_t is evaluated on held-out prompts (greedy exact match
on the demo task, and the mean log-likelihood of the held-out real responses).

Every --ckpt-every steps the full state (weights, optimizer, step, iteration, phase, RNG and the
metrics file's length) is written with torch.distributed.checkpoint; --resume continues from it and
ends where an uninterrupted run ends. A NaN or inf loss stops the run before the optimizer step,
so the last checkpoint stays good.
"""
import argparse
import json
import math
import os
import shutil
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from tqdm import tqdm

import data
from model import ModelArgs, Transformer, load_model, save_model
from sample import generate
from space import (gem_loss, ipo_loss, reward_metrics, sequence_logprobs, sft_loss, simpo_loss,
                   space_loss, spin_loss)

# -----------------------------------------------------------------------------
# Presets: every flag's default. A flag given on the command line wins.

DEMO = dict(
    # a tiny Mistral trained from scratch on the generated task (data.demo_splits)
    model_config=dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=384,
                      sliding_window=48, max_seq_len=128),
    n_train=6000, n_selfplay=1500, n_test=300, vocab_size=320,
    sft_epochs=4, sft_lr=2e-3, sft_batch_size=64,
    iterations=3, epochs=1, lr=5e-5, batch_size=32, micro_batch_size=32, samples_per_prompt=1,
    optimizer="adamw", warmup=0.1, decay="linear", max_prompt=48, max_length=80, max_new_tokens=24,
    temperature=1.0, top_p=1.0, gen_batch=256, ckpt_every=50, log_every=10, bf16=False,
)
PRESETS = {
    "demo": DEMO,
    "smoke": {**DEMO, "model_config": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                                           hidden_dim=160, sliding_window=16, max_seq_len=128),
              "n_train": 768, "n_selfplay": 64, "n_test": 32, "sft_epochs": 2, "iterations": 2, "epochs": 2,
              "batch_size": 16, "micro_batch_size": 8, "sft_batch_size": 32, "gen_batch": 32,
              "ckpt_every": 4, "log_every": 2},
    # SPIN / SPACE at paper scale: zephyr-7b-sft-full or Mistral-7B, 50k UltraChat prompts, 8 GPUs
    "paper": {**DEMO, "iterations": 5, "epochs": 2, "lr": 5e-7, "late_lr": 1e-7, "optimizer": "rmsprop", "batch_size": 64,
              "micro_batch_size": 1, "max_prompt": 512, "max_length": 1024, "max_new_tokens": 256,
              "gen_batch": 64, "n_test": 500, "ckpt_every": 100, "log_every": 10, "bf16": True,
              "activation_checkpointing": True, "mu": 1.0},
}
BETA = {"space": 1.0, "spin": 0.1, "ipo": 0.1, "simpo": 2.0, "gem": 0.7, "sft": None}  # each paper's default
SELF_PLAY = ("space", "spin", "ipo", "simpo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="demo", help="defaults for every flag below")
    p.add_argument("--model", help="HF or Mistral checkpoint folder to start self-play from (else SFT from scratch)")
    p.add_argument("--data", help="chat JSONL for self-play (else the built-in demo task)")
    p.add_argument("--eval-data", help="chat JSONL of held-out conversations (default: the last --n-test of --data)")
    p.add_argument("--tokenizer", help="sentencepiece model (default: MODEL/tokenizer.model, or one trained on the demo)")
    p.add_argument("--out", default="out/demo", help="run folder: metrics.jsonl, ckpt/, iter_k/")
    p.add_argument("--method", choices=list(BETA), default="space", help="the loss of the iterations")
    p.add_argument("--iterations", type=int, help="self-play iterations T")
    p.add_argument("--samples-per-prompt", type=int, help="K generated responses per prompt")
    p.add_argument("--mu", type=float, help="SPACE's noise ratio μ (default K)")
    p.add_argument("--beta", type=float, help="β (default: the method's paper value)")
    p.add_argument("--gamma", type=float, default=0.5, help="S-SimPO's margin γ")
    p.add_argument("--spin-kind", choices=["sigmoid", "hinge"], default="sigmoid", help="SPIN's loss ℓ")
    p.add_argument("--lr", type=float, help="peak learning rate of the iterations")
    p.add_argument("--late-lr", type=float, help="peak learning rate from iteration 2 on (SPIN: 1e-7 after 5e-7)")
    p.add_argument("--epochs", type=int, help="epochs per iteration")
    p.add_argument("--batch-size", type=int, help="global batch, in prompts (each with its real and K generated)")
    p.add_argument("--micro-batch-size", type=int, help="prompts per forward pass on one rank (gradient accumulation)")
    p.add_argument("--optimizer", choices=["adamw", "rmsprop"], help="SPIN and SPACE use RMSProp")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=float, help="fraction of each phase's steps spent warming up")
    p.add_argument("--decay", choices=["linear", "cosine", "constant"], help="learning-rate decay after warmup")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--selfplay-size", dest="n_selfplay", type=int, help="demo: prompts in the self-play set")
    p.add_argument("--max-prompt", type=int, help="keep the last tokens of longer prompts (SPIN's rule)")
    p.add_argument("--max-length", type=int, help="prompt + response tokens; longer responses are cut")
    p.add_argument("--max-new-tokens", type=int, help="generation length limit")
    p.add_argument("--temperature", type=float, help="sampling temperature of the self-play responses")
    p.add_argument("--top-p", type=float, help="nucleus sampling of the self-play responses")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 compute (FSDP mixed precision or autocast)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute each block's activations in backward")
    p.add_argument("--ckpt-every", type=int, help="steps between resume checkpoints")
    p.add_argument("--log-every", type=int, help="steps between metrics.jsonl lines")
    p.add_argument("--seed", type=int, default=0, help="model init, batch order and sampling")
    p.add_argument("--data-seed", type=int, default=0, help="demo: which problems make up the splits")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt")
    p.add_argument("--inject-nan-step", type=int, default=-1, help=argparse.SUPPRESS)  # tests: NaN loss at this step
    args, _ = p.parse_known_args(argv)
    p.set_defaults(**PRESETS[args.preset])
    args = p.parse_args(argv)
    if args.beta is None:
        args.beta = BETA[args.method]
    return args

# -----------------------------------------------------------------------------
# Distributed plumbing: the same code runs as one process or under torchrun


def setup_distributed():
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def print0(*a):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(values: list[float], device) -> list[float]:
    """Sum a few numbers over the ranks (in fp64, so the sum does not depend on how work was split)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def map_chunks(items, chunk, fn, rank, world, desc):
    """fn(c, items of chunk c) for every chunk, chunk c on rank c % world; every rank gets all results
    in order. A chunk carries its own seed (see self_play_round), so results do not depend on the
    number of ranks."""
    chunks = [(c, items[i:i + chunk]) for c, i in enumerate(range(0, len(items), chunk))]
    mine = [(c, fn(c, part)) for c, part in tqdm(chunks[rank::world], desc=desc, disable=rank != 0, leave=False)]
    if dist.is_initialized():
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        mine = [x for r in everyone for x in r]
    return [y for _, ys in sorted(mine, key=lambda cy: cy[0]) for y in ys]


def parallelize(model, cfg, world, device):
    """FSDP2, as torchtitan applies it: optional activation checkpointing, fully_shard per block, then
    the root. The root keeps its weights gathered after forward because the loss uses output.weight
    (the fused log-prob takes hidden states and the head's weight) outside the forward call."""
    if cfg.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    if world == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cfg.bf16 else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    return model


def autocast(cfg, device):
    """bf16 autocast for a single process; under FSDP the mixed-precision policy casts instead."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(cfg.bf16) and not dist.is_initialized())


def frozen_copy(model, dtype, device) -> Transformer:
    """θ_t: the full weights gathered onto every rank as a plain, unsharded Transformer in eval mode.
    It generates, scores the reference log-probs, is evaluated and exported, and is then dropped:
    generation runs a different number of forward passes on each rank, which sharded weights
    (one collective per block per pass) would deadlock on."""
    state = {}
    for name, t in model.state_dict().items():  # under FSDP, shards: gather one tensor at a time
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        state[name] = t.to(device=device, dtype=dtype, copy=True)
    with torch.device("meta"):
        copy = Transformer(model.args)
    copy.load_state_dict(state, assign=True)
    if copy.args.tie_embeddings:
        copy.output.weight = copy.tok_embeddings.weight
    return copy.eval().requires_grad_(False)

# -----------------------------------------------------------------------------
# Scoring, generation and evaluation with the frozen θ_t


@torch.no_grad()
def score(model, seqs, pad_id, batch_size=64) -> list[float]:
    """s(y|x) of each (ids, loss_mask) sequence: the summed log-prob of its response tokens."""
    device, out = model.output.weight.device, []
    for i in range(0, len(seqs), batch_size):
        tokens, targets, mask = (t.to(device) for t in data.collate(seqs[i:i + batch_size], pad_id))
        hidden = model(tokens, return_hidden=True)
        out += sequence_logprobs(hidden, model.output.weight, targets, mask).tolist()
    return out


def self_play_round(policy, tok, chats, cfg, iteration, rank, world) -> list[dict]:
    """Step 1 of the algorithm: K samples per prompt from θ_t and the reference scores of all responses."""
    K = cfg.samples_per_prompt

    def work(c, part):
        prompts = [data.split_chat(ch["messages"]) for ch in part]
        ids = [data.encode_prompt(tok, p, cfg.max_prompt)[0] for p, _ in prompts]
        # one seed per chunk of prompts: the same samples whatever the number of ranks
        out = generate(policy, [x for x in ids for _ in range(K)], cfg.max_new_tokens, temperature=cfg.temperature,
                       top_p=cfg.top_p, eos_id=tok.eos_id, seed=cfg.seed * 1_000_003 + iteration * 10_007 + c)
        texts = [data.decode_response(tok, o) for o in out]
        records = []
        for j, (prompt, real) in enumerate(prompts):
            generated = texts[j * K:(j + 1) * K]
            seqs = [data.encode_example(tok, prompt, y, cfg.max_prompt, cfg.max_length)[:2] for y in [real] + generated]
            s = score(policy, seqs, tok.pad_id)
            records.append({"messages": prompt, "real": real, "generated": generated,
                            "ref_real": s[0], "ref_generated": s[1:]})
        return records
    return map_chunks(chats, cfg.gen_batch, work, rank, world, f"generate iter {iteration}")


def evaluate(policy, tok, chats, cfg, rank, world, exact: bool) -> dict:
    """Greedy exact match (demo task only) and the mean log-likelihood of the held-out real responses."""
    def work(c, part):
        prompts = [data.split_chat(ch["messages"]) for ch in part]
        seqs = [data.encode_example(tok, p, y, cfg.max_prompt, cfg.max_length)[:2] for p, y in prompts]
        logp = score(policy, seqs, tok.pad_id)
        if not exact:
            return [(0.0, s) for s in logp]
        ids = [data.encode_prompt(tok, p, cfg.max_prompt)[0] for p, _ in prompts]
        out = generate(policy, ids, cfg.max_new_tokens, temperature=0.0, eos_id=tok.eos_id)
        hits = [float(data.exact_match(data.decode_response(tok, o), y)) for o, (_, y) in zip(out, prompts)]
        return list(zip(hits, logp))
    results = map_chunks(chats, cfg.gen_batch, work, rank, world, "evaluate")
    out = {"eval/heldout_logp": sum(s for _, s in results) / len(results)}
    if exact:  # exact match only means something on the demo task
        out["eval/accuracy"] = sum(h for h, _ in results) / len(results)
    return out

# -----------------------------------------------------------------------------
# Training: one phase is E epochs of one loss over one dataset, with a fresh optimizer and schedule


def make_optimizer(model, cfg, lr):
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)


def lr_at(step, total, peak, cfg):
    warm = int(cfg.warmup * total)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if cfg.decay == "linear":
        return peak * (1 - progress)
    if cfg.decay == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    return peak


def micro_loss(model, method, cfg, examples, batch_count, world):
    """The loss of one micro-batch, scaled so that summing over micro-batches and averaging over
    ranks (FSDP's reduce-scatter divides by the world size) gives the gradient of the global batch's
    mean loss, whatever the number of ranks. Returns (scaled loss, metrics summed over the micro-batch)."""
    if method in ("sft", "gem"):
        # examples: (ids, loss_mask); batch_count: response tokens in the whole global batch
        tokens, targets, mask = (t.to(cfg.device) for t in data.collate(examples, cfg.pad_id))
        hidden = model(tokens, return_hidden=True)
        fn = sft_loss if method == "sft" else lambda *a, **k: gem_loss(*a, beta=cfg.beta, **k)
        loss = fn(hidden, model.output.weight, targets, mask, num_tokens=batch_count)
        return loss * world, {"loss": loss.item()}
    # examples: self-play records, each with its 1 + K encoded sequences; batch_count: prompts
    B, K1 = len(examples), len(examples[0]["seqs"])
    tokens, targets, mask = (t.to(cfg.device) for t in data.collate([s for ex in examples for s in ex["seqs"]], cfg.pad_id))
    hidden = model(tokens, return_hidden=True)
    logp = sequence_logprobs(hidden, model.output.weight, targets, mask).view(B, K1)  # [B, 1+K]
    ref = torch.tensor([[ex["ref_real"]] + ex["ref_generated"] for ex in examples], device=cfg.device)  # [B, 1+K]
    n = mask.sum(1).view(B, K1).float()                                                # response lengths
    real, gen, ref_real, ref_gen = logp[:, 0], logp[:, 1:], ref[:, 0], ref[:, 1:]
    if method == "space":
        loss = space_loss(real, gen, ref_real, ref_gen, mu=cfg.mu, beta=cfg.beta)
    elif method == "spin":
        loss = spin_loss(real, gen, ref_real, ref_gen, beta=cfg.beta, kind=cfg.spin_kind)
    elif method == "ipo":
        loss = ipo_loss(real, gen, ref_real, ref_gen, n[:, 0], n[:, 1:], beta=cfg.beta)
    else:
        loss = simpo_loss(real, gen, n[:, 0], n[:, 1:], beta=cfg.beta, gamma=cfg.gamma)
    share = B / batch_count
    metrics = {k: v * share for k, v in reward_metrics(real, gen, ref_real, ref_gen).items()}
    metrics["loss"] = loss.item() * share
    return loss * share * world, metrics


def train_phase(model, cfg, run, method, examples, epochs, lr, batch_size, micro_batch_size, phase_seed):
    """E epochs over examples, resuming at run.step; a checkpoint every cfg.ckpt_every steps."""
    steps_per_epoch = len(examples) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(examples)} examples do not fill one global batch of {batch_size} (--batch-size)")
    total = steps_per_epoch * epochs
    opt = make_optimizer(model, cfg, lr)
    if run.step > 0:
        load_checkpoint(cfg, run, model, opt)  # mid-phase: restore the optimizer too
    bar = tqdm(total=total, initial=run.step, desc=f"{run.phase} {run.iteration} ({method})", disable=run.rank != 0, leave=False)
    order, order_epoch = None, None
    while run.step < total:
        epoch, k = divmod(run.step, steps_per_epoch)
        if order_epoch != epoch:
            order, order_epoch = data.batches(len(examples), batch_size, phase_seed, epoch, run.rank, run.world), epoch
        local = [examples[i] for i in order[k]]
        t0 = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(run.step, total, lr, cfg)
        if method in ("sft", "gem"):
            count = all_sum([sum(sum(m[1:]) for _, m in local)], cfg.device)[0]  # response tokens, all ranks
        else:
            count = batch_size
        sums, n_tokens = {}, 0
        for i in range(0, len(local), micro_batch_size):
            micro = local[i:i + micro_batch_size]
            if run.world > 1:  # reduce-scatter gradients once per step, after the last micro-batch
                model.set_requires_gradient_sync(i + micro_batch_size >= len(local))
            with autocast(cfg, cfg.device):
                loss, metrics = micro_loss(model, method, cfg, micro, count, run.world)
            if run.global_step == cfg.inject_nan_step:
                loss = loss * math.nan
                metrics["loss"] = math.nan
            loss.backward()
            for key, v in metrics.items():
                sums[key] = sums.get(key, 0.0) + v
            n_tokens += sum(len(s[0]) for ex in micro for s in (ex["seqs"] if isinstance(ex, dict) else [ex]))
        keys = sorted(sums)
        totals = dict(zip(keys + ["tokens"], all_sum([sums[key] for key in keys] + [n_tokens], cfg.device)))
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if not (math.isfinite(totals["loss"]) and math.isfinite(norm.item())):
            raise FloatingPointError(
                f"loss is {totals['loss']} (gradient norm {norm.item()}) at {run.phase} {run.iteration}, step {run.step} (global step "
                f"{run.global_step}); stopping before the optimizer step. The last good checkpoint is "
                f"{os.path.join(cfg.out, 'ckpt', run.latest or '(none yet)')}; resume with --resume")
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.step += 1
        run.global_step += 1
        for key in keys:
            if key.startswith("rewards/") or key == "accuracy":
                run.stats[key] = run.stats.get(key, 0.0) + totals[key]
        run.stats["steps"] = run.stats.get("steps", 0) + 1
        bar.update(1)
        bar.set_postfix(loss=f"{totals['loss']:.4f}")
        if run.step % cfg.log_every == 0 or run.step == total:
            run.log({"step": run.global_step, "phase": run.phase, "iteration": run.iteration, "method": method,
                     "epoch": epoch, **{k: totals[k] for k in keys}, "lr": opt.param_groups[0]["lr"],
                     "grad_norm": norm.item(), "tokens/s": totals["tokens"] / (time.time() - t0)})
        if run.step % cfg.ckpt_every == 0 and run.step < total:
            save_checkpoint(cfg, run, model, opt)
    bar.close()

# -----------------------------------------------------------------------------
# Run state, checkpoints and logs


class Run:
    """Where the run is (phase, iteration, step), what it has measured, and the metrics log."""

    def __init__(self, cfg, rank, world):
        self.rank, self.world, self.out = rank, world, cfg.out
        self.phase, self.iteration, self.step, self.global_step = "sft", 0, 0, 0
        self.stats, self.summary, self.latest = {}, [], None
        self.metrics = os.path.join(cfg.out, "metrics.jsonl")

    def state(self):
        return {k: getattr(self, k) for k in ("phase", "iteration", "step", "global_step", "stats", "summary")}

    def log(self, record):
        if self.rank == 0:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")


def save_checkpoint(cfg, run, model, opt=None):
    """Weights (and optimizer, mid-phase) through torch.distributed.checkpoint, each rank its shard,
    into a new folder; then `latest` is switched to it with an atomic rename, so a kill at any
    moment leaves the previous checkpoint whole."""
    root = os.path.join(cfg.out, "ckpt")
    name = f"{run.phase}{run.iteration}_step{run.step}"
    path = os.path.join(root, name)
    if run.rank == 0 and os.path.exists(path):
        shutil.rmtree(path)
    barrier()
    state = {"model": get_model_state_dict(model)}
    if opt is not None:
        state["optim"] = get_optimizer_state_dict(model, opt)
    dcp.save(state, checkpoint_id=path)
    torch.save(torch.get_rng_state(), os.path.join(path, f"rng_{run.rank}.pt"))
    barrier()
    if run.rank == 0:
        size = os.path.getsize(run.metrics) if os.path.exists(run.metrics) else 0
        with open(os.path.join(path, "run.json"), "w") as f:
            json.dump({**run.state(), "metrics_bytes": size}, f)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        for old in os.listdir(root):
            if old not in (name, "latest"):
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    run.latest = name
    barrier()


def latest_checkpoint(cfg):
    marker = os.path.join(cfg.out, "ckpt", "latest")
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        return os.path.join(cfg.out, "ckpt", f.read().strip())


def load_checkpoint(cfg, run, model, opt=None):
    """Restore the weights and RNG from the latest checkpoint or, given opt, the optimizer's state."""
    path = latest_checkpoint(cfg)
    if opt is not None:
        state = {"optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=path)
        set_optimizer_state_dict(model, opt, state["optim"])
        return
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    torch.set_rng_state(torch.load(os.path.join(path, f"rng_{run.rank}.pt")))


def resume(cfg, run, model):
    """Put the run and the weights back where the latest checkpoint left them; drop the metric lines
    logged after it (they will be logged again)."""
    path = latest_checkpoint(cfg)
    with open(os.path.join(path, "run.json")) as f:
        saved = json.load(f)
    for k in run.state():
        setattr(run, k, saved[k])
    run.latest = os.path.basename(path)
    load_checkpoint(cfg, run, model)
    barrier()
    if run.rank == 0 and os.path.exists(run.metrics):
        with open(run.metrics, "r+") as f:
            f.truncate(saved["metrics_bytes"])
    print0(f"resumed from {path}: {run.phase} {run.iteration}, step {run.step}")

# -----------------------------------------------------------------------------
# The data of a run


def load_data(cfg, rank):
    """(tokenizer, sft chats, self-play chats, held-out chats)."""
    if cfg.data:
        chats = data.load_chats(cfg.data)
        held_out = data.load_chats(cfg.eval_data) if cfg.eval_data else chats[-cfg.n_test:]
        selfplay = chats if cfg.eval_data else chats[:-cfg.n_test]
        sft = selfplay
    else:
        splits = data.demo_splits(cfg.data_seed, cfg.n_train, cfg.n_selfplay, cfg.n_test)
        sft, selfplay, held_out = splits["train"], splits["selfplay"], splits["test"]
    tok_file = cfg.tokenizer or (os.path.join(cfg.model, "tokenizer.model") if cfg.model else None)
    if tok_file is None:  # the demo's own tokenizer, trained once on its text by rank 0
        tok_file = os.path.join(cfg.out, "tokenizer.model")
        if rank == 0:  # on its own sample of the task, so it is the same whatever the split sizes
            sample = data.demo_splits(cfg.data_seed + 1, n_train=3000, n_selfplay=0, n_test=0)["train"]
            data.demo_tokenizer(sample, cfg.out, cfg.vocab_size)
        barrier()
    return data.Tokenizer(tok_file), tok_file, sft, selfplay, held_out


def encode_phase_data(tok, cfg, method, chats, records):
    """What a phase trains on: (ids, loss_mask) per chat for SFT and GEM; for self-play, per prompt
    its real and K generated responses, encoded the same way, with their stored reference scores."""
    truncated = 0
    if method in ("sft", "gem"):
        out = []
        for ch in chats:
            ids, m, cut = data.encode_example(tok, *data.split_chat(ch["messages"]), cfg.max_prompt, cfg.max_length)
            out.append((ids, m))
            truncated += cut
    else:
        out = []
        for r in records:
            seqs = []
            for y in [r["real"]] + r["generated"]:
                ids, m, cut = data.encode_example(tok, r["messages"], y, cfg.max_prompt, cfg.max_length)
                seqs.append((ids, m))
                truncated += cut
            out.append({"seqs": seqs, "ref_real": r["ref_real"], "ref_generated": r["ref_generated"]})
    print0(f"{len(out)} examples, {truncated} sequences truncated (max prompt {cfg.max_prompt}, max length {cfg.max_length})")
    return out

# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_args(argv)
    rank, world, device = setup_distributed()
    cfg.device = device
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    resuming = latest_checkpoint(cfg) is not None
    if resuming and not cfg.resume:
        raise SystemExit(f"{cfg.out} already holds a run: pass --resume to continue it, or choose another --out")
    if not resuming and any(d.startswith("iter_") for d in os.listdir(cfg.out)):
        # samples drawn by another run must not be trained on as if they were this run's
        raise SystemExit(f"{cfg.out} holds iter_* folders but no checkpoint: choose another --out or remove them")
    run = Run(cfg, rank, world)
    if rank == 0 and not resuming:
        open(run.metrics, "w").close()
    tok, tok_file, sft_chats, selfplay_chats, held_out = load_data(cfg, rank)
    cfg.pad_id = tok.pad_id

    # the model: fp32 master weights; bf16 happens in FSDP's mixed precision or autocast
    if cfg.model:
        model = load_model(cfg.model, dtype=torch.float32, device=device)
        run.phase = "iter"
    else:
        margs = ModelArgs(**cfg.model_config, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id)
        model = Transformer(margs).init_weights(cfg.seed).to(device)
    print0(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {world} process(es) on {device}")
    model = parallelize(model, cfg, world, device)
    if resuming:
        resume(cfg, run, model)
    elif run.phase == "iter":
        save_checkpoint(cfg, run, model)  # θ_0 = --model: from here on every kill can resume

    if run.phase == "sft":
        examples = encode_phase_data(tok, cfg, "sft", sft_chats, None)
        train_phase(model, cfg, run, "sft", examples, cfg.sft_epochs, cfg.sft_lr, cfg.sft_batch_size,
                    cfg.sft_batch_size, phase_seed=cfg.seed)
        run.phase, run.iteration, run.step = "iter", 0, 0
        save_checkpoint(cfg, run, model)

    # θ_t computes as training does, so r(y) = 0 at θ = θ_t: bf16 weights under FSDP's bf16 policy,
    # fp32 weights under autocast (one process), fp32 otherwise
    gen_dtype = torch.bfloat16 if cfg.bf16 and dist.is_initialized() else torch.float32
    while True:
        t = run.iteration
        policy = None
        if run.step == 0:  # the start of iteration t: evaluate and export θ_t
            policy = frozen_copy(model, gen_dtype, device)
            with autocast(cfg, device):
                result = {"iteration": t, **evaluate(policy, tok, held_out, cfg, rank, world, exact=not cfg.data)}
            if t > 0:
                steps = max(1, run.stats.get("steps", 1))
                result.update({k: v / steps for k, v in run.stats.items() if k != "steps"})
            run.summary.append(result)
            run.log(result)
            print0(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
            if rank == 0:
                export = os.path.join(cfg.out, f"iter_{t}")
                save_model(policy, export)
                shutil.copy(tok_file, os.path.join(export, "tokenizer.model"))
        if t == cfg.iterations:
            break
        path = os.path.join(cfg.out, f"iter_{t}", "selfplay.jsonl")
        records = None
        if cfg.method in SELF_PLAY:
            if not os.path.exists(path):  # a resumed run reuses the samples it already drew
                policy = policy or frozen_copy(model, gen_dtype, device)
                with autocast(cfg, device):
                    records = self_play_round(policy, tok, selfplay_chats, cfg, t, rank, world)
                if rank == 0:
                    data.save_jsonl(path, records)
                barrier()
            records = data.load_selfplay(path)
        del policy
        if run.step == 0:
            run.stats = {}
        examples = encode_phase_data(tok, cfg, cfg.method, selfplay_chats, records)
        lr = cfg.late_lr if cfg.late_lr is not None and t >= 2 else cfg.lr
        train_phase(model, cfg, run, cfg.method, examples, cfg.epochs, lr, cfg.batch_size,
                    cfg.micro_batch_size, phase_seed=cfg.seed * 1000 + t + 1)
        run.iteration, run.step = t + 1, 0
        save_checkpoint(cfg, run, model)

    if rank == 0:
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump(run.summary, f, indent=1)
    print0(summary_table(run.summary, cfg.method))
    if dist.is_initialized():
        dist.destroy_process_group()


def summary_table(rows, method):
    cols = ["eval/accuracy", "eval/heldout_logp", "rewards/real", "rewards/generated", "accuracy"]
    lines = [f"| model ({method}) | exact match | held-out log p(y) | rewards/real | rewards/generated | train acc |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        name = "θ_0 (SFT)" if r["iteration"] == 0 else f"θ_{r['iteration']}"
        cells = [f"{r[c]:.4f}" if c in r and not math.isnan(r[c]) else "" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
