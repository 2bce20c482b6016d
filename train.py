"""
Self-play fine-tuning, one loop from SFT through T self-play iterations: SPACE (Wang et al., NeurIPS
2025) by default, SPIN (Chen et al., ICML 2024) and its self-play IPO / SimPO baselines, or plain SFT
(cross-entropy or GEM) continued on the same data as a control.

    python train.py                                      # the built-in demo on a CPU (a few minutes)
    python train.py --preset smoke                       # the demo shrunk to under a minute (tests)
    torchrun --nproc_per_node 2 train.py --preset smoke  # the same on 2 processes: FSDP2 over gloo
    python train.py --out out/demo --resume              # continue a killed run where it stopped
    python train.py --preset smoke --lora 4 --lr 1e-4    # rank-4 LoRA adapters train, merged per iteration
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
the optimizer step, so the last checkpoint stays good. SIGTERM or SIGUSR1 (a cluster preempting the
job) stops every rank at the next safe point, where the run checkpoints, writes OUT/stopped.json and
prints the --resume command (checkpoint.Preemption). Across nodes OUT must be a shared filesystem.

With --lora R each iteration trains a fresh rank-R adapter on the frozen θ_t (bf16 on the device with
--bf16) instead of every weight; at its end the adapter is merged in fp32 into θ_t's fp32 master,
which rank 0 keeps in host memory, giving θ_{t+1}. OUT/iter_{t+1}/ is the merged model in fp32, and
OUT/iter_{t+1}/adapter/ the adapter in PEFT's format, on top of OUT/iter_t.

This file is the loop, read top to bottom. Four ideas live beside it: selfplay.py (the round of
step 1, and evaluation), parallel.py (process group, FSDP2/HSDP, rank-0 decisions),
checkpoint.py (resume checkpoints and exports) and lora.py (the adapter, its merge and its format).
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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from tqdm import tqdm

import data
from checkpoint import (STOPPED, Preemption, Run, checkpoint_name, export, latest_checkpoint, load_weights, resume,
                        resume_phase, save_checkpoint, stop_run)
from lora import (ALL_TARGETS, adapter_state, add_lora, init_adapters, lora_modules, merge_weights, parse_targets, row_keys,
                  save_adapter, set_dropout_rows)
from model import ModelArgs, Transformer, load_model
from parallel import (all_sum, barrier, check_shared_out, from_rank0, frozen_copy, parallelize, print0,
                      setup_distributed, to_device)
from selfplay import evaluate, greedy_samples, score, self_play_round
from space import gem_loss, ipo_loss, reward_metrics, sequence_logprobs, sft_loss, simpo_loss, space_loss, spin_loss
from tokenizer import Tokenizer, add_template_flags, export_tokenizer, parse_template_args

# -----------------------------------------------------------------------------
# Run recipes (--preset): every flag's default. A flag given on the command line wins.

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
RECIPES = {
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
    p.add_argument("--preset", choices=RECIPES, default="demo", help="defaults for every flag below (paper: per --method)")
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
    p.add_argument("--lora", type=int, default=0, metavar="R",
                   help="train rank-R LoRA adapters instead of every weight, in the self-play iterations and "
                        "--method sft (GEM too): a fresh adapter per iteration on the frozen θ_t, merged in fp32 "
                        "into θ_{t+1} at its end and saved beside it in PEFT's format (OUT/iter_{t+1}/adapter). The "
                        "demo's SFT from scratch that makes θ_0 stays full fine-tuning: an adapter on random "
                        "weights learns little. 0: off. A variant, not the papers' setting (README)")
    p.add_argument("--lora-alpha", type=float, help="LoRA's α: the update is (α/R) B A (default 2R)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    p.add_argument("--lora-targets", default=" ".join(ALL_TARGETS),
                   help="the projections that get adapters: some of wq wk wv wo (attention) w1 w2 w3 (feed-forward)")
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
    # tests: SIGTERM sent by the run itself (the smoke phases last under a second), see Preemption
    p.add_argument("--inject-signal-step", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--inject-signal-check", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--inject-second-signal", action="store_true", help=argparse.SUPPRESS)
    args, _ = p.parse_known_args(argv)
    preset = dict(RECIPES[args.preset])
    preset.update(preset.pop("by_method", {}).get(args.method, {}))
    p.set_defaults(**preset)
    args = p.parse_args(argv)
    args.lr = schedule(args.lr, "--lr", p)
    args.beta = schedule(args.beta or BETA[args.method] or "0", "--beta", p)
    if args.lora < 0 or not 0 <= args.lora_dropout < 1:
        p.error(f"--lora {args.lora} --lora-dropout {args.lora_dropout}: need R >= 0 and a dropout in [0, 1)")
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora
    try:
        args.chat_template_arg = parse_template_args(args.chat_template_arg)
        args.lora_targets = parse_targets(args.lora_targets)
    except ValueError as e:
        p.error(str(e))
    return args

def check_inputs(cfg):
    """Files and folders the flags name, checked before any work: one line naming the flag and the path
    (not a traceback from deep inside the tokenizer or the JSONL reader, after the process group is up)."""
    for flag, path in (("--data", cfg.data), ("--eval-data", cfg.eval_data), ("--tokenizer", cfg.tokenizer)):
        if path is not None and not os.path.isfile(path):
            raise SystemExit(f"{flag} {path}: no such file")
    if cfg.model is not None:
        if not os.path.isdir(cfg.model):
            raise SystemExit(f"--model {cfg.model}: no such folder")
        if cfg.tokenizer is None and not any(os.path.isfile(os.path.join(cfg.model, name))
                                             for name in ("tokenizer.json", "tokenizer.model")):
            raise SystemExit(f"--model {cfg.model}: the folder has neither a tokenizer.json nor a tokenizer.model "
                             "(pass --tokenizer FILE)")

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
        model = parallelize(model, world, mesh, cfg.bf16, cfg.activation_checkpointing)
        set_model_state_dict(model, full.state_dict() if rank == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return model
    if cfg.model:
        model = load_model(cfg.model, dtype=torch.float32, device=device)
    else:
        margs = ModelArgs(**cfg.model_config, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id)
        model = Transformer(margs).init_weights(cfg.seed).to(device)
    return parallelize(model, world, mesh, cfg.bf16, cfg.activation_checkpointing)


def autocast(cfg, device):
    """bf16 autocast for a single process; under FSDP the mixed-precision policy casts instead."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(cfg.bf16) and not dist.is_initialized())


def theta_master(cfg, t, model, rank):
    """--lora: θ_t's weights in fp32, whole, on rank 0's host (None on the other ranks), and its
    ModelArgs (every rank). From the model the SFT phase just trained (θ_0 of the demo), from --model
    (θ_0), or from OUT/iter_t, which is exported before any checkpoint of iteration t is written.
    At 7B this is 29 GB of host memory; the device holds the bf16 copy (--bf16)."""
    if model is not None:  # gathered from the shards, one tensor at a time, into rank 0's memory
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return ({k: v.to("cpu", torch.float32) for k, v in state.items()} if rank == 0 else None), model.args
    src = cfg.model if t == 0 and cfg.model else os.path.join(cfg.out, f"iter_{t}")
    full = load_model(src) if rank == 0 else None
    return (full.state_dict() if rank == 0 else None), from_rank0(lambda: full.args)


def lora_model(cfg, margs, master, t, rank, world, device, mesh):
    """Iteration t's model: θ_t frozen (bf16 with --bf16: the memory LoRA exists to save) with a fresh
    adapter on every --lora-targets projection (B = 0, A seeded by (seed, t)), sharded as build_model
    shards, the adapters with their layers. Built on the meta device, so the device never holds an
    fp32 copy of the base; rank 0 hands out master (θ_t in fp32) tensor by tensor."""
    with torch.device("meta"):
        model = Transformer(margs)
    if cfg.bf16:
        model = model.to(torch.bfloat16)
    add_lora(model, cfg.lora, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.seed, t)
    model = parallelize(model, world, mesh, cfg.bf16, cfg.activation_checkpointing)
    model.to_empty(device=device)
    if world == 1:
        model.load_state_dict(master, strict=False)  # each fp32 tensor copied into its (bf16) place
    else:
        # a copy of the dict: set_model_state_dict puts this rank's shards into the dict it is given
        set_model_state_dict(model, dict(master) if rank == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False))
    init_adapters(model, cfg.seed, t)
    return model


def export_merged(cfg, margs, master, adapters, tok, t):
    """θ_{t+1} = θ_t + (α/R) B A, exported by rank 0: OUT/iter_{t+1}/ the merged model in fp32 (as every
    export of a --lora run: the master's precision), OUT/iter_{t+1}/adapter/ the adapter on OUT/iter_t."""
    folder = os.path.join(cfg.out, f"iter_{t + 1}")
    with torch.device("meta"):
        shape = Transformer(margs)  # what save_model reads of a model: its args
    export(shape, tok, folder, source_dir=cfg.model, state_dict=master)
    save_adapter(os.path.join(folder, "adapter"), adapters, cfg.lora, cfg.lora_alpha, cfg.lora_targets,
                 base_model_name_or_path=os.path.abspath(os.path.join(cfg.out, f"iter_{t}")), dropout=cfg.lora_dropout)


def opponent(model, cfg, world, device, pad_id):
    """θ_t for its round: (policy, scorer), scorer(seqs) -> s_θt of each (ids, loss_mask).

    policy generates and is exported: an unsharded model in bf16 with --bf16, used outside autocast
    (autocast re-casts fp32 weights that do not require grad at every decode step, and the fp32 KV
    cache with them). scorer computes s_θt exactly as training computes s_θ, so that r(y) = 0 at
    θ = θ_t: in one process the live model itself (before iteration t trains, it *is* θ_t), under
    autocast with --bf16; under FSDP the gathered copy, whose bf16 weights are those FSDP's bf16
    policy computes with."""
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    if world == 1:  # with --lora the live model's base is already in dtype, and its fresh adapter adds 0
        policy, live = (model if dtype == torch.float32 or cfg.lora else frozen_copy(model, dtype, device)), model
    else:
        policy = live = frozen_copy(model, dtype, device)

    def scorer(seqs):
        with autocast(cfg, device):
            return score(live, seqs, pad_id, cfg.score_tokens)
    return policy, scorer

# -----------------------------------------------------------------------------
# Training: one phase is E epochs of one loss over one dataset, with a fresh optimizer and schedule


def make_optimizer(model, cfg, lr):
    params = [p for p in model.parameters() if p.requires_grad]  # with --lora the adapters alone: no state for the base
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)


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


def make_batch(examples, pad_id, device):
    """A micro-batch of examples -> tensors on the device: tokens, targets and loss mask [B·(1+K), T],
    each example's sequences in a row (the real response first), and ref [B, 1+K], θ_t's stored scores
    of those sequences (self-play only)."""
    tokens, targets, mask = (to_device(t, device) for t in
                             data.collate([s for ex in examples for s in ex["seqs"]], pad_id))
    batch = {"tokens": tokens, "targets": targets, "mask": mask}
    if "ref" in examples[0]:
        batch["ref"] = to_device(torch.tensor([ex["ref"] for ex in examples]), device)   # [B, 1+K]
    return batch


def micro_loss(model, method, cfg, batch, counts, world, beta):
    """The loss of one micro-batch, scaled so that summing over micro-batches and averaging over
    ranks (FSDP's reduce-scatter divides by the world size) gives the gradient of the global batch's
    mean loss, whatever the number of ranks. counts: the global batch's prompts and real-response
    tokens. Returns (scaled loss, metrics summed over the micro-batch, as 0-d tensors: they are read
    back once per step, not once per micro-batch)."""
    hidden = model(batch["tokens"], return_hidden=True)
    targets, mask = batch["targets"], batch["mask"]
    if method == "sft":  # normalised by the response tokens of the whole global batch
        if cfg.sft_loss == "gem":
            loss = gem_loss(hidden, model.output.weight, targets, mask, beta=cfg.gem_beta, h=cfg.gem_h,
                            num_tokens=counts["real_tokens"])
        else:
            loss = sft_loss(hidden, model.output.weight, targets, mask, num_tokens=counts["real_tokens"])
        return loss * world, {"loss": loss.detach()}
    ref = batch["ref"]
    B, K1 = ref.shape
    logp = sequence_logprobs(hidden, model.output.weight, targets, mask).view(B, K1)   # [B, 1+K]
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


def train_phase(model, cfg, run, device, pad_id, stop, method, examples, epochs, lr, beta, batch_size, micro_batch_size,
                seed) -> dict | None:
    """E epochs over examples, resuming at run.step; a checkpoint every cfg.ckpt_every steps. Returns
    the phase's means of the per-step rewards and accuracy (self-play), for the next evaluation's row;
    None where a signal stopped it (stop: Preemption) after an optimizer step, with a checkpoint there."""
    steps_per_epoch = len(examples) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(examples)} examples do not fill one global batch of {batch_size} (--batch-size)")
    total = steps_per_epoch * epochs
    opt = make_optimizer(model, cfg, lr)
    # the phase's per-step rewards and accuracy, summed; mid-phase they go on from the checkpoint's
    sums = resume_phase(run, model, opt) if run.step > 0 else {}
    bar = tqdm(total=total, initial=run.step, desc=f"{run.phase} {run.iteration} ({method})", disable=run.rank != 0, leave=False)
    model.train()
    dropout = any(m.p > 0 for m in lora_modules(model).values())
    order, order_epoch = None, None
    while run.step < total:
        epoch, k = divmod(run.step, steps_per_epoch)
        if order_epoch != epoch:
            order, order_epoch = data.batches(len(examples), batch_size, seed, epoch, run.rank, run.world), epoch
        local_ids = order[k]
        local = [examples[i] for i in local_ids]
        t0 = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(run.step, total, lr, cfg)
        counts = {"prompts": batch_size}  # normalisers over the global batch, whatever the ranks hold
        if method == "sft" or cfg.sft_weight:  # the real responses' tokens (SFT's only response)
            counts["real_tokens"] = all_sum([sum(sum(ex["seqs"][0][1][1:]) for ex in local)], device)[0]
        step_sums, n_tokens = {}, 0
        for i in range(0, len(local), micro_batch_size):
            micro = local[i:i + micro_batch_size]
            if dropout:  # LoRA dropout's masks, keyed by each sequence's number in the data, not its slot here
                K1 = len(micro[0]["seqs"])
                set_dropout_rows(model, row_keys(cfg.seed, run.iteration, run.step,
                                                 [e * K1 + j for e in local_ids[i:i + micro_batch_size] for j in range(K1)]))
            if run.world > 1:  # by default gradients are reduce-scattered once per step, after the last micro-batch
                model.set_requires_gradient_sync(cfg.reduce_every_micro_batch or i + micro_batch_size >= len(local))
            with autocast(cfg, device):
                loss, metrics = micro_loss(model, method, cfg, make_batch(micro, pad_id, device), counts, run.world, beta)
            if run.global_step == cfg.inject_nan_step:
                loss = loss * math.nan
                metrics["loss"] = metrics["loss"] * math.nan
            loss.backward()
            stop.inject_at_step(run.global_step)
            for key, v in metrics.items():
                step_sums[key] = step_sums.get(key, 0.0) + v
            n_tokens += sum(len(ids) for ex in micro for ids, _ in ex["seqs"])
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        keys = sorted(step_sums)
        # the step's one read-back: the metrics summed over the ranks, the gradient norm (the same
        # global value on every rank, so its sum over the ranks / world is itself), and the stop votes
        values = all_sum([step_sums[key] for key in keys] + [n_tokens, norm / run.world] + stop.flags(), device)
        totals = dict(zip(keys + ["tokens"], values))
        norm, stopping = values[len(keys) + 1], stop.agree(values[len(keys) + 2:])
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
                sums[key] = sums.get(key, 0.0) + totals[key]
        bar.update(1)
        bar.set_postfix(loss=f"{totals['loss']:.4f}")
        if run.step % cfg.log_every == 0 or run.step == total:
            extra = {"beta": beta} if method != "sft" else {}
            run.log({"step": run.global_step, "phase": run.phase, "iteration": run.iteration, "method": method,
                     "epoch": epoch, **{k: totals[k] for k in keys}, "lr": opt.param_groups[0]["lr"], **extra,
                     "grad_norm": norm, "tokens/s": totals["tokens"] / (time.time() - t0)})
        if stopping and run.step < total:  # at the phase's end the loop's own checkpoint is the stop's
            stop.before_checkpoint()
            save_checkpoint(run, model, opt, sums)
            bar.close()
            return None
        if run.step % cfg.ckpt_every == 0 and run.step < total:
            save_checkpoint(run, model, opt, sums)
    bar.close()
    return {k: v / total for k, v in sums.items()}

# -----------------------------------------------------------------------------
# The data of a run


def load_data(cfg, rank):
    """(tokenizer, sft chats, self-play chats, held-out chats). Splits that cannot work fail
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
    """What a phase trains on, one shape for every method: per example its sequences, (ids, loss_mask)
    each, the real response first; for self-play the K generated responses follow, and "ref" holds
    θ_t's stored scores of all 1 + K."""
    truncated = 0
    out = []
    if method == "sft":
        for ch in chats:
            ids, m, cut = data.encode_example(tok, *data.split_chat(ch["messages"]), cfg.max_prompt, cfg.max_length)
            out.append({"seqs": [(ids, m)]})
            truncated += cut
    else:
        for r in records:
            seqs = []
            for y in [r["real"]] + r["generated"]:
                ids, m, cut = data.encode_example(tok, r["messages"], y, cfg.max_prompt, cfg.max_length)
                seqs.append((ids, m))
                truncated += cut
            out.append({"seqs": seqs, "ref": [r["ref_real"]] + r["ref_generated"]})
    print0(f"{len(out)} examples, {truncated} sequences truncated (max prompt {cfg.max_prompt}, max length {cfg.max_length})")
    return out

# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_args(argv)
    check_inputs(cfg)
    rank, world, device, mesh = setup_distributed(cfg.shard_size, cfg.dist_timeout)
    stop = Preemption(cfg, rank, world, device)  # from here on a signal waits for the next safe point
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    check_shared_out(cfg.out, rank, world)
    # rank 0 reads the run folder and decides; every rank follows (node-local disks would disagree)
    resuming, stale = from_rank0(lambda: (latest_checkpoint(cfg.out) is not None,
                                          any(d.startswith("iter_") for d in os.listdir(cfg.out))))
    if resuming and not cfg.resume:
        raise SystemExit(f"{cfg.out} already holds a run: pass --resume to continue it, or choose another --out")
    if not resuming and stale:
        # samples drawn by another run must not be trained on as if they were this run's
        raise SystemExit(f"{cfg.out} holds iter_* folders but no checkpoint: choose another --out or remove them")
    run = Run(cfg.out, rank, world)
    if rank == 0 and not resuming:
        open(run.metrics, "w").close()
    tok, sft_chats, selfplay_chats, held_out = load_data(cfg, rank)

    if cfg.model:
        run.phase = "iter"
    if resuming:
        resume(run)  # where the run stood; the weights follow once the model is built
        if rank == 0 and os.path.exists(os.path.join(cfg.out, STOPPED)):
            os.remove(os.path.join(cfg.out, STOPPED))  # it is resumed: no longer a stopped run

    # the model: fp32 master weights; bf16 happens in FSDP's mixed precision or autocast. With --lora
    # the iterations build their own model from θ_t (lora_model), so the full model is built only for
    # the SFT that makes θ_0
    model = None
    if not (cfg.lora and run.phase == "iter"):
        model = build_model(cfg, tok, rank, world, device, mesh)
        print0(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {world} process(es) on {device}")
        if resuming:
            load_weights(run, model)
        elif run.phase == "iter":
            save_checkpoint(run, model)  # θ_0 = --model: from here on every kill can resume

    master = margs = None  # --lora: θ_t in fp32, whole, on rank 0's host, and its shape (theta_master)
    if run.phase == "sft":
        examples = encode_phase_data(tok, cfg, "sft", sft_chats, None)
        if train_phase(model, cfg, run, device, tok.pad_id, stop, "sft", examples, cfg.sft_epochs, cfg.sft_lr, None,
                       cfg.sft_batch_size, cfg.sft_batch_size, seed=cfg.seed) is None:
            stop_run(run, model, stop, world)
        run.phase, run.iteration, run.step = "iter", 0, 0
        if cfg.lora:  # θ_0 leaves the full model for its export, which comes before its checkpoint
            master, margs = theta_master(cfg, 0, model, rank)
            if rank == 0:
                export(model, tok, os.path.join(cfg.out, "iter_0"), state_dict=master)
            barrier()
        save_checkpoint(run, model)
        if stop.stopping:
            stop_run(run, model, stop, world)

    while True:
        t = run.iteration
        policy = scorer = None
        if cfg.lora:  # a fresh adapter on θ_t; resumed mid-iteration, the checkpoint's adapter
            first = margs is None  # this process's first iteration: θ_t from where it lives
            if first:
                master, margs = theta_master(cfg, t, None, rank)
            model = None  # the previous iteration's model (or the SFT's) goes before the next is built
            model = lora_model(cfg, margs, master, t, rank, world, device, mesh)
            if first or t == 0:
                trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                print0(f"LoRA r={cfg.lora} alpha={cfg.lora_alpha:g} on {' '.join(cfg.lora_targets)}: {trainable:,} "
                       f"trainable parameters, {world} process(es) on {device}")
            if run.latest is None:
                save_checkpoint(run, model)  # θ_0 = --model: from here on every kill can resume
            elif run.step > 0 and run.latest == checkpoint_name(run):
                load_weights(run, model)
        if run.step == 0:  # the start of iteration t: evaluate and export θ_t
            model.eval()
            policy, scorer = opponent(model, cfg, world, device, tok.pad_id)
            measured = evaluate(policy, scorer, tok, held_out, cfg, rank, world, exact=not cfg.data, stop=stop)
            if measured is None:  # stopped where it stood: a resumed run evaluates θ_t again
                stop_run(run, model, stop, world)
            result = {"iteration": t, **measured}
            if t > 0:  # what training iteration t - 1 measured
                result.update(run.trained)
            run.summary.append(result)
            run.log(result)
            print0(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
            if rank == 0:
                folder = os.path.join(cfg.out, f"iter_{t}")
                if not cfg.lora:
                    export(policy, tok, folder, source_dir=cfg.model)
                elif t == 0 and cfg.model:  # --lora exports θ_t as it is made (export_merged); θ_0 is --model's, in fp32
                    export(policy, tok, folder, source_dir=cfg.model, state_dict=master)
                # what θ_t says: its greedy replies to the first held-out prompts; the first one printed
                samples = greedy_samples(policy, tok, held_out, cfg)
                data.save_jsonl(os.path.join(folder, "samples.jsonl"), samples)
                print(f"θ_{t} on {samples[0]['messages'][-1]['content']!r}: {samples[0]['reply']!r}", flush=True)
            barrier()
        if t == cfg.iterations:
            break
        records = None
        if cfg.method in SELF_PLAY:
            if policy is None:
                model.eval()
                policy, scorer = opponent(model, cfg, world, device, tok.pad_id)
            records, changed = self_play_round(policy, scorer, tok, selfplay_chats, cfg, t, rank, world, stop)
            if records is None:  # stopped after a round of chunks, which are on disk
                stop_run(run, model, stop, world)
            # the share of samples whose text re-encodes to other ids than were drawn; a run resumed mid-training
            # logged it before its checkpoint
            if changed is not None and run.step == 0:
                run.log({"iteration": t, "selfplay/reencoded_changed": changed})
                print0(f"iteration {t}: {changed:.2%} of the generated responses re-encode to other ids than were sampled")
        del policy, scorer
        examples = encode_phase_data(tok, cfg, cfg.method, selfplay_chats, records)
        means = train_phase(model, cfg, run, device, tok.pad_id, stop, cfg.method, examples, cfg.epochs, at(cfg.lr, t),
                            at(cfg.beta, t), cfg.batch_size, cfg.micro_batch_size, seed=cfg.seed * 1000 + t + 1)
        if means is None:
            stop_run(run, model, stop, world)
        if cfg.lora:  # θ_{t+1} = θ_t + (α/R) B A in fp32, exported before the checkpoint that names iteration t + 1
            adapters = adapter_state(model)
            if rank == 0:
                merge_weights(master, adapters, cfg.lora_alpha / cfg.lora)  # in place: θ_t becomes θ_{t+1}
                export_merged(cfg, margs, master, adapters, tok, t)
            barrier()
        run.trained, run.iteration, run.step = means, t + 1, 0
        save_checkpoint(run, model)
        if stop.stopping:
            stop_run(run, model, stop, world)

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
