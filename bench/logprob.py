"""Sequence log-probs through the LM head: time and peak memory of forward + backward.

    python bench/logprob.py                                 # CPU: the table
    python bench/logprob.py --device cuda                   # GPU: realistic sizes (the default where there is one)
    python bench/logprob.py --chunk 512 --vocab-block 1024  # another tile shape for space

Three ways to get s(y) = Σ_t log softmax(W h_t)[y_t] per row, and its gradients:
  naive        logits = h @ W.T in the input dtype, log_softmax in fp32, gather, masked sum
  torch-chunk  torch's own F.linear_cross_entropy(h, W, y, reduction='none',
               options=torch.nn.LinearCrossEntropyOptions()); its per-token loss is −log p
  space        space.sequence_logprobs, with the tile shape of space.TILE for the device

Each backpropagates the same random per-row upstream gradient g [B] (a real loss's dL/ds differs
per row), with every token scored (mask all ones, the worst case), V = 32000, in fp32 and in bf16.
On CPU: N = B·T = 8 x 512 = 4096 tokens and d = 512. On CUDA: N = 8 x 2048 = 16384 tokens and
d = 4096, Mistral-7B's head.

Memory on CUDA: torch.cuda.max_memory_allocated over one forward + backward, minus what was
allocated just before it (the inputs); the parameter gradients it creates count. Memory on CPU:
each (variant, dtype) runs in a fresh process. After the inputs exist and one warm-up step (so
one-off library set-up is not counted), the kernel's peak-RSS counter is reset
(/proc/self/clear_refs) and the peak is VmHWM minus the resident memory just before the step.
glibc is told to serve every allocation over 1 MiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed
blocks go back to the kernel and the warm-up's freed memory cannot hide in the baseline.

Time: one process per dtype runs the three variants in turn, REPEATS rounds after a warm-up,
and reports each one's median; taking turns means a change in machine load hits all three.
On CPU, run it on an idle machine: with other jobs on the cores, every one of OpenMP's per-op
thread barriers waits for a descheduled thread, which costs the tiled path (hundreds of small
ops) far more than the naive one (a handful of big ones). The 1-minute load average is printed
before (other jobs) and after (which includes this benchmark's own threads). A CPU without native
bf16 (neither avx512_bf16 nor amx_bf16 in /proc/cpuinfo) emulates bf16 matmuls, about 100x
slower, so there the bf16 rows are skipped with a note.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import common
import space

# -----------------------------------------------------------------------------
SIZES = {"cpu": (8, 512, 512, 32000), "cuda": (8, 2048, 4096, 32000)}   # B, T, d, V
REPEATS = {"cpu": 5, "cuda": 10}
VARIANTS = ["naive", "torch-chunk", "space"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# -----------------------------------------------------------------------------


def torch_chunk(hidden, weight, targets, mask):
    nll = F.linear_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten(), reduction="none",
                                 options=torch.nn.LinearCrossEntropyOptions())     # [B*T]
    return -(nll.view(mask.shape).float() * mask).sum(-1)                          # [B]


def make_inputs(dtype_name, device):
    B, T, D, V = SIZES[device]
    g = torch.Generator(device).manual_seed(0)
    dtype = DTYPES[dtype_name]
    hidden = torch.randn(B, T, D, generator=g, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g, device=device) * D**-0.5).to(dtype).requires_grad_()
    targets = torch.randint(V, (B, T), generator=g, device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    upstream = torch.randn(B, generator=g, device=device)                          # dL/ds per row
    return hidden, weight, targets, mask, upstream


def step(fn, hidden, weight, targets, mask, upstream):
    """One forward + backward with the per-row upstream gradient; returns seconds."""
    hidden.grad = weight.grad = None
    sync = torch.cuda.synchronize if hidden.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    (fn(hidden, weight, targets, mask) * upstream).sum().backward()
    sync()
    return time.perf_counter() - t0


def variant_fn(variant, chunk_size, vocab_block):
    if variant == "space":
        return lambda h, w, y, m: space.sequence_logprobs(h, w, y, m, chunk_size=chunk_size, vocab_block=vocab_block)
    return {"naive": common.naive_logprobs, "torch-chunk": torch_chunk}[variant]


def measure_cpu_memory(variant, dtype_name, args):
    """In a fresh process: peak resident MiB of one forward + backward above what was resident."""
    inputs = make_inputs(dtype_name, "cpu")
    fn = variant_fn(variant, args.chunk, args.vocab_block)
    step(fn, *inputs)                                                              # warm-up
    inputs[0].grad = inputs[1].grad = None
    return common.Meter(torch.device("cpu")).above(lambda: step(fn, *inputs)) / 2**20


def measure(dtype_name, args):
    """Median ms per variant, the variants taking turns so a change in machine load hits all;
    on CUDA also each one's peak MiB allocated by one step (exact, so no fresh process needed)."""
    inputs = make_inputs(dtype_name, args.device)
    fns = {v: variant_fn(v, args.chunk, args.vocab_block) for v in VARIANTS}
    peak = {}
    for v, fn in fns.items():
        step(fn, *inputs)                                                          # warm-up
        if args.device == "cuda":
            inputs[0].grad = inputs[1].grad = None
            peak[v] = common.Meter(torch.device("cuda")).above(lambda: step(fn, *inputs)) / 2**20
    times = {v: [] for v in VARIANTS}
    for _ in range(REPEATS[args.device]):
        for v, fn in fns.items():
            times[v].append(step(fn, *inputs))
    return {"ms": {v: 1000 * statistics.median(ts) for v, ts in times.items()}, "peak": peak}


def child(args, *what):
    """Run this file again in a fresh process and return the JSON it prints (the memory cells with
    glibc's mmap threshold: see common.run_child)."""
    return common.run_child([__file__, "--device", args.device, "--chunk", args.chunk, "--vocab-block",
                             args.vocab_block, *what], mmap=what[0] == "--memory")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where to run (default: cuda when there is one); sets the sizes and space's tiles")
    ap.add_argument("--chunk", type=int, help="tokens per tile for space (default: space.TILE[device])")
    ap.add_argument("--vocab-block", type=int, help="vocabulary entries per tile (default: space.TILE[device])")
    ap.add_argument("--memory", nargs=2, metavar=("VARIANT", "DTYPE"), help=argparse.SUPPRESS)
    ap.add_argument("--time", metavar="DTYPE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.chunk = args.chunk or space.TILE[args.device][0]
    args.vocab_block = args.vocab_block or space.TILE[args.device][1]
    if args.memory:
        return print(json.dumps(measure_cpu_memory(*args.memory, args)))
    if args.time:
        return print(json.dumps(measure(args.time, args)))

    B, T, D, V = SIZES[args.device]
    print(common.machine(torch.device(args.device)))
    print(f"N = {B}x{T} = {B * T} tokens (all scored), d = {D}, V = {V}; space tiles {args.chunk} tokens x "
          f"{args.vocab_block} vocab; peak memory: " + ("torch.cuda.max_memory_allocated" if args.device == "cuda"
                                                         else "VmHWM above VmRSS, a fresh process per cell"))
    print(f"load average before: {common.load_avg()}")
    print(f"{'variant':<12} {'dtype':<5} {'time ms':>9} {'x naive':>8} {'peak MiB':>9} {'% naive':>8}")
    for dtype_name in DTYPES:
        reason = common.bf16_skip_reason(torch.device(args.device), DTYPES[dtype_name])
        if reason:
            print(reason)
            continue
        got = child(args, "--time", dtype_name)
        ms = got["ms"]
        peak = got["peak"] if args.device == "cuda" else {v: child(args, "--memory", v, dtype_name) for v in VARIANTS}
        digits = 0 if args.device == "cpu" else 1
        for v in VARIANTS:
            print(f"{v:<12} {dtype_name:<5} {ms[v]:>9.{digits}f} {ms[v] / ms['naive']:>8.2f} "
                  f"{peak[v]:>9.1f} {100 * peak[v] / peak['naive']:>7.1f}%")
    print(f"load average after: {common.load_avg()} "
          f"(this includes the benchmark's own {torch.get_num_threads()} busy threads)")


if __name__ == "__main__":
    main()
