"""
Speed of sample.generate next to transformers' MistralForCausalLM.generate, same weights, greedy.

    python bench/sample.py                          # CPU: fp32 and bf16 tables (about 2 minutes on 2 idle cores)
    python bench/sample.py --runs 3                 # fewer timed runs per cell
    python bench/sample.py --device cuda            # GPU: a ~1B-parameter model in bf16, with peak memory

Rows: tokens/s for 128 new tokens after 32-token prompts at several batch sizes (eos off, so every
row makes all 128), and the time of one decode step after a 64- and a 1024-token prompt at batch 1,
measured as (time for 129 new tokens - time for 1) / 128 so that prefill drops out. With a KV cache
the step should barely grow with the prompt. Each cell: one warm-up, then the median of --runs,
the two samplers taking turns so that a busy machine slows both alike.

Sizes: on a CPU, Mistral's shape at toy width with the real 32k vocabulary (so the LM head weighs
in as it does at 7B), in fp32 and in bf16. On CUDA, a random ~1B-parameter Mistral (dim 2048, 16
layers) in bf16, and beside each speed the peak memory one call adds on top of the weights
(torch.cuda.max_memory_allocated minus what was allocated before the call). A CPU without native
bf16 instructions (AVX-512 BF16 or AMX in /proc/cpuinfo) emulates bf16 matmuls many times slower,
so there its bf16 table is skipped with the reason printed instead of running for an hour.

On a CPU shared with other jobs, run with OMP_WAIT_POLICY=PASSIVE. By default OpenMP's threads
spin while they wait for each other, and a thread the scheduler has taken away stalls every
parallel op; with the machine's cores oversubscribed 8 times over, that made a decode loop 5 to 10
times slower than on one thread and varied 2x from run to run, while passive waiting kept it at or
below the 1-thread time.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelArgs, Transformer, save_model  # noqa: E402
from sample import generate  # noqa: E402

# -----------------------------------------------------------------------------
# the benchmark models; the window never binds at these lengths
CPU_ARGS = ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, hidden_dim=768,
                     vocab_size=32000, sliding_window=4096, max_seq_len=4096)
GPU_ARGS = ModelArgs(dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, head_dim=128, hidden_dim=5632,
                     vocab_size=32000, sliding_window=4096, max_seq_len=4096)   # 0.89B parameters
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NEW = 128
# -----------------------------------------------------------------------------


# The machine: figures from a benchmark mean little without it

def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def native_bf16_flags() -> list[str]:
    """The CPU's bf16 instructions (AVX-512 BF16, AMX); without them torch emulates bf16 matmuls."""
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    return [x for x in ("avx512_bf16", "amx_bf16") if x in flags]


def describe(device: torch.device) -> str:
    bf16 = native_bf16_flags()
    text = (f"cpu: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads "
            f"(OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}), native bf16: "
            f"{'yes (' + ', '.join(bf16) + ')' if bf16 else 'no'}")
    if device.type == "cuda":
        text += f"\ngpu: {torch.cuda.get_device_name(device)}"
    return text


def skip_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type == "cpu" and dtype == torch.bfloat16 and not native_bf16_flags():
        return ("skipped bf16: this CPU has no avx512_bf16 or amx_bf16, so torch would emulate every bf16 "
                "matmul, far slower than fp32")
    return None


def load_avg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


# -----------------------------------------------------------------------------
# Timing and memory

def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def race(fns: dict, runs: int, device) -> dict:
    """Median seconds of each fn; one warm-up each, then the fns take turns."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def peak_mib(fn, device) -> float:
    """MiB that one call of fn adds at its peak on top of what was allocated before it (CUDA only)."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def models(args: ModelArgs, dtype: torch.dtype, device: torch.device, seed: int = 0, std: float = 0.02):
    """Our random model and transformers' MistralForCausalLM holding the same weights, both in eval mode."""
    from transformers import MistralForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model = Transformer(args).init_weights(seed, std=std).to(dtype)
    with tempfile.TemporaryDirectory() as d:
        save_model(model, d)
        hf = MistralForCausalLM.from_pretrained(d, dtype=dtype)
    return model.to(device).eval(), hf.to(device).eval()


# -----------------------------------------------------------------------------

def table(args: ModelArgs, dtype_name: str, device: torch.device, runs: int, batches: tuple):
    dtype = DTYPES[dtype_name]
    model, hf = models(args, dtype, device)
    g = torch.Generator().manual_seed(0)
    gpu = device.type == "cuda"

    def ours(prompts, n):
        out = generate(model, prompts, n, temperature=0)
        assert all(len(r) == n for r in out)

    @torch.inference_mode()
    def theirs(prompts, n):
        x = torch.tensor(prompts, device=device)
        # an explicit attention_mask (no pad guessing) and an eos id outside the vocabulary: all n tokens
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                          use_cache=True, eos_token_id=args.vocab_size, pad_token_id=0)
        assert out.shape[1] == x.shape[1] + n

    n_params = sum(p.numel() for p in model.parameters())
    print(f"\nmodel: {n_params / 1e6:.0f}M parameters, dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads "
          f"({args.n_kv_heads} KV), head_dim {args.head_dim}, hidden {args.hidden_dim}, vocab {args.vocab_size}; "
          f"{dtype_name} on {device}, greedy, median of {runs}; load average {load_avg()} before")
    mem = f"{'MiB ours':>10}{'MiB theirs':>12}" if gpu else ""
    print(f"{'':34}{'sample.py':>12}{'transformers':>14}{'speedup':>9}{mem}")

    for B in batches:
        prompts = torch.randint(1, args.vocab_size, (B, 32), generator=g).tolist()
        f = {"ours": lambda: ours(prompts, NEW), "hf": lambda: theirs(prompts, NEW)}
        t = race(f, runs, device)
        a, b = B * NEW / t["ours"], B * NEW / t["hf"]
        mem = f"{peak_mib(f['ours'], device):10.0f}{peak_mib(f['hf'], device):12.0f}" if gpu else ""
        print(f"{f'tokens/s, batch {B:2d}, 32+{NEW} tokens':34}{a:12.0f}{b:14.0f}{a / b:8.2f}x{mem}", flush=True)

    for P in (64, 1024):
        prompts = torch.randint(1, args.vocab_size, (1, P), generator=g).tolist()
        t = race({"ours": lambda: ours(prompts, NEW + 1), "ours1": lambda: ours(prompts, 1),
                  "hf": lambda: theirs(prompts, NEW + 1), "hf1": lambda: theirs(prompts, 1)}, runs, device)
        a, b = (t["ours"] - t["ours1"]) / NEW * 1e3, (t["hf"] - t["hf1"]) / NEW * 1e3
        print(f"{f'ms per decode step, prompt {P:4d}':34}{a:12.2f}{b:14.2f}{b / a:8.2f}x", flush=True)
    print(f"load average after: {load_avg()} (includes this benchmark's own threads)")
    del model, hf


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the ~1B bf16 model")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="only this dtype (default: fp32 and bf16 on a CPU, bf16 on CUDA)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per cell (the median is shown)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    device = torch.device(cli.device)
    gpu = device.type == "cuda"

    print(describe(device))
    for name in [cli.dtype] if cli.dtype else (["bf16"] if gpu else ["fp32", "bf16"]):
        reason = skip_reason(device, DTYPES[name])
        if reason:
            print(f"\n{reason}")
            continue
        table(GPU_ARGS if gpu else CPU_ARGS, name, device, cli.runs, (1, 16, 64) if gpu else (1, 16))


if __name__ == "__main__":
    main()
