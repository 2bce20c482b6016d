"""Sequence log-probs through the LM head: time and peak memory of forward + backward.

    python bench/logprob.py                                # the table (about 6 minutes on 2 cores)
    python bench/logprob.py --chunk 512 --vocab-block 1024  # another tile shape for space

Three ways to get s(y) = Σ_t log softmax(W h_t)[y_t] per row, and its gradients:
  naive        logits = h @ W.T in the input dtype, log_softmax in fp32, gather, masked sum
  torch-chunk  torch's own F.linear_cross_entropy(h, W, y, reduction='none',
               options=torch.nn.LinearCrossEntropyOptions()); its per-token loss is −log p
  space        space.sequence_logprobs

Each backpropagates the same random per-row upstream gradient g [B] (a real loss's dL/ds differs
per row), with N = B·T = 4096 tokens, every one of them scored (mask all ones, the worst case),
d = 512, V = 32000, in fp32 and in bf16.

Memory: each (variant, dtype) runs in a fresh process. After the inputs exist and one warm-up
step (so one-off library set-up is not counted), the kernel's peak-RSS counter is reset
(/proc/self/clear_refs) and the peak resident memory of one forward + backward is VmHWM minus
the resident memory just before it; the parameter gradients it creates count. glibc is told
to serve every allocation over 1 MiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed blocks go
back to the kernel and the warm-up's freed memory cannot hide in the baseline.

Time: one process per dtype runs the three variants in turn, REPEATS rounds after a warm-up,
and reports each one's median; taking turns means a change in machine load hits all three.
Run it on an idle machine: with other jobs on the cores, every one of OpenMP's per-op thread
barriers waits for a descheduled thread, which costs the tiled path (hundreds of small ops)
far more than the naive one (a handful of big ones). The 1-minute load average is printed
before (other jobs) and after (which includes this benchmark's own threads).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import space  # noqa: E402

# -----------------------------------------------------------------------------
B, T, D, V = 8, 512, 512, 32000
REPEATS = 5
VARIANTS = ["naive", "torch-chunk", "space"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# -----------------------------------------------------------------------------


def naive(hidden, weight, targets, mask):
    logits = hidden @ weight.t()                                                   # [B, T, V]
    logp = torch.log_softmax(logits.float(), dim=-1)                               # [B, T, V] fp32
    return (logp.gather(-1, targets[..., None]).squeeze(-1) * mask).sum(-1)        # [B]


def torch_chunk(hidden, weight, targets, mask):
    nll = F.linear_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten(), reduction="none",
                                 options=torch.nn.LinearCrossEntropyOptions())     # [B*T]
    return -(nll.view(mask.shape).float() * mask).sum(-1)                          # [B]


def space_logprobs(hidden, weight, targets, mask, chunk_size):
    return space.sequence_logprobs(hidden, weight, targets, mask, chunk_size=chunk_size)


def status_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def make_inputs(dtype_name):
    torch.manual_seed(0)
    dtype = DTYPES[dtype_name]
    hidden = torch.randn(B, T, D, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, D) * D**-0.5).to(dtype).requires_grad_()
    targets = torch.randint(V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    g = torch.randn(B)                                                             # dL/ds per row
    return hidden, weight, targets, mask, g


def step(fn, hidden, weight, targets, mask, g):
    """One forward + backward with the per-row upstream gradient g; returns seconds."""
    hidden.grad = weight.grad = None
    t0 = time.perf_counter()
    (fn(hidden, weight, targets, mask) * g).sum().backward()
    return time.perf_counter() - t0


def variant_fn(variant, chunk_size):
    if variant == "space":
        return lambda h, w, y, m: space.sequence_logprobs(h, w, y, m, chunk_size=chunk_size)
    return {"naive": naive, "torch-chunk": torch_chunk}[variant]


def measure_memory(variant, dtype_name, chunk_size):
    """In a fresh process: peak resident MiB of one forward + backward above what was resident."""
    inputs = make_inputs(dtype_name)
    fn = variant_fn(variant, chunk_size)
    step(fn, *inputs)                                                              # warm-up
    inputs[0].grad = inputs[1].grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                                               # VmHWM <- VmRSS
    base = status_mib("VmRSS")
    step(fn, *inputs)
    return status_mib("VmHWM") - base


def measure_time(dtype_name, chunk_size):
    """Median ms per variant, the variants taking turns so a change in machine load hits all."""
    inputs = make_inputs(dtype_name)
    fns = {v: variant_fn(v, chunk_size) for v in VARIANTS}
    for fn in fns.values():
        step(fn, *inputs)                                                          # warm-up
    times = {v: [] for v in VARIANTS}
    for _ in range(REPEATS):
        for v, fn in fns.items():
            times[v].append(step(fn, *inputs))
    return {v: 1000 * statistics.median(ts) for v, ts in times.items()}


def child(args, *what):
    """Run this file again in a fresh process and return the JSON it prints."""
    cmd = [sys.executable, __file__, "--chunk", str(args.chunk), "--vocab-block", str(args.vocab_block), *what]
    # Memory only: the mmap threshold makes freed blocks leave the process, so VmHWM is honest, but
    # it also makes every tile-sized temporary a fresh mmap and page faults; timing runs without it.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20)) if what[0] == "--memory" else dict(os.environ)
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunk", type=int, default=space.sequence_logprobs.__defaults__[0],
                    help="chunk_size (tokens per tile) for sequence_logprobs")
    ap.add_argument("--vocab-block", type=int, default=space.VOCAB_BLOCK, help="space.VOCAB_BLOCK")
    ap.add_argument("--memory", nargs=2, metavar=("VARIANT", "DTYPE"), help=argparse.SUPPRESS)
    ap.add_argument("--time", metavar="DTYPE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    space.VOCAB_BLOCK = args.vocab_block
    if args.memory:
        return print(json.dumps(measure_memory(*args.memory, args.chunk)))
    if args.time:
        return print(json.dumps(measure_time(args.time, args.chunk)))

    print(f"N = {B}x{T} = {B * T} tokens (all scored), d = {D}, V = {V}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; space tiles {args.chunk} tokens x {args.vocab_block} vocab")
    print(f"load average before: {open('/proc/loadavg').read().split()[0]}")
    print(f"{'variant':<12} {'dtype':<5} {'time ms':>9} {'x naive':>8} {'peak MiB':>9} {'% naive':>8}")
    for dtype_name in DTYPES:
        ms = child(args, "--time", dtype_name)
        peak = {v: child(args, "--memory", v, dtype_name) for v in VARIANTS}
        for v in VARIANTS:
            print(f"{v:<12} {dtype_name:<5} {ms[v]:>9.0f} {ms[v] / ms['naive']:>8.2f} "
                  f"{peak[v]:>9.1f} {100 * peak[v] / peak['naive']:>7.1f}%")
    print(f"load average after: {open('/proc/loadavg').read().split()[0]} "
          f"(this includes the benchmark's own {torch.get_num_threads()} busy threads)")


if __name__ == "__main__":
    main()
