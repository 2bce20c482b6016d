"""sample.py against two independent references: the model recomputed from scratch every step
(no cache, no padding, no masks of ours) and transformers' MistralForCausalLM.generate."""
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from conftest import ROOT
import data
from model import ModelArgs, Transformer, load_model, save_model
from sample import generate

# a window shorter than the long prompt, and than every prompt plus its generation
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=176,
                 vocab_size=256, sliding_window=12, max_seq_len=96)
LENGTHS = (3, 17, 40)
N = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(seed=0, args=ARGS):
    """Random weights at a scale where the logits are spread out (the default std 0.02 makes them
    nearly flat, and argmax then hangs on rounding), with norm weights away from 1."""
    model = Transformer(args).init_weights(seed, std=0.2)
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data += 0.3 * torch.randn(p.shape, generator=g)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, ARGS.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]


def greedy_no_cache(model, prompt, n):
    """The naive sampler: the whole sequence through the model every step, argmax of the last logits."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(model(torch.tensor([seq]))[0, -1].argmax().item())
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def greedy(model, prompts):
    return [greedy_no_cache(model, p, N) for p in prompts]


def test_greedy_equals_no_cache_reference(model, prompts, greedy):
    out = generate(model, prompts, N, temperature=0)
    assert all(len(p) + N > ARGS.sliding_window for p in prompts)
    for row, ref in zip(out, greedy):
        assert len(set(ref)) > N // 2, "degenerate reference: random weights too small?"
        assert row == ref


def test_greedy_equals_no_cache_reference_without_window(prompts):
    model = random_model(args=replace(ARGS, sliding_window=None, model_type="llama"))
    out = generate(model, prompts, N, temperature=0)
    assert out == [greedy_no_cache(model, p, N) for p in prompts]


def test_greedy_equals_transformers(model, prompts, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_model(model, tmp_path)
    hf = transformers.MistralForCausalLM.from_pretrained(tmp_path).eval()
    out = generate(model, prompts, N, temperature=0)
    for prompt, row in zip(prompts, out):
        x = torch.tensor([prompt])
        # attention_mask given: otherwise transformers treats every token equal to pad_token_id as padding;
        # eos_token_id out of the vocabulary: no early stop, and no eos suppression (min_new_tokens would)
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N, do_sample=False,
                          eos_token_id=ARGS.vocab_size + 1, pad_token_id=0)
        assert row == ref[0, len(prompt):].tolist()


def test_k_samples_from_one_prefill_equal_no_cache_reference(model, prompts, greedy):
    # K copies of each prompt's cache rows, decoded greedily: every copy must be its own prompt's
    # no-cache continuation, in prompt-major order (a copy from the wrong row, or a layout of
    # sample-major rows, would show). The prompts differ in length and outrun the window.
    K = 3
    out = generate(model, prompts, N, temperature=0, num_samples=K)
    assert out == [ref for ref in greedy for _ in range(K)]


def sample_no_cache(model, prompts, n, temperature, seed):
    """The naive sampler: every row recomputed from scratch (no cache, no padding), one token per
    row per step, drawn by sample.py's documented rule: the first token whose cumulative probability
    exceeds u, one u ~ U(0, 1) per row per step from a generator seeded with seed."""
    g = torch.Generator().manual_seed(seed)
    seqs = [list(p) for p in prompts]
    with torch.no_grad():
        for _ in range(n):
            logits = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])       # [rows, V]
            cdf = torch.softmax(logits.float() / temperature, dim=-1).double().cumsum(-1)
            u = torch.rand(len(seqs), 1, dtype=torch.float64, generator=g)
            for s, c, x in zip(seqs, cdf, (u * cdf[:, -1:]).squeeze(1)):
                s.append(int((c <= x).sum()))  # the first token whose cumulative probability exceeds x
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def test_k_samples_with_a_seed_equal_repeated_prompts_and_no_cache_sampler(model, prompts):
    # With a seed, row b*K + k draws the uniform that row of a call with each prompt repeated K
    # times draws, and the shared prefill computes the same logits, so the samples are the same
    # tokens; and both are the no-cache sampler's. The logits of the paths need not agree to the
    # last bit (a matmul over B rows and one over B*K rows, or over one unpadded row, may round
    # differently), so "the same tokens" rests on no draw landing within rounding (~1e-7) of a
    # boundary of the cumulative distribution: a ~1e-7 event per draw.
    K, n = 4, 12
    repeated = [p for p in prompts for _ in range(K)]
    out = generate(model, prompts, n, temperature=1.0, seed=5, num_samples=K)
    assert out == generate(model, repeated, n, temperature=1.0, seed=5)
    assert out == sample_no_cache(model, repeated, n, 1.0, seed=5)
    assert len({tuple(r) for r in out[:K]}) > 1  # each copy draws its own noise
    assert out != generate(model, prompts, n, temperature=1.0, seed=6, num_samples=K)


def test_k_samples_edge_cases(model, prompts):
    assert generate(model, [], 4, num_samples=3) == []
    assert generate(model, prompts, 0, num_samples=2) == [[]] * 6
    with pytest.raises(ValueError, match="num_samples"):
        generate(model, prompts, 4, num_samples=0)
    # eos handling per row: the rows of one prompt stop on their own
    out = generate(model, prompts[:1], 40, temperature=1.5, seed=0, num_samples=64, eos_id=7)
    assert len(out) == 64 and all(r[-1] == 7 or len(r) == 40 for r in out)
    assert all(7 not in r[:-1] for r in out)
    assert len({len(r) for r in out}) > 1


def test_seed_reproducible_and_global_rng_untouched(model, prompts):
    torch.manual_seed(7)
    state = torch.get_rng_state()
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=50)
    a = generate(model, prompts, seed=0, **kw)
    b = generate(model, prompts, seed=0, **kw)
    c = generate(model, prompts, seed=1, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == b
    assert a != c
    # seed None draws from the global RNG, so it is reproducible through torch.manual_seed
    torch.manual_seed(3)
    d = generate(model, prompts, **kw)
    torch.manual_seed(3)
    assert generate(model, prompts, **kw) == d
    assert not torch.equal(torch.get_rng_state(), state)


def test_top_k_1_and_tiny_top_p_are_greedy(model, prompts, greedy):
    assert generate(model, prompts, N, temperature=1.5, top_k=1, seed=0) == greedy
    assert generate(model, prompts, N, temperature=1.5, top_p=1e-6, seed=0) == greedy


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.5)])
def test_sampling_follows_the_distribution(model, top_k, top_p):
    # one prompt repeated: first-token frequencies match softmax(logits / T), cut to the top k, or to
    # the most likely tokens whose mass before them is under top_p, and renormalised
    prompt = [5, 9, 13]
    T, rows = 0.7, 4000
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt]))[0, -1] / T, -1)
    p, order = probs.sort(descending=True)
    keep = torch.arange(len(p)) < top_k if top_k else p.cumsum(0) - p < top_p
    expected = torch.zeros_like(probs).scatter_(0, order, p * keep)
    expected /= expected.sum()
    assert 2 <= keep.sum() <= 20  # a cut that leaves a real choice
    out = generate(model, [prompt] * rows, 1, temperature=T, top_k=top_k, top_p=top_p, seed=0)
    freq = torch.bincount(torch.tensor([r[0] for r in out]), minlength=ARGS.vocab_size).float() / rows
    assert (freq[expected == 0] == 0).all()
    assert (freq - expected).abs().max() < 0.03  # about 4 standard errors at p = 0.5


def test_eos_stops_one_row_only(model, prompts, greedy):
    # eos: a token that row 0's greedy continuation emits and the other rows' never do
    others = set(greedy[1]) | set(greedy[2])
    i = next(i for i, t in enumerate(greedy[0]) if t not in others and t not in greedy[0][:i])
    eos = greedy[0][i]
    out = generate(model, prompts, N, temperature=0, eos_id=eos)
    assert out[0] == greedy[0][:i + 1]
    assert out[1:] == greedy[1:]


def test_stops_early_when_every_row_is_done(model, prompts, greedy):
    # both rows emit eos first: the loop must notice (within its check interval) and stop stepping
    eos = greedy[0][0]
    steps = []
    hook = model.register_forward_hook(lambda *_: steps.append(1))
    try:
        out = generate(model, [prompts[0]] * 2, 60, temperature=0, eos_id=eos)
    finally:
        hook.remove()
    assert out == [[eos], [eos]]
    assert len(steps) < 20  # 1 prefill + the steps up to the next check, not 60


def test_bad_prompts_are_rejected(model):
    with pytest.raises(ValueError, match=r"prompt 1 has 90 tokens; .*max_new_tokens=10.*100 > .*96"):
        generate(model, [[1, 2], [1] * 90], max_new_tokens=10)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(model, [[]], max_new_tokens=4)
    assert len(generate(model, [[1, 2, 3]], max_new_tokens=93, temperature=0)[0]) == 93  # exactly fits
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1, 2]], max_new_tokens=4, top_p=0.0)


def test_bf16_greedy_is_fp32_greedy_except_at_near_ties():
    """A bf16 copy of the model (bf16 weights, bf16 KV cache) decodes greedily as the fp32 model
    does, except at near-ties. Where a row's tokens part, the fp32 model's margin between its token
    and the bf16 copy's must be within what bf16 rounding moves a logit there (the largest gap
    between the two models' logits at that position, from a plain forward of each): a wrong cache
    row, mask or position in the bf16 path picks tokens far below the best one."""
    model = random_model()
    low = random_model().to(torch.bfloat16).train()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, ARGS.vocab_size, (n,), generator=g).tolist() for n in (2, 5, 9, 14, 21, 30, 44, 60)]
    a = generate(low, prompts, 20, temperature=0)
    assert low.training  # generate restores the mode it found
    b = generate(model, prompts, 20, temperature=0)
    assert any(x == y for x, y in zip(a, b))
    for p, x, y in zip(prompts, a, b):
        if x == y:
            continue
        i = next(i for i in range(len(x)) if x[i] != y[i])
        with torch.no_grad():
            z = model(torch.tensor([p + y[:i]]))[0, -1]                                  # fp32 logits [V]
            z_low = low.eval()(torch.tensor([p + y[:i]]))[0, -1].float()                  # bf16 logits [V]
        rounding = (z_low - z).abs().max()
        assert 0 < z[y[i]] - z[x[i]] <= 1.5 * rounding, (i, float(z[y[i]] - z[x[i]]), float(rounding))
        assert rounding < 0.05 * z.abs().max()  # and bf16 rounding is small: the copy is the same model
    # sampling in bf16: the requested lengths, tokens from the vocabulary
    out = generate(low, prompts, 8, temperature=0.8, top_p=0.9, seed=0)
    assert [len(r) for r in out] == [8] * len(prompts)
    assert all(0 <= t < ARGS.vocab_size for r in out for t in r)


# -----------------------------------------------------------------------------
# The command line, run as a user runs it: a checkpoint folder with its tokenizer, in a subprocess


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny random model saved with save_model, beside a demo tokenizer: the layout of an export.
    max_seq_len 64 is far below the command line's default of 256 new tokens."""
    path = tmp_path_factory.mktemp("export")
    tok = data.demo_tokenizer(data.demo_splits(seed=0, n_train=500, n_selfplay=0, n_test=0)["train"], str(path))
    args = replace(ARGS, vocab_size=tok.vocab_size, max_seq_len=64, bos_id=tok.bos_id, eos_id=tok.eos_id)
    save_model(random_model(args=args), path)
    return path, tok


def run_cli(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # a tiny model: threads only slow it down
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *argv], env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_defaults_fit_the_model_and_print_only_the_reply(export):
    path, tok = export
    prompt = "Sort: d b c a"
    r = run_cli("--model", str(path), "--prompt", prompt, "--seed", "0")  # otherwise the defaults
    assert r.returncode == 0, r.stderr
    # what the library gives for as many new tokens as fit, with the command line's defaults
    ids = tok.encode(tok.render([{"role": "user", "content": prompt}], add_generation_prompt=True), bos=True)
    room = 64 - len(ids)
    [reply] = generate(load_model(path), [ids], room, temperature=0.7, top_p=0.9, eos_id=tok.eos_id, seed=0)
    assert r.stdout == data.decode_response(tok, reply) + "\n"  # the reply and nothing else
    assert r.stdout.strip()
    # stderr, not a terminal here: the notice and no progress bar
    assert r.stderr == (f"sample.py: the prompt has {len(ids)} tokens and the model holds 64 (max_seq_len), "
                        f"so at most {room} new tokens instead of 256\n")


def test_cli_refuses_a_prompt_with_no_room(export):
    path, _ = export
    r = run_cli("--model", str(path), "--prompt", "a b c d " * 40, "--raw", "--max-new-tokens", "8")
    assert r.returncode != 0
    assert r.stdout == ""
    assert "error: prompt 0 has" in r.stderr and "> the model's max_seq_len 64" in r.stderr


def test_cli_chats_through_the_checkpoints_own_template(smollm2_dir, one_thread):
    """SmolLM2-135M-Instruct (dequantised from 4 bits: a slightly degraded SmolLM2): the prompt in its
    ChatML template, the reply greedy, stopped at <|im_end|>: what transformers' generate says."""
    transformers = pytest.importorskip("transformers")
    prompt = "What is the capital of France? Réponds en français."
    r = run_cli("--model", smollm2_dir, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    x = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)
    out = hf.generate(**x, max_new_tokens=24, do_sample=False)[0, x["input_ids"].shape[1]:].tolist()
    assert 2 in out  # it stopped at <|im_end|> (id 2) before the limit
    assert r.stdout == hf_tok.decode(out[:out.index(2)]) + "\n"
