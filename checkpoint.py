"""
The run's state on disk: resume checkpoints (torch.distributed.checkpoint, any number of ranks) and
the exports of θ_t that the ecosystem opens.

    OUT/metrics.jsonl        one JSON object a logged step or evaluation (Run.log)
    OUT/ckpt/latest          the name of the newest whole checkpoint, switched by atomic rename
    OUT/ckpt/<phase><t>_step<k>/   DCP shards of weights (+ optimizer mid-phase) and run.json
    OUT/iter_t/              θ_t in the Hugging Face layout and its tokenizer files (export)
    OUT/iter_t/adapter/      with --lora: the adapter iteration t-1 trained, in PEFT's format

With --lora a checkpoint of an iteration holds the adapters alone (and their optimizer state): the
frozen base is θ_t, which is on disk already, in OUT/iter_t (or --model for θ_0).

A run killed at any moment resumes from `latest` and ends where an uninterrupted run ends: the
checkpoint holds where the run was (phase, iteration, step), what it had measured, and how long
metrics.jsonl was, so lines logged after it are dropped and logged again.
"""
import json
import os
import shutil

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from model import save_model
from parallel import barrier, from_rank0, print0
from tokenizer import export_tokenizer


class Run:
    """Where the run is (phase, iteration, step), what it has measured (trained: the means of the phase
    trained last, for the next evaluation's row; summary: every evaluation row), and the metrics log."""

    def __init__(self, out, rank, world):
        self.rank, self.world, self.out = rank, world, out
        self.phase, self.iteration, self.step, self.global_step = "sft", 0, 0, 0
        self.trained, self.summary, self.latest = {}, [], None
        self.metrics = os.path.join(out, "metrics.jsonl")

    def state(self):
        return {k: getattr(self, k) for k in ("phase", "iteration", "step", "global_step", "trained", "summary")}

    def log(self, record):
        if self.rank == 0:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")


def model_state(model) -> dict:
    """What a checkpoint holds of the model: every weight, or with LoRA adapters on it the adapters
    alone (the frozen base is θ_t, exported already)."""
    state = get_model_state_dict(model)
    adapters = {k: v for k, v in state.items() if ".lora_" in k}
    return adapters or state


def checkpoint_name(run):
    return f"{run.phase}{run.iteration}_step{run.step}"


def save_checkpoint(run, model, opt=None, phase_sums=None):
    """Weights (and, mid-phase, the optimizer and the phase's metric sums so far) through
    torch.distributed.checkpoint, each rank its shard, into a new folder; then `latest` is switched to
    it with an atomic rename, so a kill at any moment leaves the previous checkpoint whole. No RNG state
    is saved: nothing draws from the global RNG (batches, sampling and initialisation have seeded
    generators of their own), so any number of ranks can resume any checkpoint."""
    root = os.path.join(run.out, "ckpt")
    name = checkpoint_name(run)
    path = os.path.join(root, name)
    if run.rank == 0 and os.path.exists(path):
        shutil.rmtree(path)
    barrier()
    state = {"model": model_state(model)}
    adapters_only = any(".lora_" in k for k in state["model"])
    if opt is not None:
        state["optim"] = get_optimizer_state_dict(model, opt)
    dcp.save(state, checkpoint_id=path)
    barrier()
    if run.rank == 0:
        size = os.path.getsize(run.metrics) if os.path.exists(run.metrics) else 0
        with open(os.path.join(path, "run.json"), "w") as f:
            json.dump({**run.state(), "phase_sums": phase_sums or {}, "metrics_bytes": size,
                       "adapters_only": adapters_only}, f)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        for old in os.listdir(root):
            if old not in (name, "latest"):
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    run.latest = name
    barrier()


def latest_checkpoint(out):
    marker = os.path.join(out, "ckpt", "latest")
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        return os.path.join(out, "ckpt", f.read().strip())


def read_run_json(path):
    with open(os.path.join(path, "run.json")) as f:
        return json.load(f)


def resume_phase(run, model, opt) -> dict:
    """Mid-phase: the optimizer's state from the latest checkpoint (DCP reshards it to this run's
    ranks), and the phase's metric sums up to it, which the phase's means go on from."""
    path = from_rank0(lambda: latest_checkpoint(run.out))
    state = {"optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    set_optimizer_state_dict(model, opt, state["optim"])
    return from_rank0(lambda: read_run_json(path)["phase_sums"])


def resume(run, model=None):
    """Put the run back where the latest checkpoint left it, and the weights with it (or later, with
    load_weights, once the model exists: with --lora it is built from θ_t for the iteration the run is
    in); drop the metric lines logged after it (they will be logged again). Rank 0 reads where."""
    path = from_rank0(lambda: latest_checkpoint(run.out))
    saved = from_rank0(lambda: read_run_json(path))
    for k in run.state():
        setattr(run, k, saved[k])
    run.latest = os.path.basename(path)
    if model is not None:
        load_weights(run, model)
    if run.rank == 0 and os.path.exists(run.metrics):
        with open(run.metrics, "r+") as f:
            f.truncate(saved["metrics_bytes"])
    print0(f"resumed from {path}: {run.phase} {run.iteration}, step {run.step}")


def load_weights(run, model):
    """The model's weights (with --lora: its adapters) from the latest checkpoint, every rank its shards."""
    path = from_rank0(lambda: latest_checkpoint(run.out))
    state = {"model": model_state(model)}
    wanted, saved = any(".lora_" in k for k in state["model"]), from_rank0(lambda: read_run_json(path).get("adapters_only"))
    if saved is not None and wanted != saved:
        raise SystemExit(f"{path}: this checkpoint holds {'LoRA adapters' if saved else 'full weights'}, and this run "
                         f"{'trains LoRA adapters' if wanted else 'trains every weight'}: resume with the flags the run "
                         "started with (--lora and its settings)")
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    barrier()


def export(policy, tok, folder, source_dir=None, state_dict=None):
    """θ_t in the Hugging Face layout (sharded above 5 GB) with its tokenizer files, into folder
    (OUT/iter_t/). Files only: what the model says (samples.jsonl) is the loop's business. Rank 0 only.
    state_dict: the weights to write instead of policy's (--lora: the fp32 master)."""
    save_model(policy, folder, state_dict=state_dict)
    # the tokenizer files transformers, vLLM and lm-eval read (the chat template included); --model's own are copied
    export_tokenizer(tok, folder, source_dir=source_dir, model_max_length=policy.args.max_seq_len)
