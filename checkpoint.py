"""
The run's state on disk: resume checkpoints (torch.distributed.checkpoint, any number of ranks) and
the exports of θ_t that the ecosystem opens.

    OUT/metrics.jsonl        one JSON object a logged step or evaluation (Run.log)
    OUT/ckpt/latest          the name of the newest whole checkpoint, switched by atomic rename
    OUT/ckpt/<phase><t>_step<k>/   DCP shards of weights (+ optimizer mid-phase) and run.json
    OUT/iter_t/              θ_t in the Hugging Face layout, its tokenizer files, samples.jsonl

A run killed at any moment resumes from `latest` and ends where an uninterrupted run ends: the
checkpoint holds where the run was (phase, iteration, step), what it had measured, and how long
metrics.jsonl was, so lines logged after it are dropped and logged again.
"""
import json
import os
import shutil

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

import data
from model import save_model
from parallel import barrier, from_rank0, print0
from selfplay import greedy_samples
from tokenizer import export_tokenizer


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
    into a new folder; then `latest` is switched to it with an atomic rename, so a kill at any moment
    leaves the previous checkpoint whole. No RNG state is saved: nothing draws from the global RNG
    (batches, sampling and initialisation have seeded generators of their own), so any number of
    ranks can resume any checkpoint."""
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


def load_optimizer(cfg, model, opt):
    """The optimizer's state from the latest checkpoint (DCP reshards it to this run's ranks)."""
    state = {"optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=from_rank0(lambda: latest_checkpoint(cfg)))
    set_optimizer_state_dict(model, opt, state["optim"])


def resume(cfg, run, model):
    """Put the run and the weights back where the latest checkpoint left them; drop the metric lines
    logged after it (they will be logged again). Rank 0 reads where, every rank loads its shards."""
    path = from_rank0(lambda: latest_checkpoint(cfg))

    def read():
        with open(os.path.join(path, "run.json")) as f:
            return json.load(f)
    saved = from_rank0(read)
    for k in run.state():
        setattr(run, k, saved[k])
    run.latest = os.path.basename(path)
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    barrier()
    if run.rank == 0 and os.path.exists(run.metrics):
        with open(run.metrics, "r+") as f:
            f.truncate(saved["metrics_bytes"])
    print0(f"resumed from {path}: {run.phase} {run.iteration}, step {run.step}")


def export(policy, tok, held_out, cfg, t):
    """OUT/iter_t/: θ_t in the Hugging Face layout (sharded above 5 GB) with its tokenizer files, and its greedy replies to
    the first held-out prompts (samples.jsonl; the first one is printed). Rank 0 only."""
    folder = os.path.join(cfg.out, f"iter_{t}")
    save_model(policy, folder)
    # the tokenizer files transformers, vLLM and lm-eval read (the chat template included); --model's own are copied
    export_tokenizer(tok, folder, source_dir=cfg.model, model_max_length=policy.args.max_seq_len)
    samples = greedy_samples(policy, tok, held_out, cfg)
    data.save_jsonl(os.path.join(folder, "samples.jsonl"), samples)
    first = samples[0]
    print(f"θ_{t} on {first['messages'][-1]['content']!r}: {first['reply']!r}", flush=True)
