"""
The run's state on disk: resume checkpoints (torch.distributed.checkpoint, any number of ranks), the
exports of θ_t that the ecosystem opens, and a stop on a signal that leaves a checkpoint where the run
stands (Preemption, stop_run).

    OUT/metrics.jsonl        one JSON object a logged step or evaluation (Run.log)
    OUT/ckpt/latest          the name of the newest whole checkpoint, switched by atomic rename
    OUT/ckpt/<phase><t>_step<k>/   DCP shards of weights (+ optimizer mid-phase) and run.json
    OUT/iter_t/              θ_t in the Hugging Face layout and its tokenizer files (export)
    OUT/iter_t/adapter/      with --lora: the adapter iteration t-1 trained, in PEFT's format
    OUT/stopped.json         the run stopped on a signal and can be resumed (where, and the command)

With --lora a checkpoint of an iteration holds the adapters alone (and their optimizer state): the
frozen base is θ_t, which is on disk already, in OUT/iter_t (or --model for θ_0).

A run killed at any moment resumes from `latest` and ends where an uninterrupted run ends: the
checkpoint holds where the run was (phase, iteration, step), what it had measured, and how long
metrics.jsonl was, so lines logged after it are dropped and logged again.
"""
import json
import os
import shlex
import shutil
import signal
import sys
import time

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from model import save_model
from parallel import all_sum, barrier, from_rank0, print0
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


# -----------------------------------------------------------------------------
# Preemption: a signal stops the run at the next safe point, every rank at the same one
STOPPED = "stopped.json"  # OUT/stopped.json: the run stopped on a signal and can be resumed


class Preemption:
    """SIGTERM (a cluster preempting the job: SLURM, Kubernetes) or SIGUSR1 (SLURM's --signal, ahead of
    the time limit) asks the run to stop. The handler only notes it; the loop asks at its safe points
    whether any rank was signalled, through a collective that every rank reaches at the same points
    (Megatron-LM's --exit-signal-handler does the same), so all stop together: in training after the
    current optimizer step (the flags ride on the step's one read-back, no extra collective), in
    generation after the current round of chunks, in evaluation where it stands. A rank that stopped
    alone would leave the others waiting in their next collective until --dist-timeout. Signals after
    the first are noted and ignored: the checkpoint being written is never cut short.

    The hidden test flags make the run signal itself: --inject-signal-step K (rank 0, during global
    step K; under torchrun to its agent, which forwards it to every worker), --inject-signal-check N
    (the last rank alone, just before the N-th check outside training) and --inject-second-signal (each
    rank again as its stop's checkpoint starts)."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, cfg, rank, world, device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.received = None   # the first signal this rank got
        self.stopping = None   # the signal the ranks agreed to stop on (the first one any rank got)
        self.checks = 0
        for s in self.SIGNALS:
            signal.signal(s, self.handler)

    def handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            print(f"rank {self.rank}: {name}: stopping at the next safe point, with a checkpoint", flush=True)
        else:
            print(f"rank {self.rank}: {name} again: ignored, the run is already stopping", flush=True)

    def flags(self) -> list[float]:
        """This rank's vote, one number per signal, to be summed over the ranks."""
        return [float(self.received == s) for s in self.SIGNALS]

    def agree(self, summed) -> bool:
        """summed: flags() summed over the ranks. True on every rank if any rank was signalled."""
        for s, n in zip(self.SIGNALS, summed):
            if n > 0 and self.stopping is None:
                self.stopping = s
        return self.stopping is not None

    def __call__(self) -> bool:
        """A safe point outside training (one round of generation or evaluation chunks): a collective."""
        self.checks += 1
        if self.checks == self.cfg.inject_signal_check and self.rank == self.world - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.agree(all_sum(self.flags(), self.device))

    def inject_at_step(self, global_step):
        """--inject-signal-step: rank 0 sends SIGTERM, under torchrun to its agent, and waits until the
        signal is back with itself, so the stop lands at this step whatever the forwarding's delay."""
        if global_step != self.cfg.inject_signal_step or self.rank != 0:
            return
        os.kill(os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else os.getpid(), signal.SIGTERM)
        deadline = time.time() + 60
        while self.received is None and time.time() < deadline:
            time.sleep(0.01)

    def before_checkpoint(self):
        if self.cfg.inject_second_signal:
            os.kill(os.getpid(), signal.SIGTERM)


def resume_command(world):
    """The command line that continues this run: the same flags with --resume (hidden test flags left out)."""
    args, words = [], iter(sys.argv[1:])
    for a in words:
        if a in ("--inject-nan-step", "--inject-signal-step", "--inject-signal-check"):
            next(words, None)  # and its value
        elif not a.startswith("--inject-"):
            args.append(a)
    args += [] if "--resume" in args else ["--resume"]
    if world == 1:
        return shlex.join([os.path.basename(sys.executable), sys.argv[0], *args])
    nodes, local = world // int(os.environ.get("LOCAL_WORLD_SIZE", world)), os.environ.get("LOCAL_WORLD_SIZE", world)
    launcher = ["torchrun", "--nproc_per_node", str(local)] + (["--nnodes", str(nodes)] if nodes > 1 else [])
    return shlex.join([*launcher, sys.argv[0], *args]) + (" (on every node, with its rendezvous flags)" if nodes > 1 else "")


def stop_run(run, model, stop, world):
    """The ranks agreed to stop: make sure the latest checkpoint is where the run stands (mid-phase,
    train_phase has written it with the optimizer; at an iteration's start it exists already), record
    the stop in OUT/stopped.json, say where and how to resume, and exit with 128 + the signal's number,
    a shell's status for a process the signal ended (under torchrun the agent exits 1 whatever the
    workers return, so a job script reads stopped.json instead)."""
    if run.latest != checkpoint_name(run):
        stop.before_checkpoint()
        save_checkpoint(run, model)
    name = signal.Signals(stop.stopping).name
    if run.rank == 0:
        ckpt = os.path.join(run.out, "ckpt", run.latest)
        command = resume_command(world)
        record = {"signal": name, "phase": run.phase, "iteration": run.iteration, "step": run.step,
                  "global_step": run.global_step, "checkpoint": ckpt, "resume": command}
        with open(os.path.join(run.out, STOPPED + ".tmp"), "w") as f:
            json.dump(record, f, indent=1)
        os.replace(os.path.join(run.out, STOPPED + ".tmp"), os.path.join(run.out, STOPPED))
        print(f"stopped by {name} at {run.phase} {run.iteration}, step {run.step} (global step {run.global_step}); "
              f"checkpoint {ckpt}\nresume with: {command}", flush=True)
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(128 + stop.stopping)
