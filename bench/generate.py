"""
Speed of sample.generate next to transformers' generate, same weights, greedy.

    python bench/generate.py                          # CPU: fp32 and bf16 tables, a 20M-parameter random Mistral
    python bench/generate.py --runs 3                 # fewer timed runs per cell
    python bench/generate.py --device cuda            # GPU: a ~1B-parameter random Mistral in bf16, with peak memory
    python bench/generate.py --model ~/.cache/space-tests/smollm2-135m-instruct --dtype fp32 \\
        --batches 1 4 --new-tokens 32 --decode-prompts 64 --runs 3      # at a real checkpoint's shape

Rows: tokens/s for --new-tokens new tokens after 32-token prompts at each batch size in --batches
(eos off, so every row makes all of them), and the time of one decode step after each prompt length
in --decode-prompts at batch 1, measured as (time for N+1 new tokens - time for 1) / N so that
prefill drops out. With a KV cache the step should barely grow with the prompt. Each cell: one
warm-up, then the median of --runs, the two samplers taking turns so that a busy machine slows both
alike.

Sizes: on a CPU, Mistral's shape at toy width with the real 32k vocabulary (so the LM head weighs
in as it does at 7B), in fp32 and in bf16. On CUDA, a random ~1B-parameter Mistral (dim 2048, 16
layers) in bf16, and beside each speed the peak memory one call adds on top of the weights
(torch.cuda.max_memory_allocated minus what was allocated before the call). With --model DIR, that
checkpoint's own shape and weights (any family model.py loads), loaded by load_model and by
transformers' AutoModelForCausalLM from the same folder; prompts are random ids of its vocabulary.
A CPU without native bf16 instructions (AVX-512 BF16 or AMX in /proc/cpuinfo) emulates bf16
matmuls many times slower, so there its bf16 table is skipped with the reason printed instead of
running for an hour.

On a CPU shared with other jobs, run with OMP_WAIT_POLICY=PASSIVE. By default OpenMP's threads
spin while they wait for each other, and a thread the scheduler has taken away stalls every
parallel op; with the machine's cores oversubscribed 8 times over, that made a decode loop 5 to 10
times slower than on one thread and varied 2x from run to run, while passive waiting kept it at or
below the 1-thread time.
"""
import argparse
import os

import torch

import common
from sample import generate

# -----------------------------------------------------------------------------
# the random models when no --model is given: common.CPU_ARGS, common.GPU_ARGS
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT = 32                 # prompt tokens in the tokens/s rows
# -----------------------------------------------------------------------------


def table(args, dtype_name, device, runs, batches, new, decode_prompts, folder):
    dtype = DTYPES[dtype_name]
    model, hf = common.model_pair(args, dtype, device, folder)
    args = model.args
    g = torch.Generator().manual_seed(0)
    gpu = device.type == "cuda"
    meter = common.Meter(device)

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
    print(f"\n{common.describe_model(args, n_params, folder)}; {dtype_name} on {device}, greedy, median of {runs}; "
          f"load average {common.load_avg()} before")
    mem = f"{'MiB ours':>10}{'MiB theirs':>12}" if gpu else ""
    print(f"{'':40}{'generate':>12}{'transformers':>14}{'speedup':>9}{mem}")

    for B in batches:
        prompts = torch.randint(1, args.vocab_size, (B, PROMPT), generator=g).tolist()
        f = {"ours": lambda: ours(prompts, new), "hf": lambda: theirs(prompts, new)}
        t = common.race(f, runs, device)
        a, b = B * new / t["ours"], B * new / t["hf"]
        mem = f"{meter.above(f['ours']) / 2**20:10.0f}{meter.above(f['hf']) / 2**20:12.0f}" if gpu else ""
        print(f"{f'{dtype_name} tokens/s, batch {B:2d}, {PROMPT}+{new} tokens':40}{a:12.0f}{b:14.0f}{a / b:8.2f}x{mem}",
              flush=True)

    for P in decode_prompts:
        prompts = torch.randint(1, args.vocab_size, (1, P), generator=g).tolist()
        t = common.race({"ours": lambda: ours(prompts, new + 1), "ours1": lambda: ours(prompts, 1),
                         "hf": lambda: theirs(prompts, new + 1), "hf1": lambda: theirs(prompts, 1)}, runs, device)
        a, b = (t["ours"] - t["ours1"]) / new * 1e3, (t["hf"] - t["hf1"]) / new * 1e3
        print(f"{f'{dtype_name} ms per decode step, prompt {P:4d}':40}{a:12.2f}{b:14.2f}{b / a:8.2f}x", flush=True)
    print(f"load average after: {common.load_avg()} (includes this benchmark's own threads)")
    del model, hf


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the ~1B bf16 model")
    parser.add_argument("--model", help="a checkpoint folder: its shape and weights, loaded by us and by transformers")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="only this dtype (default: fp32 and bf16 on a CPU, bf16 on CUDA)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per cell (the median is shown)")
    parser.add_argument("--batches", type=int, nargs="+",
                        help="batch sizes of the tokens/s rows (default: 1 16; CUDA 1 16 64)")
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens per row, and decode steps timed")
    parser.add_argument("--decode-prompts", type=int, nargs="+", default=[64, 1024],
                        help="prompt lengths of the ms-per-decode-step rows")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    device = torch.device(cli.device)
    gpu = device.type == "cuda"
    if cli.model and not os.path.isdir(cli.model):
        parser.error(f"--model {cli.model}: no such folder")

    print(common.machine(device))
    for name in [cli.dtype] if cli.dtype else (["bf16"] if gpu else ["fp32", "bf16"]):
        reason = common.bf16_skip_reason(device, DTYPES[name])
        if reason:
            print(f"\n{reason}")
            continue
        batches = cli.batches or ((1, 16, 64) if gpu else (1, 16))
        table(common.GPU_ARGS if gpu else common.CPU_ARGS, name, device, cli.runs, batches, cli.new_tokens,
              cli.decode_prompts, cli.model)


if __name__ == "__main__":
    main()
