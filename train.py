"""
Self-play fine-tuning, one loop from SFT through T self-play iterations: SPACE (Wang et al., NeurIPS
2025) by default, SPIN (Chen et al., ICML 2024) and its self-play IPO / SimPO baselines, or plain SFT
(cross-entropy or GEM) continued on the same data as a control.

    python train.py                                      # the built-in demo on a CPU (a few minutes)
    python train.py --preset smoke                       # the demo shrunk to under a minute (tests)
    torchrun --nproc_per_node 2 train.py --preset smoke  # the same on 2 processes: FSDP2 over gloo
    python train.py --out out/demo --resume              # continue a killed run where it stopped
    torchrun --nproc_per_node 8 train.py --preset paper --model zephyr-7b-sft-full \\
        --data ultrachat_50k.jsonl --method spin --out runs/spin   # SPIN's published recipe (README)

The algorithm (both papers' Algorithm 1). θ_0 is the SFT model (trained here from scratch for the
demo, or loaded with --model). For t = 0 .. T-1:
  1. θ_t, frozen, draws K responses y' for every self-play prompt and scores the real and generated
     responses once, s_θt(y|x) (selfplay.py: chunks saved as they finish, so a kill loses little;
     with --mix-previous N the samples of iterations t-N .. t-1 are reused, re-scored by θ_t). It all
     goes to OUT/iter_t/selfplay.jsonl, so no second model is kept in memory while training.
  2. θ is trained from θ_t for E epochs on the loss of --method, with r(y) = s_θ(y|x) − s_θt(y|x),
     β_t and lr_t from the per-iteration schedules --beta and --lr (+ α · NLL of y with --sft-weight).
  3. θ_{t+1} ← θ, exported to OUT/iter_{t+1}/ in the Hugging Face layout with its tokenizer files.
Before each iteration and after the last, θ_t is evaluated on held-out prompts (greedy exact match on
the demo task; the log-likelihood of the held-out real responses, per response and per token), and
its greedy replies to the first 8 of them go to OUT/iter_t/samples.jsonl.

Every --ckpt-every steps the full state (weights, optimizer, step, iteration, phase and the metrics
file's length) is written with torch.distributed.checkpoint; --resume continues from it, with any
number of ranks, and ends where an uninterrupted run ends. A NaN or inf loss stops the run before
the optimizer step, so the last checkpoint stays good. Across nodes OUT must be a shared filesystem.

This file is the loop, read top to bottom. Three ideas live beside it: selfplay.py (the round of
step 1, and evaluation), parallel.py (process group, FSDP2/HSDP, rank-0 decisions) and
checkpoint.py (resume checkpoints and exports).
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import tempfile
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from tqdm import tqdm

import data
from checkpoint import Run, export, latest_checkpoint, load_optimizer, resume, save_checkpoint
from model import ModelArgs, Transformer, load_model
from parallel import (all_sum, barrier, check_shared_out, from_rank0, frozen_copy, parallelize, print0,
                      setup_distributed)
from selfplay import evaluate, score, self_play_round, to_device
from space import gem_loss, ipo_loss, reward_metrics, sequence_logprobs, sft_loss, simpo_loss, space_loss, spin_loss
from tokenizer import Tokenizer, add_template_flags, export_tokenizer, parse_template_args

# -----------------------------------------------------------------------------
# Presets: every flag's default. A flag given on the command line wins.

DEMO = dict(
    # a tiny Mistral trained from scratch on the generated task (data.demo_splits)
    model_config=dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=384,
                      sliding_window=48, max_seq_len=128),
    n_train=6000, n_selfplay=1500, n_test=300, vocab_size=320, selfplay_from="fresh",
    sft_epochs=4, sft_lr=2e-3, sft_batch_size=64,
    iterations=3, epochs=1, lr="5e-5", batch_size=32, micro_batch_size=32, samples_per_prompt=1,
    mix_previous=0, optimizer="adamw", warmup=0.1, decay="linear", max_prompt=48, max_length=80,
    max_new_tokens=24, temperature=1.0, top_p=1.0, gen_batch=256, score_tokens=8192, ckpt_every=50,
    log_every=10, bf16=False,
)
PRESETS = {
    "demo": DEMO,
    "smoke": {**DEMO, "model_config": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                                           hidden_dim=160, sliding_window=16, max_seq_len=128),
              "n_train": 768, "n_selfplay": 64, "n_test": 32, "sft_epochs": 2, "iterations": 2, "epochs": 2,
              "batch_size": 16, "micro_batch_size": 8, "sft_batch_size": 32, "gen_batch": 32,
              "score_tokens": 1024, "ckpt_every": 4, "log_every": 2},
    # the papers' recipes at their scale: zephyr-7b-sft-full or Mistral-7B, 50k UltraChat prompts, 8 GPUs.
    # "by_method" holds what depends on --method (README: which setting comes from which paper).
    "paper": {**DEMO, "iterations": 5, "epochs": 2, "lr": "5e-7", "optimizer": "rmsprop", "batch_size": 64,
              "micro_batch_size": 1, "max_prompt": 512, "max_length": 1024, "max_new_tokens": 256,
              "gen_batch": 64, "score_tokens": 16384, "n_test": 500, "ckpt_every": 100, "log_every": 10,
              "bf16": True, "activation_checkpointing": True,
              "by_method": {
                  # SPIN's scripts and configs: lr and β per iteration, the previous samples mixed in
                  "spin": dict(mix_previous=1, lr="5e-7,5e-7,1e-7,1e-7", beta="0.1,0.1,0.1,5.0"),
                  # the SPACE paper: μ = 1, β = 1, SPIN's loop and optimizer, no reuse
                  "space": dict(mu=1.0, beta="1.0"),
              }},
}
BETA = {"space": "1.0", "spin": "0.1", "ipo": "0.1", "simpo": "2.0", "sft": None}  # each paper's default
SELF_PLAY = ("space", "spin", "ipo", "simpo")


def schedule(text, flag, parser):
    """'0.1' or '0.1,0.1,0.1,5.0' -> [floats]: one value per iteration, the last repeating."""
    try:
        return [float(x) for x in str(text).split(",")]
    except ValueError:
        parser.error(f"{flag}: expected a number or comma-separated numbers (one per iteration), got {text!r}")


def at(values, t):
    """Iteration t's value of a per-iteration schedule: the last one repeats."""
    return values[min(t, len(values) - 1)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="demo", help="defaults for every flag below (paper: per --method)")
    p.add_argument("--model", help="HF or Mistral checkpoint folder to start self-play from (else SFT from scratch)")
    p.add_argument("--data", help="chat JSONL for self-play (else the built-in demo task)")
    p.add_argument("--eval-data", help="chat JSONL of held-out conversations (default: the last --n-test of --data)")
    p.add_argument("--n-test", type=int, help="held-out chats taken from the end of --data (or the demo's test split)")
    p.add_argument("--tokenizer", help="tokenizer.model, tokenizer.json or a folder of them (default: MODEL's, or one "
                                       "trained on the demo)")
    add_template_flags(p)  # kept with the run: OUT/template.json
    p.add_argument("--out", default="out/demo", help="run folder: metrics.jsonl, ckpt/, iter_k/ (shared by all nodes)")
    p.add_argument("--method", choices=list(BETA), default="space", help="the loss of the iterations")
    p.add_argument("--iterations", type=int, help="self-play iterations T")
    p.add_argument("--samples-per-prompt", type=int, help="K generated responses per prompt")
    p.add_argument("--mix-previous", type=int, help="also train on the samples of the N previous iterations (SPIN: 1)")
    p.add_argument("--mu", type=float, help="SPACE's noise ratio μ (default K)")
    p.add_argument("--beta", help="β, or one per iteration: 0.1,0.1,0.1,5.0 (default: the method's paper value)")
    p.add_argument("--gamma", type=float, default=0.5, help="S-SimPO's margin γ")
    p.add_argument("--spin-kind", choices=["sigmoid", "hinge"], default="sigmoid", help="SPIN's loss ℓ")
    p.add_argument("--sft-weight", type=float, default=0.0, help="α: add α × the mean NLL of the real responses")
    p.add_argument("--sft-loss", choices=["ce", "gem"], default="ce", help="the loss of every SFT phase")
    p.add_argument("--gem-beta", type=float, default=0.7, help="GEM's β (its softmax temperature)")
    p.add_argument("--gem-h", choices=["linear", "logsigmoid"], default="linear", help="GEM's weighting function h")
    p.add_argument("--lr", help="peak learning rate, or one per iteration: 5e-7,5e-7,1e-7,1e-7")
    p.add_argument("--epochs", type=int, help="epochs per iteration")
    p.add_argument("--batch-size", type=int, help="global batch, in prompts (each with its real and K generated)")
    p.add_argument("--micro-batch-size", type=int, help="prompts per forward pass on one rank (gradient accumulation)")
    p.add_argument("--optimizer", choices=["adamw", "rmsprop"], help="SPIN and SPACE use RMSProp")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=float, help="fraction of each phase's steps spent warming up")
    p.add_argument("--decay", choices=["linear", "cosine", "constant"], help="learning-rate decay after warmup")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--sft-epochs", type=int, help="demo: epochs of the SFT that makes θ_0")
    p.add_argument("--sft-lr", type=float, help="demo: peak learning rate of that SFT")
    p.add_argument("--train-size", dest="n_train", type=int, help="demo: chats in the SFT split")
    p.add_argument("--selfplay-size", dest="n_selfplay", type=int, help="demo: prompts in the self-play set")
    p.add_argument("--selfplay-from", choices=["fresh", "sft"],
                   help="demo: self-play on a split of its own, or on the first --selfplay-size chats of the SFT split")
    p.add_argument("--max-prompt", type=int, help="keep the last tokens of longer prompts (SPIN's rule)")
    p.add_argument("--max-length", type=int, help="prompt + response tokens; longer responses are cut")
    p.add_argument("--max-new-tokens", type=int, help="generation length limit")
    p.add_argument("--temperature", type=float, help="sampling temperature of the self-play responses")
    p.add_argument("--top-p", type=float, help="nucleus sampling of the self-play responses")
    p.add_argument("--gen-batch", type=int, help="prompts per generation chunk (each chunk is saved as it finishes)")
    p.add_argument("--score-tokens", type=int, help="padded tokens per forward pass when θ_t scores responses")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 compute (FSDP mixed precision or autocast)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute each block's activations in backward")
    p.add_argument("--shard-size", type=int, default=0,
                   help="ranks per FSDP shard group; fewer than all gives HSDP (e.g. GPUs per node: shard within a "
                        "node, replicate across nodes). 0: all ranks")
    p.add_argument("--reduce-every-micro-batch", action=argparse.BooleanOptionalAction, default=False,
                   help="reduce-scatter gradients after every micro-batch instead of once per step: less memory "
                        "(no unsharded gradients held), one reduce-scatter per micro-batch (README)")
    p.add_argument("--dist-timeout", type=float, default=60, help="minutes a rank may wait in a collective "
                   "(rank 0 exporting a 7B checkpoint, uneven generation)")
    p.add_argument("--ckpt-every", type=int, help="steps between resume checkpoints")
    p.add_argument("--log-every", type=int, help="steps between metrics.jsonl lines")
    p.add_argument("--seed", type=int, default=0, help="model init, batch order and sampling")
    p.add_argument("--data-seed", type=int, default=0, help="demo: which problems make up the splits")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt")
    p.add_argument("--inject-nan-step", type=int, default=-1, help=argparse.SUPPRESS)  # tests: NaN loss at this step
    args, _ = p.parse_known_args(argv)
    preset = dict(PRESETS[args.preset])
    preset.update(preset.pop("by_method", {}).get(args.method, {}))
    p.set_defaults(**preset)
    args = p.parse_args(argv)
    args.lr = schedule(args.lr, "--lr", p)
    args.beta = schedule(args.beta or BETA[args.method] or "0", "--beta", p)
    try:
        args.chat_template_arg = parse_template_args(args.chat_template_arg)
    except ValueError as e:
        p.error(str(e))
    return args

# -----------------------------------------------------------------------------
# θ_0, and θ_t as the opponent of its round


def build_model(cfg, tok, rank, world, device, mesh):
    """θ_0's architecture and weights, sharded over the ranks. From --model on several ranks no rank
    holds the whole model on its device: it is built on the meta device and sharded first, then rank 0
    reads the checkpoint into CPU memory and broadcasts it tensor by tensor, each rank keeping only its
    shards. (Every rank loading the full fp32 model onto its GPU would put 29 GB on each at 7B, and
    read the checkpoint 8 times at once.)"""
    if cfg.model and world > 1:
        full = load_model(cfg.model) if rank == 0 else None  # fp32 master weights, on the CPU
        with torch.device("meta"):
            model = Transformer(from_rank0(lambda: full.args))
        model = parallelize(model, cfg, world, device, mesh)
        set_model_state_dict(model, full.state_dict() if rank == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return model
    if cfg.model:
        model = load_model(cfg.model, dtype=torch.float32, device=device)
    else:
        margs = ModelArgs(**cfg.model_config, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id)
        model = Transformer(margs).init_weights(cfg.seed).to(device)
    return parallelize(model, cfg, world, device, mesh)


def autocast(cfg, device):
    """bf16 autocast for a single process; under FSDP the mixed-precision policy casts instead."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(cfg.bf16) and not dist.is_initialized())


def opponent(model, cfg, world, device):
    """θ_t for its round: (policy, scorer), scorer(seqs) -> s_θt of each (ids, loss_mask).

    policy generates and is exported: an unsharded model in bf16 with --bf16, used outside autocast
    (autocast re-casts fp32 weights that do not require grad at every decode step, and the fp32 KV
    cache with them). scorer computes s_θt exactly as training computes s_θ, so that r(y) = 0 at
    θ = θ_t: in one process the live model itself (before iteration t trains, it *is* θ_t), under
    autocast with --bf16; under FSDP the gathered copy, whose bf16 weights are those FSDP's bf16
    policy computes with."""
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    if world == 1:
        policy, live = (model if dtype == torch.float32 else frozen_copy(model, dtype, device)), model
    else:
        policy = live = frozen_copy(model, dtype, device)

    def scorer(seqs):
        with autocast(cfg, device):
            return score(live, seqs, cfg.pad_id, cfg.score_tokens)
    return policy, scorer

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


def micro_loss(model, method, cfg, examples, counts, world, beta):
    """The loss of one micro-batch, scaled so that summing over micro-batches and averaging over
    ranks (FSDP's reduce-scatter divides by the world size) gives the gradient of the global batch's
    mean loss, whatever the number of ranks. counts: the global batch's prompts, response tokens and
    real-response tokens. Returns (scaled loss, metrics summed over the micro-batch, as 0-d tensors:
    they are read back once per step, not once per micro-batch)."""
    if method == "sft":
        # examples: (ids, loss_mask); normalised by the response tokens of the whole global batch
        tokens, targets, mask = (to_device(t, cfg.device) for t in data.collate(examples, cfg.pad_id))
        hidden = model(tokens, return_hidden=True)
        if cfg.sft_loss == "gem":
            loss = gem_loss(hidden, model.output.weight, targets, mask, beta=cfg.gem_beta, h=cfg.gem_h,
                            num_tokens=counts["tokens"])
        else:
            loss = sft_loss(hidden, model.output.weight, targets, mask, num_tokens=counts["tokens"])
        return loss * world, {"loss": loss.detach()}
    # examples: self-play records, each with its 1 + K encoded sequences
    B, K1 = len(examples), len(examples[0]["seqs"])
    tokens, targets, mask = (to_device(t, cfg.device) for t in
                             data.collate([s for ex in examples for s in ex["seqs"]], cfg.pad_id))
    hidden = model(tokens, return_hidden=True)
    logp = sequence_logprobs(hidden, model.output.weight, targets, mask).view(B, K1)   # [B, 1+K]
    ref = to_device(torch.tensor([[ex["ref_real"]] + ex["ref_generated"] for ex in examples]), cfg.device)
    n = mask.sum(1).view(B, K1).float()                                                # response lengths
    real, gen, ref_real, ref_gen = logp[:, 0], logp[:, 1:], ref[:, 0], ref[:, 1:]
    if method == "space":
        loss = space_loss(real, gen, ref_real, ref_gen, mu=cfg.mu, beta=beta)
    elif method == "spin":
        loss = spin_loss(real, gen, ref_real, ref_gen, beta=beta, kind=cfg.spin_kind)
    elif method == "ipo":
        loss = ipo_loss(real, gen, ref_real, ref_gen, n[:, 0], n[:, 1:], beta=beta)
    else:
        loss = simpo_loss(real, gen, n[:, 0], n[:, 1:], beta=beta, gamma=cfg.gamma)
    share = B / counts["prompts"]
    metrics = {k: v * share for k, v in reward_metrics(real, gen, ref_real, ref_gen).items()}
    loss = loss * share
    if cfg.sft_weight:
        # + α · NLL of the real responses, per token over the global batch's real-response tokens (as
        # SFT normalises), from the same forward pass: logp[:, 0] is s_θ(y), their summed log-probs
        nll = -real.sum() / counts["real_tokens"]
        metrics["sft_nll"] = nll.detach()
        loss = loss + cfg.sft_weight * nll
    metrics["loss"] = loss.detach()
    return loss * world, metrics


def train_phase(model, cfg, run, method, examples, epochs, lr, beta, batch_size, micro_batch_size, phase_seed):
    """E epochs over examples, resuming at run.step; a checkpoint every cfg.ckpt_every steps."""
    steps_per_epoch = len(examples) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(examples)} examples do not fill one global batch of {batch_size} (--batch-size)")
    total = steps_per_epoch * epochs
    opt = make_optimizer(model, cfg, lr)
    if run.step > 0:
        load_optimizer(cfg, model, opt)  # mid-phase: the optimizer's state too
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
        counts = {"prompts": batch_size}  # normalisers over the global batch, whatever the ranks hold
        if method == "sft":  # its response tokens
            counts["tokens"] = all_sum([sum(sum(m[1:]) for _, m in local)], cfg.device)[0]
        elif cfg.sft_weight:  # its real responses' tokens
            counts["real_tokens"] = all_sum([sum(sum(ex["seqs"][0][1][1:]) for ex in local)], cfg.device)[0]
        sums, n_tokens = {}, 0
        for i in range(0, len(local), micro_batch_size):
            micro = local[i:i + micro_batch_size]
            if run.world > 1:  # by default gradients are reduce-scattered once per step, after the last micro-batch
                model.set_requires_gradient_sync(cfg.reduce_every_micro_batch or i + micro_batch_size >= len(local))
            with autocast(cfg, cfg.device):
                loss, metrics = micro_loss(model, method, cfg, micro, counts, run.world, beta)
            if run.global_step == cfg.inject_nan_step:
                loss = loss * math.nan
                metrics["loss"] = metrics["loss"] * math.nan
            loss.backward()
            for key, v in metrics.items():
                sums[key] = sums.get(key, 0.0) + v
            n_tokens += sum(len(s[0]) for ex in micro for s in (ex["seqs"] if isinstance(ex, dict) else [ex]))
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        keys = sorted(sums)
        # the step's one read-back: the metrics summed over the ranks, and the gradient norm (the same
        # global value on every rank, so its sum over the ranks / world is itself)
        *values, norm = all_sum([sums[key] for key in keys] + [n_tokens, norm / run.world], cfg.device)
        totals = dict(zip(keys + ["tokens"], values))
        if not (math.isfinite(totals["loss"]) and math.isfinite(norm)):
            raise FloatingPointError(
                f"loss is {totals['loss']} (gradient norm {norm}) at {run.phase} {run.iteration}, step {run.step} (global step "
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
            extra = {"beta": beta} if method != "sft" else {}
            run.log({"step": run.global_step, "phase": run.phase, "iteration": run.iteration, "method": method,
                     "epoch": epoch, **{k: totals[k] for k in keys}, "lr": opt.param_groups[0]["lr"], **extra,
                     "grad_norm": norm, "tokens/s": totals["tokens"] / (time.time() - t0)})
        if run.step % cfg.ckpt_every == 0 and run.step < total:
            save_checkpoint(cfg, run, model, opt)
    bar.close()

# -----------------------------------------------------------------------------
# The data of a run


def load_data(cfg, rank):
    """(tokenizer, its file, sft chats, self-play chats, held-out chats). Splits that cannot work fail
    here, before any work, naming the counts and the flags that fix them."""
    if cfg.data:
        chats = data.load_chats(cfg.data)
        if cfg.eval_data:
            held_out, selfplay = data.load_chats(cfg.eval_data), chats
        else:
            if len(chats) <= cfg.n_test:
                raise SystemExit(f"{len(chats)} chats in --data, {cfg.n_test} held out (--n-test): none left for "
                                 "self-play; pass --eval-data or a smaller --n-test")
            if cfg.n_test < 1:
                raise SystemExit("--n-test must be at least 1 (evaluation needs held-out chats), or pass --eval-data")
            held_out, selfplay = chats[len(chats) - cfg.n_test:], chats[:len(chats) - cfg.n_test]
        sft = selfplay
        where = f"--data ({len(chats)} chats" + (")" if cfg.eval_data else f", {cfg.n_test} held out by --n-test)")
    else:
        if cfg.selfplay_from == "sft" and cfg.n_selfplay > cfg.n_train:
            raise SystemExit(f"--selfplay-size {cfg.n_selfplay} > --train-size {cfg.n_train}: with --selfplay-from sft "
                             "the self-play prompts are the first chats of the SFT split")
        # the same splits either way, so a θ_0 trained on "train" is the one self-play then starts from
        splits = data.demo_splits(cfg.data_seed, cfg.n_train, cfg.n_selfplay, cfg.n_test)
        sft, held_out = splits["train"], splits["test"]
        selfplay = sft[:cfg.n_selfplay] if cfg.selfplay_from == "sft" else splits["selfplay"]
        where = "the demo's self-play set (--selfplay-size)"
    if cfg.iterations > 0 and len(selfplay) < cfg.batch_size:
        raise SystemExit(f"{len(selfplay)} self-play chats in {where}: fewer than one global batch of "
                         f"{cfg.batch_size} (--batch-size)")
    if not cfg.model and not cfg.data and len(sft) < cfg.sft_batch_size:
        raise SystemExit(f"{len(sft)} SFT chats (--train-size): fewer than one SFT batch of {cfg.sft_batch_size}")
    tok = load_tokenizer(cfg, rank)
    try:  # a template that cannot split a chat into prompt and response stops the run here
        for chat in (sft if sft is selfplay else sft + selfplay) + held_out:
            data.response_text(tok, *data.split_chat(chat["messages"]))
    except ValueError as e:
        raise SystemExit(str(e))
    if rank == 0:  # every export writes transformers' tokenizer files: find out now, not after θ_0's evaluation
        with tempfile.TemporaryDirectory() as scratch:
            try:
                export_tokenizer(tok, scratch, source_dir=cfg.model)
            except ValueError as e:
                raise SystemExit(f"{tok.file}: its exports could not carry transformers' tokenizer files: {e}")
    return tok, sft, selfplay, held_out


def load_tokenizer(cfg, rank):
    """The run's tokenizer and chat template. The date a template reads (strftime_now: Llama 3.2 writes
    today's date into its system turn) is the run's start, and it and the template arguments are kept
    in OUT/template.json, so a resumed run renders every chat to the same text, and the same ids."""
    flag, path = ("--tokenizer", cfg.tokenizer) if cfg.tokenizer else ("--model", cfg.model)
    if path is None:  # the demo's own tokenizer, trained once on its text by rank 0
        path = os.path.join(cfg.out, "tokenizer.model")
        if rank == 0:  # on its own sample of the task, so it is the same whatever the split sizes
            sample = data.demo_splits(cfg.data_seed + 1, n_train=3000, n_selfplay=0, n_test=0)["train"]
            data.demo_tokenizer(sample, cfg.out, cfg.vocab_size)
        barrier()
    record = os.path.join(cfg.out, "template.json")

    def read():
        if not os.path.exists(record):
            return None
        with open(record) as f:
            return json.load(f)
    saved = from_rank0(read)
    date = saved["date"] if saved else from_rank0(lambda: datetime.datetime.now().isoformat(timespec="seconds"))
    if cfg.chat_template and not os.path.isfile(cfg.chat_template):
        raise SystemExit(f"--chat-template: {cfg.chat_template}: no such file")
    try:
        tok = Tokenizer(path, cfg.chat_template, cfg.chat_template_arg, date=datetime.datetime.fromisoformat(date))
    except (OSError, ImportError) as e:  # no such file or folder, no tokenizer in it, no `tokenizers` package
        raise SystemExit(f"{flag}: {e}")
    except ValueError as e:  # tokenizer files or a template it cannot use: the message names the file
        raise SystemExit(str(e))
    ours = {"date": date, "chat_template": tok.template_name, "chat_template_args": cfg.chat_template_arg,
            "chat_template_sha256": hashlib.sha256(tok.template.encode()).hexdigest()}
    if saved and any(saved[k] != ours[k] for k in ("date", "chat_template_args", "chat_template_sha256")):
        raise SystemExit(f"{record}: this run was started with the template {saved['chat_template']} and "
                         f"--chat-template-arg {saved['chat_template_args']}, not {tok.template_name} and "
                         f"{cfg.chat_template_arg}: the ids of a run must not change (remove the file to start over)")
    if rank == 0 and not saved:
        with open(record + ".tmp", "w") as f:
            json.dump(ours, f, indent=1)
        os.replace(record + ".tmp", record)
    return tok


def encode_phase_data(tok, cfg, method, chats, records):
    """What a phase trains on: (ids, loss_mask) per chat for SFT; for self-play, per prompt its real
    and K generated responses, encoded the same way, with their stored reference scores."""
    truncated = 0
    if method == "sft":
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
    rank, world, device, mesh = setup_distributed(cfg)
    cfg.device = device
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    check_shared_out(cfg.out, rank, world)
    # rank 0 reads the run folder and decides; every rank follows (node-local disks would disagree)
    resuming, stale = from_rank0(lambda: (latest_checkpoint(cfg) is not None,
                                          any(d.startswith("iter_") for d in os.listdir(cfg.out))))
    if resuming and not cfg.resume:
        raise SystemExit(f"{cfg.out} already holds a run: pass --resume to continue it, or choose another --out")
    if not resuming and stale:
        # samples drawn by another run must not be trained on as if they were this run's
        raise SystemExit(f"{cfg.out} holds iter_* folders but no checkpoint: choose another --out or remove them")
    run = Run(cfg, rank, world)
    if rank == 0 and not resuming:
        open(run.metrics, "w").close()
    tok, sft_chats, selfplay_chats, held_out = load_data(cfg, rank)
    cfg.pad_id = tok.pad_id

    # the model: fp32 master weights; bf16 happens in FSDP's mixed precision or autocast
    model = build_model(cfg, tok, rank, world, device, mesh)
    print0(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {world} process(es) on {device}")
    if cfg.model:
        run.phase = "iter"
    if resuming:
        resume(cfg, run, model)
    elif run.phase == "iter":
        save_checkpoint(cfg, run, model)  # θ_0 = --model: from here on every kill can resume

    if run.phase == "sft":
        examples = encode_phase_data(tok, cfg, "sft", sft_chats, None)
        train_phase(model, cfg, run, "sft", examples, cfg.sft_epochs, cfg.sft_lr, None, cfg.sft_batch_size,
                    cfg.sft_batch_size, phase_seed=cfg.seed)
        run.phase, run.iteration, run.step = "iter", 0, 0
        save_checkpoint(cfg, run, model)

    while True:
        t = run.iteration
        policy = scorer = None
        if run.step == 0:  # the start of iteration t: evaluate and export θ_t
            policy, scorer = opponent(model, cfg, world, device)
            result = {"iteration": t, **evaluate(policy, scorer, tok, held_out, cfg, rank, world, exact=not cfg.data)}
            if t > 0:
                steps = max(1, run.stats.get("steps", 1))
                result.update({k: v / steps for k, v in run.stats.items() if k != "steps"})
            run.summary.append(result)
            run.log(result)
            print0(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
            if rank == 0:
                export(policy, tok, held_out, cfg, t)
            barrier()
        if t == cfg.iterations:
            break
        records = None
        if cfg.method in SELF_PLAY:
            if policy is None:
                policy, scorer = opponent(model, cfg, world, device)
            records, changed = self_play_round(policy, scorer, tok, selfplay_chats, cfg, t, rank, world)
            if changed is not None:  # share of samples whose text re-encodes to other ids than were drawn
                run.log({"iteration": t, "selfplay/reencoded_changed": changed})
                print0(f"iteration {t}: {changed:.2%} of the generated responses re-encode to other ids than were sampled")
        del policy, scorer
        if run.step == 0:
            run.stats = {}
        examples = encode_phase_data(tok, cfg, cfg.method, selfplay_chats, records)
        train_phase(model, cfg, run, cfg.method, examples, cfg.epochs, at(cfg.lr, t), at(cfg.beta, t),
                    cfg.batch_size, cfg.micro_batch_size, phase_seed=cfg.seed * 1000 + t + 1)
        run.iteration, run.step = t + 1, 0
        save_checkpoint(cfg, run, model)

    if rank == 0:
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump(run.summary, f, indent=1)
    print0(summary_table(run.summary, cfg.method, trained_sft=not cfg.model))
    if dist.is_initialized():
        dist.destroy_process_group()


def summary_table(rows, method, trained_sft):
    cols = ["eval/accuracy", "eval/heldout_logp", "eval/heldout_logp_token", "rewards/real", "rewards/generated", "accuracy"]
    lines = [f"| model ({method}) | exact match | held-out log p(y) | per token | rewards/real | rewards/generated | train acc |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"θ_{r['iteration']}" + (" (SFT)" if r["iteration"] == 0 and trained_sft else "")
        cells = [f"{r[c]:.4f}" if c in r and not math.isnan(r[c]) else "" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
