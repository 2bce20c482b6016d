"""
One whole self-play round, timed: K responses for each of P prompts, then the reference score
s(y|x) of all 1 + K responses of every prompt (its real one and the K generated), against the
pipeline a user would otherwise write with transformers, on the same weights and lengths.

    python bench/selfplay.py                  # CPU, fp32 (a few minutes on 2 idle cores)
    python bench/selfplay.py --runs 1         # one timed run per cell
    python bench/selfplay.py --device cuda    # GPU: bench/sample.py's ~1B-parameter model in bf16

ours    sample.generate(model, prompts, NEW, num_samples=K, seed=0), then selfplay.score on the
        (prompt + response, loss_mask) sequences: sorted by length into batches of at most
        --score-tokens padded tokens, log-probs through the LM head tile by tile, response
        tokens only
theirs  MistralForCausalLM.generate(left-padded prompts, do_sample=True, temperature=1, top_k=0,
        num_return_sequences=K), then for each of the same batches, right-padded:
        model(ids, attention_mask).logits.float().log_softmax(-1), gathered at the response tokens

The round: P prompts of 32 to 256 random token ids (lengths evenly spread), NEW = 128 new tokens
with no EOS (an id outside the vocabulary), so every response is NEW tokens long in both pipelines,
and a random real response of NEW tokens per prompt. Speed is counted in tokens of work: the
P·K·NEW generated tokens plus the P·(1+K)·NEW response tokens scored (prompt tokens go through the
model in both steps but are not counted). Each cell: one warm-up, then the median of --runs, the
two pipelines taking turns so that a busy machine slows both alike. The two pipelines' scores of
the real responses are checked against each other, so both compute the same thing. On a shared
CPU, run with OMP_WAIT_POLICY=PASSIVE (see bench/sample.py).
"""
import argparse
import importlib.util
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sample import generate  # noqa: E402
from selfplay import score  # noqa: E402

# bench/sample.py's models and machine description, loaded by path because the module name
# `sample` is the project's sample.py
_spec = importlib.util.spec_from_file_location("bench_sample", os.path.join(ROOT, "bench", "sample.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# -----------------------------------------------------------------------------
P = 8                       # prompts per round
NEW = 128                   # new tokens per response, and the length of the real responses
PROMPT_LENGTHS = (32, 256)  # shortest and longest prompt
PAD = 0
# -----------------------------------------------------------------------------


def round_inputs(vocab_size, seed=0):
    """P prompts of evenly spread lengths and one real response each, random token ids."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(*PROMPT_LENGTHS, P).round().long().tolist()
    prompts = [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]
    real = [torch.randint(3, vocab_size, (NEW,), generator=g).tolist() for _ in range(P)]
    return prompts, real


def sequences(prompts, real, generated, K):
    """(ids, loss_mask) of every prompt's real response, then its K generated ones, as
    selfplay.py lays them out; the mask is 1 on the response tokens."""
    return [(x + y, [0] * len(x) + [1] * len(y))
            for j, x in enumerate(prompts) for y in [real[j]] + generated[j * K:(j + 1) * K]]


def score_batches(seqs, max_tokens):
    """The batches selfplay.score forms: longest first, at most max_tokens padded (B x T) tokens each."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out, i = [], 0
    while i < len(order):
        T = len(seqs[order[i]][0]) - 1
        out.append(order[i:i + max(1, max_tokens // T)])
        i += len(out[-1])
    return out


# -----------------------------------------------------------------------------
# The two pipelines: each returns (scores of the 1 + K responses per prompt, seconds generating,
# seconds scoring)

def run_ours(model, prompts, real, K, max_tokens, device):
    t0 = clock(device)
    generated = generate(model, prompts, NEW, temperature=1.0, seed=0, num_samples=K)  # [P*K], prompt-major
    t1 = clock(device)
    assert all(len(y) == NEW for y in generated)
    scores = score(model, sequences(prompts, real, generated, K), PAD, max_tokens)
    return scores, t1 - t0, clock(device) - t1


@torch.inference_mode()
def run_theirs(hf, prompts, real, K, max_tokens, device):
    t0 = clock(device)
    # the user's batch: left padding with an attention mask, as a tokenizer with padding_side="left" makes it
    L = max(len(x) for x in prompts)
    ids = torch.tensor([[PAD] * (L - len(x)) + x for x in prompts], device=device)               # [P, L]
    attention = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in prompts], device=device)
    torch.manual_seed(0)
    out = hf.generate(ids, attention_mask=attention, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                      num_return_sequences=K, max_new_tokens=NEW, eos_token_id=hf.config.vocab_size,
                      pad_token_id=PAD)                                                         # [P*K, L+NEW]
    generated = out[:, L:].tolist()
    t1 = clock(device)
    assert all(len(y) == NEW for y in generated)

    seqs = sequences(prompts, real, generated, K)
    scores = [0.0] * len(seqs)
    for idx in score_batches(seqs, max_tokens):
        T = len(seqs[idx[0]][0])
        x = torch.tensor([seqs[i][0] + [PAD] * (T - len(seqs[i][0])) for i in idx], device=device)     # [b, T]
        m = torch.tensor([[1] * len(seqs[i][0]) + [0] * (T - len(seqs[i][0])) for i in idx], device=device)
        resp = torch.tensor([seqs[i][1][1:] + [0] * (T - len(seqs[i][0])) for i in idx], device=device)
        logp = hf(input_ids=x, attention_mask=m).logits.float().log_softmax(-1)                 # [b, T, V] fp32
        token_logp = logp[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1)                          # [b, T-1]
        for i, s in zip(idx, (token_logp * resp).sum(-1).tolist()):
            scores[i] = s
    return scores, t1 - t0, clock(device) - t1


def clock(device) -> float:
    bench.sync(device)
    return time.perf_counter()


# -----------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--device", default="cpu", help="cpu (fp32), or cuda for the ~1B bf16 model")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per cell (the median is shown)")
    parser.add_argument("--score-tokens", type=int, default=8192, help="padded tokens per scoring batch, both pipelines")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    device = torch.device(cli.device)
    gpu = device.type == "cuda"
    args, dtype = (bench.GPU_ARGS, torch.bfloat16) if gpu else (bench.CPU_ARGS, torch.float32)

    print(bench.describe(device))
    reason = bench.skip_reason(device, dtype)
    if reason:
        print(reason)
        return
    model, hf = bench.models(args, dtype, device)
    prompts, real = round_inputs(args.vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.0f}M parameters, dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}; "
          f"{str(dtype).removeprefix('torch.')} on {device}")
    print(f"round: P = {P} prompts of {PROMPT_LENGTHS[0]} to {PROMPT_LENGTHS[1]} tokens, {NEW} new tokens each "
          f"(no EOS), temperature 1; scoring batches of at most {cli.score_tokens} padded tokens; "
          f"median of {cli.runs}; load average {bench.load_avg()} before")
    print("tokens = generated + scored response tokens; gen/score = share of the round's time")
    mem = f"{'MiB ours':>10}{'MiB theirs':>12}" if gpu else ""
    print(f"{'':8}{'tokens':>8}{'ours tok/s':>12}{'theirs tok/s':>14}{'ratio':>8}"
          f"{'ours gen/score':>17}{'theirs gen/score':>18}{mem}")

    for K in (1, 4):
        work = P * K * NEW + P * (1 + K) * NEW
        fns = {"ours": lambda: run_ours(model, prompts, real, K, cli.score_tokens, device),
               "theirs": lambda: run_theirs(hf, prompts, real, K, cli.score_tokens, device)}
        check = {name: fn()[0] for name, fn in fns.items()}  # also the warm-up
        # the real responses are the same in both: their scores, sums of 128 log-probs near -10 each,
        # must agree to rounding (bf16 logits round each one by ~0.4%; a wrong gather is off by hundreds)
        for a, b in zip(check["ours"][::1 + K], check["theirs"][::1 + K]):
            assert abs(a - b) <= (1e-2 if gpu else 1e-4) * abs(b), (a, b)
        laps = {name: [] for name in fns}
        for _ in range(cli.runs):
            for name, fn in fns.items():
                _, gen, sc = fn()
                laps[name].append((gen + sc, gen))
        med = {name: sorted(v)[len(v) // 2] for name, v in laps.items()}   # the median round, and its split
        (ta, ga), (tb, gb) = med["ours"], med["theirs"]
        mem = ""
        if gpu:
            mem = f"{bench.peak_mib(fns['ours'], device):10.0f}{bench.peak_mib(fns['theirs'], device):12.0f}"
        print(f"{f'K = {K}':8}{work:8d}{work / ta:12.0f}{work / tb:14.0f}{tb / ta:7.2f}x"
              f"{f'{ga / ta:.0%} / {1 - ga / ta:.0%}':>17}{f'{gb / tb:.0%} / {1 - gb / tb:.0%}':>18}{mem}", flush=True)
    print(f"load average after: {bench.load_avg()} (includes this benchmark's own threads)")


if __name__ == "__main__":
    main()
