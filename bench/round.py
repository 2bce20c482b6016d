"""
One whole self-play round, timed: K responses for each of P prompts, then the reference score
s(y|x) of all 1 + K responses of every prompt (its real one and the K generated), against the
pipeline a user would otherwise write with transformers, on the same weights and lengths.

    python bench/round.py                  # CPU, fp32, a 20M-parameter random Mistral
    python bench/round.py --runs 1         # one timed run per cell
    python bench/round.py --device cuda    # GPU: bench/generate.py's ~1B-parameter model in bf16
    python bench/round.py --model ~/.cache/space-tests/smollm2-135m-instruct --prompts 4 \\
        --new-tokens 32 --prompt-lengths 16 64 --runs 1      # at a real checkpoint's shape

ours    sample.generate(model, prompts, NEW, num_samples=K, seed=0), then selfplay.score on the
        (prompt + response, loss_mask) sequences: sorted by length into batches of at most
        --score-tokens padded tokens, log-probs through the LM head tile by tile, response
        tokens only
theirs  transformers' generate(left-padded prompts, do_sample=True, temperature=1, top_k=0,
        num_return_sequences=K), then the same selfplay.score batches (it is called, with
        transformers' model in ours' place), each through transformers' forward and the naive
        log-prob: the full [b, T, V] logits, log_softmax in fp32, gathered at the response tokens

The round: P prompts of random token ids, their lengths evenly spread over --prompt-lengths, NEW
new tokens with no EOS (an id outside the vocabulary), so every response is NEW tokens long in both
pipelines, and a random real response of NEW tokens per prompt. With --model DIR the model is that
checkpoint (its shape and weights), loaded by load_model and by transformers' AutoModelForCausalLM
from the same folder. Speed is counted in tokens of work: the P·K·NEW generated tokens plus the
P·(1+K)·NEW response tokens scored (prompt tokens go through the model in both steps but are not
counted). Each cell: one warm-up, then the median of --runs, the two pipelines taking turns so that
a busy machine slows both alike. The two pipelines' scores of the real responses are checked
against each other, so both compute the same thing. On a shared CPU, run with
OMP_WAIT_POLICY=PASSIVE (see bench/generate.py).
"""
import argparse
import os
from unittest import mock

import torch

import common
import selfplay
from sample import generate

PAD = 0  # the random models when no --model is given: common.CPU_ARGS, common.GPU_ARGS


def round_inputs(vocab_size, P, lengths, new, seed=0):
    """P prompts of evenly spread lengths and one real response each, random token ids."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.linspace(*lengths, P).round().long().tolist()
    prompts = [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in sizes]
    real = [torch.randint(3, vocab_size, (new,), generator=g).tolist() for _ in range(P)]
    return prompts, real


def sequences(prompts, real, generated, K):
    """(ids, loss_mask) of every prompt's real response, then its K generated ones, as
    selfplay.py lays them out; the mask is 1 on the response tokens."""
    return [(x + y, [0] * len(x) + [1] * len(y))
            for j, x in enumerate(prompts) for y in [real[j]] + generated[j * K:(j + 1) * K]]


class Trunk(torch.nn.Module):
    """transformers' model in the shape selfplay.score calls: model(tokens, return_hidden=True) gives the
    final hidden states, model.output.weight the LM head. score passes no attention mask and pads on
    the right, which a causal model's scored positions never see."""

    def __init__(self, hf):
        super().__init__()
        self.hf, self.output = hf, hf.get_output_embeddings()

    def forward(self, tokens, return_hidden=True):
        return self.hf.model(input_ids=tokens).last_hidden_state                             # [b, T, d]


# -----------------------------------------------------------------------------
# The two pipelines: each returns (scores of the 1 + K responses per prompt, seconds generating,
# seconds scoring)

def run_ours(model, prompts, real, K, new, max_tokens, device):
    t0 = common.clock(device)
    generated = generate(model, prompts, new, temperature=1.0, seed=0, num_samples=K)   # [P*K], prompt-major
    t1 = common.clock(device)
    assert all(len(y) == new for y in generated)
    scores = selfplay.score(model, sequences(prompts, real, generated, K), PAD, max_tokens)
    return scores, t1 - t0, common.clock(device) - t1


@torch.inference_mode()
def run_theirs(hf, prompts, real, K, new, max_tokens, device):
    t0 = common.clock(device)
    # the user's batch: left padding with an attention mask, as a tokenizer with padding_side="left" makes it
    L = max(len(x) for x in prompts)
    ids = torch.tensor([[PAD] * (L - len(x)) + x for x in prompts], device=device)               # [P, L]
    attention = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in prompts], device=device)
    torch.manual_seed(0)
    out = hf.generate(ids, attention_mask=attention, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                      num_return_sequences=K, max_new_tokens=new, eos_token_id=hf.config.vocab_size,
                      pad_token_id=PAD)                                                         # [P*K, L+NEW]
    generated = out[:, L:].tolist()
    t1 = common.clock(device)
    assert all(len(y) == new for y in generated)
    # the same batches as ours, so the comparison is of the work in each batch, never of the batching
    with mock.patch.object(selfplay, "sequence_logprobs", common.naive_logprobs):
        scores = selfplay.score(Trunk(hf), sequences(prompts, real, generated, K), PAD, max_tokens)
    return scores, t1 - t0, common.clock(device) - t1


# -----------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--device", default="cpu", help="cpu (fp32), or cuda for the ~1B bf16 model")
    parser.add_argument("--model", help="a checkpoint folder: its shape and weights, loaded by us and by transformers")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per cell (the median is shown)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per round (P)")
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens per response, and real response length")
    parser.add_argument("--prompt-lengths", type=int, nargs=2, default=[32, 256], metavar=("SHORTEST", "LONGEST"),
                        help="prompt lengths, evenly spread between these")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4], help="K values, one row each")
    parser.add_argument("--score-tokens", type=int, default=8192,
                        help="padded tokens per scoring batch, both pipelines")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    device = torch.device(cli.device)
    gpu = device.type == "cuda"
    if cli.model and not os.path.isdir(cli.model):
        parser.error(f"--model {cli.model}: no such folder")
    args, dtype = (common.GPU_ARGS, torch.bfloat16) if gpu else (common.CPU_ARGS, torch.float32)
    P, new = cli.prompts, cli.new_tokens

    print(common.machine(device))
    reason = common.bf16_skip_reason(device, dtype)
    if reason:
        print(reason)
        return
    model, hf = common.model_pair(args, dtype, device, cli.model)
    args = model.args
    prompts, real = round_inputs(args.vocab_size, P, cli.prompt_lengths, new)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{common.describe_model(args, n_params, cli.model)}; {str(dtype).removeprefix('torch.')} on {device}")
    print(f"round: P = {P} prompts of {cli.prompt_lengths[0]} to {cli.prompt_lengths[1]} tokens, {new} new tokens "
          f"each (no EOS), temperature 1; scoring batches of at most {cli.score_tokens} padded tokens; "
          f"median of {cli.runs}; load average {common.load_avg()} before")
    print("tokens = generated + scored response tokens; gen/score = share of the round's time")
    mem = f"{'MiB ours':>10}{'MiB theirs':>12}" if gpu else ""
    print(f"{'':8}{'tokens':>8}{'ours tok/s':>12}{'theirs tok/s':>14}{'ratio':>8}"
          f"{'ours gen/score':>17}{'theirs gen/score':>18}{mem}")

    meter = common.Meter(device)
    for K in cli.samples:
        work = P * K * new + P * (1 + K) * new
        fns = {"ours": lambda: run_ours(model, prompts, real, K, new, cli.score_tokens, device),
               "theirs": lambda: run_theirs(hf, prompts, real, K, new, cli.score_tokens, device)}
        check = {name: fn()[0] for name, fn in fns.items()}  # also the warm-up
        # the real responses are the same in both: their scores, sums of NEW log-probs of several nats
        # each, must agree to rounding (bf16 logits round each one by ~0.4%; a wrong gather is off by far more)
        for a, b in zip(check["ours"][::1 + K], check["theirs"][::1 + K]):
            assert abs(a - b) <= (1e-2 if gpu else 1e-4) * abs(b), (a, b)
        laps = {name: [] for name in fns}
        for _ in range(cli.runs):
            for name, fn in fns.items():
                _, gen, sc = fn()
                laps[name].append((gen + sc, gen))
        med = {name: sorted(v)[len(v) // 2] for name, v in laps.items()}   # the median round, and its split
        (ta, ga), (tb, gb) = med["ours"], med["theirs"]
        mem = f"{meter.above(fns['ours']) / 2**20:10.0f}{meter.above(fns['theirs']) / 2**20:12.0f}" if gpu else ""
        print(f"{f'K = {K}':8}{work:8d}{work / ta:12.0f}{work / tb:14.0f}{tb / ta:7.2f}x"
              f"{f'{ga / ta:.0%} / {1 - ga / ta:.0%}':>17}{f'{gb / tb:.0%} / {1 - gb / tb:.0%}':>18}{mem}", flush=True)
    print(f"load average after: {common.load_avg()} (includes this benchmark's own threads)")


if __name__ == "__main__":
    main()
