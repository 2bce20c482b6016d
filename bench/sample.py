"""
Speed of sample.generate next to transformers' MistralForCausalLM.generate, same weights, greedy, fp32.

    python bench/sample.py                 # the full table (under a minute on 2 idle CPU cores)
    python bench/sample.py --runs 3        # fewer timed runs per cell

Rows: tokens/s for 128 new tokens after 32-token prompts at batch 1 and 16 (eos off, so every row
makes all 128), and the time of one decode step after a 64- and a 1024-token prompt at batch 1,
measured as (time for 129 new tokens - time for 1) / 128 so that prefill drops out. With a KV cache
the step should barely grow with the prompt. Each cell: one warm-up, then the median of --runs,
the two samplers taking turns so that a busy machine slows both alike.
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

# the benchmark model: Mistral's shape at toy width, with the real 32k vocabulary, so the LM head
# weighs in as it does at 7B; the window never binds here
ARGS = ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, hidden_dim=768,
                 vocab_size=32000, sliding_window=4096, max_seq_len=4096)
NEW = 128


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def race(fns: dict, runs: int) -> dict:
    """Median seconds of each fn; one warm-up each, then the fns take turns."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--runs", type=int, default=5, help="timed runs per cell (the median is shown)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)

    from transformers import MistralForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()

    model = Transformer(ARGS).init_weights(0).eval()
    with tempfile.TemporaryDirectory() as d:
        save_model(model, d)
        hf = MistralForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)

    def ours(prompts, n):
        out = generate(model, prompts, n, temperature=0)
        assert all(len(r) == n for r in out)

    @torch.inference_mode()
    def theirs(prompts, n):
        x = torch.tensor(prompts)
        # an explicit attention_mask (no pad guessing) and an eos id outside the vocabulary: all n tokens
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                          use_cache=True, eos_token_id=ARGS.vocab_size, pad_token_id=0)
        assert out.shape[1] == x.shape[1] + n

    print(f"model: dim {ARGS.dim}, {ARGS.n_layers} layers, {ARGS.n_heads} heads ({ARGS.n_kv_heads} KV), "
          f"head_dim {ARGS.head_dim}, hidden {ARGS.hidden_dim}, vocab {ARGS.vocab_size}, window "
          f"{ARGS.sliding_window}; fp32, greedy, {torch.get_num_threads()} threads, median of {cli.runs}")
    print(f"{'':34}{'sample.py':>12}{'transformers':>14}{'speedup':>9}")

    for B in (1, 16):
        prompts = torch.randint(1, ARGS.vocab_size, (B, 32), generator=g).tolist()
        t = race({"ours": lambda: ours(prompts, NEW), "hf": lambda: theirs(prompts, NEW)}, cli.runs)
        a, b = B * NEW / t["ours"], B * NEW / t["hf"]
        print(f"{f'tokens/s, batch {B:2d}, 32+{NEW} tokens':34}{a:12.0f}{b:14.0f}{a / b:8.2f}x", flush=True)

    for P in (64, 1024):
        prompts = torch.randint(1, ARGS.vocab_size, (1, P), generator=g).tolist()
        t = race({"ours": lambda: ours(prompts, NEW + 1), "ours1": lambda: ours(prompts, 1),
                  "hf": lambda: theirs(prompts, NEW + 1), "hf1": lambda: theirs(prompts, 1)}, cli.runs)
        a, b = (t["ours"] - t["ours1"]) / NEW * 1e3, (t["hf"] - t["hf1"]) / NEW * 1e3
        print(f"{f'ms per decode step, prompt {P:4d}':34}{a:12.2f}{b:14.2f}{b / a:8.2f}x", flush=True)


if __name__ == "__main__":
    main()
