"""
What the benchmarks share (bench/logprob.py, generate.py, round.py, memory.py): the machine they
ran on, a timer and a peak-memory meter, a runner for measurements in a fresh process, the naive
log-prob they are measured against, and the model pairs (ours and transformers' on the same
weights). Not a command of its own.

A figure means little without the machine that made it, so every benchmark prints `machine()`
(and the load average, before and after: on a shared CPU only ratios measured in one run mean
anything).
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the project's modules

from model import ModelArgs, Transformer, load_model, save_model  # noqa: E402

# -----------------------------------------------------------------------------
# The random models of generate.py and round.py when no --model is given; the window never binds at
# their lengths. On a CPU, Mistral's shape at toy width with the real 32k vocabulary (so the LM head
# weighs in as it does at 7B); on CUDA, a ~1B-parameter Mistral.
CPU_ARGS = ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, hidden_dim=768,
                     vocab_size=32000, sliding_window=4096, max_seq_len=4096)   # 20M parameters
GPU_ARGS = ModelArgs(dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, head_dim=128, hidden_dim=5632,
                     vocab_size=32000, sliding_window=4096, max_seq_len=4096)   # 0.89B parameters
# -----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# The machine


def _cpuinfo() -> tuple[str, set]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; ("unknown CPU", {}) where there is none."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown CPU":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, flags


def native_bf16() -> list[str]:
    """The CPU's bf16 instructions (AVX-512 BF16, AMX), [] if none: without them torch emulates bf16
    matmuls, about 100x slower, and runs other kernels than a GPU does."""
    return sorted(_cpuinfo()[1] & {"avx512_bf16", "amx_bf16"})


def cpu_line() -> str:
    """The CPU in the words results quote: model name, cores, native bf16 or not."""
    bf16 = native_bf16()
    return f"{_cpuinfo()[0]}, {os.cpu_count()} cores, native bf16: {'yes (' + ', '.join(bf16) + ')' if bf16 else 'no'}"


def machine(device: torch.device) -> str:
    """cpu_line() with the torch threads and OpenMP's wait policy (see README: on a shared CPU set
    OMP_WAIT_POLICY=PASSIVE), and the GPU where one is used."""
    text = (f"cpu: {cpu_line()}; {torch.get_num_threads()} torch threads (OMP_WAIT_POLICY "
            f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}); torch {torch.__version__}")
    if device.type == "cuda":
        text += f"\ngpu: {torch.cuda.get_device_name(device)}"
    return text


def bf16_skip_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a bf16 cell is skipped on this CPU, or None when it runs."""
    if device.type == "cpu" and dtype == torch.bfloat16 and not native_bf16():
        return ("skipped bf16: this CPU has no avx512_bf16 or amx_bf16, so torch would emulate every bf16 "
                "matmul, far slower than fp32 (an hour where fp32 takes minutes)")
    return None


def load_avg() -> str:
    """The 1-minute load average: other jobs on the cores before a run, and this run's own threads after."""
    return f"{os.getloadavg()[0]:.1f}"


# -----------------------------------------------------------------------------
# Time and memory


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """time.perf_counter() once the device has finished its queued work."""
    sync(device)
    return time.perf_counter()


def race(fns: dict, runs: int, device: torch.device) -> dict:
    """Median seconds of each fn: one warm-up each, then the fns take turns, so that a change in the
    machine's load slows all of them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t = clock(device)
            fn()
            times[name].append(clock(device) - t)
    return {name: statistics.median(t) for name, t in times.items()}


class Meter:
    """Bytes resident in this process (CPU) or allocated by torch (CUDA), and their peak since reset().

    On the CPU the peak is the kernel's high-water mark VmHWM, which writing 5 to /proc/self/clear_refs
    resets to the current VmRSS. Freed blocks only leave the process if glibc returned them, so
    measure in a process started with MALLOC_MMAP_THRESHOLD_ (run_child(..., mmap=True)): every
    allocation above it is its own mmap, unmapped when freed."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    def now(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else self._status("VmRSS")

    def reset(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                                       # VmHWM <- VmRSS

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM")

    def above(self, fn) -> int:
        """Bytes one call of fn adds at its peak on top of what was there before it."""
        self.reset()
        base = self.now()
        fn()
        return self.peak() - base


def run_child(argv: list, mmap: bool = False, nproc: int = 0) -> dict:
    """Run `python ARGV` (under torchrun with nproc processes when nproc > 0) in a fresh process and
    return the JSON object on the last line of its stdout. A fresh process per measurement: a peak
    measured after other cells ran would include what they left behind. mmap=True serves every
    allocation over 1 MiB with mmap, so freed memory leaves the process and VmRSS is honest (it also
    makes every such temporary a fresh mmap and its page faults: time is measured without it)."""
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                                   if nproc else [])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20)) if mmap else dict(os.environ)
    out = subprocess.run(launcher + [str(a) for a in argv], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -----------------------------------------------------------------------------
# What we are measured against


def naive_logprobs(hidden, weight, targets, mask):
    """s(y) as a user writes it: the full [B, T, V] logits, log_softmax in fp32, gathered and summed."""
    logits = hidden @ weight.t()                                                   # [B, T, V]
    logp = torch.log_softmax(logits.float(), dim=-1)                               # [B, T, V] fp32
    return (logp.gather(-1, targets[..., None]).squeeze(-1) * mask).sum(-1)        # [B]


def model_pair(args: ModelArgs | None, dtype: torch.dtype, device: torch.device, folder: str | None = None):
    """(ours, transformers') in eval mode on the same weights: a checkpoint folder's (both load it, as a
    user would), or random ones of shape args, saved by save_model and loaded by transformers."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if folder:
        model = load_model(folder, dtype=dtype)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    else:
        model = Transformer(args).init_weights(0, std=0.02).to(dtype)
        with tempfile.TemporaryDirectory() as d:
            save_model(model, d)
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    return model.to(device).eval(), hf.to(device).eval()


def describe_model(args: ModelArgs, n_params: int, folder: str | None) -> str:
    where = f"{folder} ({args.model_type})" if folder else "random weights"
    return (f"model: {where}, {n_params / 1e6:.0f}M parameters, dim {args.dim}, {args.n_layers} layers, "
            f"{args.n_heads} heads ({args.n_kv_heads} KV), head_dim {args.head_dim}, hidden {args.hidden_dim}, "
            f"vocab {args.vocab_size}{', tied embeddings' if args.tie_embeddings else ''}")
