"""Tests for tokenizer.py: the sentencepiece tokenizer against sentencepiece itself (under both
`legacy` settings), and against transformers itself: AutoTokenizer on an export encodes the template
as tokenizer.py does, BOS included; apply_chat_template renders as Tokenizer.render; transformers' greedy
generate on an exported tiny model equals sample.generate; a source checkpoint's own files are
copied; and the legacy setting of transformers' own tokenizer files is read, or files that cannot be
reproduced are refused."""
import json
import os
import random
import re
import shutil
import subprocess
import sys

import mistral_common
import pytest
import sentencepiece as spm
import torch

import data
import tokenizer
from conftest import ROOT
from model import ModelArgs, Transformer, save_model
from sample import generate
from tokenizer import Tokenizer

MISTRAL = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")

@pytest.fixture(scope="module")
def tok():
    return Tokenizer(MISTRAL)


@pytest.fixture(scope="module")
def sp():  # sentencepiece on its own: the independent reference
    return spm.SentencePieceProcessor(model_file=MISTRAL)


@pytest.fixture(scope="module")
def tok_legacy():  # as Mistral-7B's and zephyr's transformers tokenizers are published
    return Tokenizer(MISTRAL, legacy=True)

# -----------------------------------------------------------------------------
# the tokenizer and the template, on Mistral-7B's tokenizer


def test_special_ids(tok, sp):
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    assert tok.pad_id == tok.eos_id  # Mistral's model has no pad piece
    assert tok.encode("<s></s>") == [1, 2] and tok.decode([1, 2]) == "<s></s>"
    assert sp.encode("</s>") != [2]  # the reason encode splits on the special strings itself


@pytest.mark.parametrize("text", [
    "The quick brown fox.", "12 + 30 = 42", "  two leading spaces and two trailing  ", " x",
    "héllo wörld, こんにちは 🎉", "line one\nline two\n\n\ttab", "3.14159 and 1,000,000",
])
def test_plain_text_is_sentencepiece(tok, sp, text):
    assert tok.encode(text) == sp.encode(text)
    assert tok.encode(text, bos=True) == [sp.bos_id()] + sp.encode(text)
    # a continuation has no dummy space; sentencepiece after a byte-fallback "\n" (which merges with
    # nothing) gives the reference: "\nX" -> ["▁", "<0x0A>", tokens of X with no space before]
    assert tok.encode(text, continuation=True) == sp.encode("\n" + text)[2:]


@pytest.mark.parametrize("text", [
    "<|user|>\nHi</s>\n<|assistant|>\n", "<s><|user|>\nHi</s>\n<|assistant|>\nHello</s>",
    " leading", "trailing ", "  both  ", "</s> after eos", "a<s> b</s>c", "héllo 日本 🎉 Ω≈ç√",
    "0123456789 9876543210", "", "\n", "</s></s>", "a<unk> b", "<unk></s> <unk>",
])
def test_roundtrip(tok, tok_legacy, text):
    for t in (tok, tok_legacy):
        assert t.decode(t.encode(text)) == text
        assert t.decode(t.encode(text, continuation=True), continuation=True) == text


def test_no_space_after_eos(tok, sp):
    ids = tok.encode("<|user|>\nHi</s>\n<|assistant|>\n")
    after = ids[ids.index(tok.eos_id) + 1:]
    assert after == sp.encode("\n<|assistant|>\n")[1:]  # sentencepiece's own, minus only its dummy "▁"
    assert sp.id_to_piece(after[0]) == "<0x0A>"


def test_legacy_puts_the_dummy_space_after_every_special_token(tok, tok_legacy, sp):
    text = "<|user|>\nHi</s>\n<|assistant|>\n</s>Yo<unk> x<s>z"
    # legacy: each piece of text between special tokens is a sentencepiece document of its own
    assert tok_legacy.encode(text) == (sp.encode("<|user|>\nHi") + [2] + sp.encode("\n<|assistant|>\n") + [2]
                                       + sp.encode("Yo") + [0] + sp.encode(" x") + [1] + sp.encode("z"))
    assert sp.id_to_piece(tok_legacy.encode("</s>\n")[1]) == "▁"
    # without: only the start and text after <s> get the dummy space ("\n" then text, minus "▁\n": see above)
    def cont(x):
        return sp.encode("\n" + x)[2:]
    assert tok.encode(text) == (sp.encode("<|user|>\nHi") + [2] + cont("\n<|assistant|>\n") + [2]
                                + cont("Yo") + [0] + cont(" x") + [1] + sp.encode("z"))
    # a response continues its prompt under both settings
    assert tok_legacy.encode("Hi</s>", continuation=True) == tok.encode("Hi</s>", continuation=True) == cont("Hi") + [2]


def test_unk_is_a_special_token(tok, sp):
    # transformers reads "<unk>" in text as the unknown token; sentencepiece alone would spell it out
    assert tok.encode("<unk>") == [tok.unk_id] == [0] and sp.encode("<unk>") != [0]
    assert tok.decode([0]) == "<unk>"


def test_legacy_is_read_beside_the_model_file(tmp_path):
    shutil.copy(MISTRAL, tmp_path / "tokenizer.model")
    model_file = str(tmp_path / "tokenizer.model")
    assert not Tokenizer(model_file).legacy  # no transformers files: sentencepiece's rule
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": True}))
    assert Tokenizer(model_file).legacy
    assert not Tokenizer(model_file, legacy=False).legacy  # the argument wins
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(ValueError, match="no `legacy` setting"):
        Tokenizer(model_file)


# -----------------------------------------------------------------------------
# through transformers

transformers = pytest.importorskip("transformers")

# the demo tokenizer has no byte fallback: ASCII, with "#" and "~" (not in the demo text) as <unk>
DEMO_CHARS = "abcdefghijklmnopqrstuvwxyz WAPCRS 0123456789 +=?.: #~"
# Mistral's has: any unicode, runs of spaces, tabs and newlines inside a turn
MISTRAL_CHARS = "abcdefghij ABCXYZ 0123456789 .,!?-+=  \t\n é日本語🎉Ωﬁ\u00a0"


def random_chats(seed, chars, n=60):
    """n chats of random text: half open with a system turn, then one to three user/assistant turns."""
    rng = random.Random(seed)

    def text():
        return "".join(rng.choice(chars) for _ in range(rng.randint(1, 40)))
    chats = []
    for _ in range(n):
        chat = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            chat += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        chats.append(chat)
    return chats


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def export(root, tokenizer_model, config=None, model_type="mistral"):
    """A source folder (tokenizer.model, and a tokenizer_config.json if given) exported, as train.py
    exports each iteration, into a checkpoint folder with a config.json: that folder."""
    source, out = root / "source", root / "export"
    source.mkdir()
    shutil.copy(tokenizer_model, source / "tokenizer.model")
    if config is not None:
        write_json(source / "tokenizer_config.json", config)
    tokenizer.export_tokenizer(Tokenizer(str(source / "tokenizer.model")), str(out), source_dir=str(source))
    write_json(out / "config.json", {"model_type": model_type})
    return out


@pytest.fixture(scope="module")
def demo_model_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    data.demo_tokenizer(data.demo_splits(seed=0, n_train=2000, n_selfplay=0, n_test=0)["train"], str(out))
    return str(out / "tokenizer.model")


# name: (tokenizer.model, the source's tokenizer_config.json, random text, legacy)
CASES = {
    "demo": (None, None, DEMO_CHARS, False),
    "mistral": (MISTRAL, None, MISTRAL_CHARS, False),  # a bare tokenizer.model: sentencepiece's rule
    "mistral-legacy": (MISTRAL, {"legacy": True}, MISTRAL_CHARS, True),  # as Mistral-7B's and zephyr's
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, demo_model_file):
    """name -> (data.Tokenizer, transformers' AutoTokenizer), both reading the same export."""
    out = {}
    for name, (model_file, config, _, _) in CASES.items():
        folder = export(tmp_path_factory.mktemp(name), model_file or demo_model_file, config)
        out[name] = Tokenizer(str(folder / "tokenizer.model")), transformers.AutoTokenizer.from_pretrained(folder)
    return out

# -----------------------------------------------------------------------------
# the tokenizer and the template through transformers. The reference ids are TRL's for a prompt and a
# completion: the prompt's rendering tokenized with the tokenizer's special tokens, minus a second BOS
# where the template writes one; the completion's text (the whole chat's rendering with the prompt's
# cut off its front) tokenized with none.


def trl_prompt_ids(hf, prompt):
    ids = hf(hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False))["input_ids"]
    return ids[1:] if hf.bos_token_id is not None and ids[:2] == [hf.bos_token_id] * 2 else ids


def trl_response_ids(hf, prompt, response):
    text = hf.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
    start = hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert text.startswith(start)
    return hf(text[len(start):], add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", CASES)
def test_tokenizer_round_trip(exported, name):
    tok, hf = exported[name]
    assert tok.legacy == CASES[name][3]  # the export says what the source said
    for chat in random_chats(0, CASES[name][2]):
        prompt = chat[:-1]
        ids, _ = data.encode_prompt(tok, prompt, max_prompt=None)
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
        assert trl_prompt_ids(hf, prompt) == ids


@pytest.mark.parametrize("name", CASES)
def test_any_text(exported, name):
    # beyond the template too: special tokens anywhere, leading spaces and runs of them, "<unk>" as text
    tok, hf = exported[name]
    rng = random.Random(3)
    pieces = list(CASES[name][2]) + ["<s>", "</s>", "<unk>", "  "]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_legacy_decides_the_space_after_eos(exported):
    # the one difference between the two settings, in the template: "▁" (28705) before the "\n" (13)
    text = "<|user|>\nHi</s>\n<|assistant|>\n"
    for name, after_eos in (("mistral", [2, 13]), ("mistral-legacy", [2, 28705, 13])):
        tok, hf = exported[name]
        ids = hf(text)["input_ids"]
        assert ids == tok.encode(text, bos=True)
        assert ids[ids.index(2):ids.index(2) + len(after_eos)] == after_eos


@pytest.mark.parametrize("name", CASES)
def test_chat_template(exported, name):
    tok, hf = exported[name]
    for chat in random_chats(1, CASES[name][2], n=30):
        prompt = chat[:-1]
        text = hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        assert text == tok.render(prompt, add_generation_prompt=True) and text.startswith(hf.bos_token)
        ids = hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ids == data.encode_prompt(tok, prompt, max_prompt=None)[0]  # one BOS, from the template
        # a whole conversation: the same text, and the trainer's ids up to the last EOS
        assert hf.apply_chat_template(chat, tokenize=False) == tok.render(chat)
        full = hf.apply_chat_template(chat, tokenize=True, return_dict=False)
        assert full == tok.encode(tok.render(chat), bos=True)
        ids, _ = data.encode_chat(tok, chat)
        assert full[:len(ids)] == ids and tok.decode(full[len(ids):]) == "\n"


def test_greedy_generate_equals_sample(demo_model_file, tmp_path, one_thread):
    # a tiny random Mistral saved as train.py exports it: weights, then the tokenizer files
    tok = Tokenizer(demo_model_file)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=176,
                     vocab_size=tok.vocab_size, sliding_window=16, max_seq_len=256)
    model = Transformer(args).init_weights(0, std=0.2).eval()  # logits spread out: no near-ties in argmax
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30?"}]
    ids, _ = data.encode_prompt(tok, prompt)
    n = 40
    # make the model stop: EOS's output row becomes a slightly longer copy of the row of a token that
    # greedy decoding picks on the way, so it wins there, and generation_config.json's eos must end it
    free = generate(model, [ids], n, temperature=0)[0]
    token = free[n // 2]
    with torch.no_grad():
        model.output.weight[tok.eos_id] = 1.05 * model.output.weight[token]
    ours = generate(model, [ids], n, temperature=0, eos_id=tok.eos_id)[0]
    assert ours[-1] == tok.eos_id and len(ours) <= n // 2 + 1 and len(set(ours)) > 3

    save_model(model, tmp_path)
    tokenizer.export_tokenizer(tok, str(tmp_path))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = hf_tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt")
    assert x["input_ids"][0].tolist() == ids
    out = hf.generate(**x, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_id)
    assert out[0, len(ids):].tolist() == ours
    assert hf_tok.decode(out[0, len(ids):], skip_special_tokens=True) == data.decode_response(tok, ours)

# -----------------------------------------------------------------------------
# the files of an export


def test_export_files(exported, tmp_path):
    out = tmp_path / "export"
    tokenizer.export_tokenizer(Tokenizer(MISTRAL), str(out), model_max_length=2048)
    assert sorted(os.listdir(out)) == sorted(tokenizer.TOKENIZER_FILES)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["tokenizer_class"], config["bos_token"], config["eos_token"], config["unk_token"]) == \
        ("LlamaTokenizer", "<s>", "</s>", "<unk>")
    assert (config["add_bos_token"], config["add_eos_token"], config["legacy"], config["model_max_length"]) == \
        (True, False, False, 2048)
    assert config["chat_template"] == tokenizer.ZEPHYR_TEMPLATE
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == "</s>"
    with open(out / "tokenizer.model", "rb") as a, open(MISTRAL, "rb") as b:
        assert a.read() == b.read()
    # what transformers reads back
    hf = exported["mistral"][1]
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id) == (1, 2, 0, 2)


def test_export_loads_without_protobuf(exported, tmp_path):
    # transformers converts a bare tokenizer.model with protobuf; an export has tokenizer.json and needs none.
    # A google.protobuf that fails to import, first on the path, stands in for one not installed.
    (tmp_path / "google" / "protobuf").mkdir(parents=True)
    (tmp_path / "google" / "__init__.py").write_text("")
    (tmp_path / "google" / "protobuf" / "__init__.py").write_text("raise ImportError('no protobuf here')")
    folder = exported["mistral-legacy"][1].name_or_path
    code = ("import sys, transformers\n"
            "try:\n    import google.protobuf\nexcept ImportError:\n    pass\nelse:\n    sys.exit('protobuf imported')\n"
            f"print(transformers.AutoTokenizer.from_pretrained({str(folder)!r})('<|user|>\\nHi</s>\\n')['input_ids'])")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[1, 523, 28766, 1838, 28766, 28767, 13, 23809, 2, 28705, 13]"


def test_source_files_are_copied(demo_model_file, tmp_path):
    source, out = tmp_path / "source", tmp_path / "export"
    source.mkdir()
    shutil.copy(demo_model_file, source / "tokenizer.model")
    files = {  # odd spacing on purpose: copied means byte for byte
        "tokenizer_config.json": '{"legacy": false,  "model_max_length": 2048, "padding_side": "left"}',
        "special_tokens_map.json": '{"bos_token": "<s>",   "eos_token": "</s>"}',
        "generation_config.json": '{"bos_token_id": 1, "eos_token_id": 2,  "temperature": 0.7}',
    }
    for name, text in files.items():
        (source / name).write_text(text)
    tokenizer.export_tokenizer(Tokenizer(str(source / "tokenizer.model")), str(out), source_dir=str(source), model_max_length=99)
    for name in ("special_tokens_map.json", "generation_config.json", "tokenizer.model"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    # a tokenizer_config.json without a chat template gains ours, and keeps everything else
    assert json.loads((out / "tokenizer_config.json").read_text()) == \
        {**json.loads(files["tokenizer_config.json"]), "chat_template": tokenizer.ZEPHYR_TEMPLATE}
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"  # the missing one is written

    # one with its own template (zephyr's) is copied unchanged, like the rest
    (source / "tokenizer_config.json").write_text('{"legacy": false, "chat_template": "{{ messages }}"}')
    tokenizer.export_tokenizer(Tokenizer(str(source / "tokenizer.model")), str(out), source_dir=str(source))
    assert (out / "tokenizer_config.json").read_bytes() == (source / "tokenizer_config.json").read_bytes()
    # so is one whose template sits in chat_template.jinja, as newer transformers save it
    (source / "tokenizer_config.json").write_text('{"legacy": false}')
    (source / "chat_template.jinja").write_text("{{ messages }}")
    tokenizer.export_tokenizer(Tokenizer(str(source / "tokenizer.model")), str(out), source_dir=str(source))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (source / name).read_bytes()


def test_source_with_another_tokenizer_is_ignored(demo_model_file, tmp_path):
    source, out = tmp_path / "source", tmp_path / "export"
    source.mkdir()
    shutil.copy(MISTRAL, source / "tokenizer.model")  # not the tokenizer the model was trained with
    (source / "generation_config.json").write_text('{"eos_token_id": 7}')
    tokenizer.export_tokenizer(Tokenizer(demo_model_file), str(out), source_dir=str(source))
    assert (out / "tokenizer.model").read_bytes() == open(demo_model_file, "rb").read()
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}


def test_source_with_another_legacy_setting_is_refused(tmp_path):
    trained, source = tmp_path / "trained", tmp_path / "source"
    for folder, legacy in ((trained, False), (source, True)):
        folder.mkdir()
        shutil.copy(MISTRAL, folder / "tokenizer.model")
        write_json(folder / "tokenizer_config.json", {"legacy": legacy})
    with pytest.raises(ValueError, match="legacy=True.*legacy=False"):
        tokenizer.export_tokenizer(Tokenizer(str(trained / "tokenizer.model")), str(tmp_path / "out"), source_dir=str(source))

# -----------------------------------------------------------------------------
# reading the legacy setting from transformers' own files


@pytest.mark.parametrize("legacy", [True, False])
def test_legacy_of_transformers_own_tokenizer(tmp_path, legacy):
    # transformers builds its Llama tokenizer from tokenizer.model and the legacy flag (model_type llama:
    # for mistral, transformers 5 drops the dummy space), and saves it as a Metaspace tokenizer.json.
    # data.py reads the setting back from that file and encodes the template as transformers does.
    source, saved = tmp_path / "source", tmp_path / "saved"
    source.mkdir()
    shutil.copy(MISTRAL, source / "tokenizer.model")
    write_json(source / "config.json", {"model_type": "llama"})
    write_json(source / "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer", "legacy": legacy,
                                                   "add_bos_token": True, "add_eos_token": False})
    hf = transformers.AutoTokenizer.from_pretrained(source)
    hf.save_pretrained(saved)
    shutil.copy(MISTRAL, saved / "tokenizer.model")
    assert json.loads((saved / "tokenizer.json").read_text())["pre_tokenizer"]["type"] == "Metaspace"
    tok = Tokenizer(str(saved / "tokenizer.model"))
    assert tok.legacy == legacy and Tokenizer(str(source / "tokenizer.model")).legacy == legacy
    # single spaces: transformers 5 orders the merges it converts by id, not by score as sentencepiece
    # does, and so splits a run of spaces in its own way ("▁▁" + "x" for sentencepiece's "▁" + "▁x")
    for chat in random_chats(2, MISTRAL_CHARS.replace("  ", " "), n=40):
        prompt = chat[:-1]
        for m in prompt:
            m["content"] = re.sub(" +", " ", m["content"])
        # zephyr's template (the folder has none) writes BOS first; encode reads a BOS at the start of the
        # text as the one the tokenizer adds. (transformers' Metaspace with prepend_scheme "first" would
        # put no dummy space after a "<s>" written in text: sentencepiece's rule, and ours, put one.)
        text = tok.render(prompt, add_generation_prompt=True)
        assert text.startswith("<s>")
        assert hf(text.removeprefix("<s>"))["input_ids"] == data.encode_prompt(tok, prompt, max_prompt=None)[0]


def test_transformers_files_that_are_refused(exported, tmp_path):
    good = exported["mistral-legacy"][1].name_or_path
    spec = json.loads(open(os.path.join(good, "tokenizer.json"), encoding="utf-8").read())

    def folder(config=None, tokenizer_json=None):
        path = tmp_path / str(len(os.listdir(tmp_path)))
        path.mkdir()
        shutil.copy(MISTRAL, path / "tokenizer.model")
        if config is not None:
            write_json(path / "tokenizer_config.json", config)
        if tokenizer_json is not None:
            write_json(path / "tokenizer.json", tokenizer_json)
        return str(path / "tokenizer.model")

    assert Tokenizer(folder({"legacy": True}, spec)).legacy
    assert not Tokenizer(folder({"legacy": True}, spec), legacy=False).legacy  # the argument wins
    cases = [
        (folder({}), "no `legacy` setting"),
        (folder({"legacy": True, "add_bos_token": False}), "add_bos_token is false"),
        (folder({"legacy": False}, spec), "says legacy=False but tokenizer.json encodes as legacy=True"),
        (folder(None, {**spec, "added_tokens": spec["added_tokens"] + [
            {"id": 32000, "content": "<|im_start|>", "normalized": False, "special": True}]}), "'<|im_start|>'"),
        (folder(None, {**spec, "model": {**spec["model"], "vocab": {**spec["model"]["vocab"], "▁hello": 1}}}),
         "vocabulary"),
        # what transformers 5 makes of a bare tokenizer.model for model_type mistral: no dummy space
        (folder(None, {**spec, "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}}),
         "no dummy space"),
    ]
    for model_file, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            Tokenizer(model_file)

# -----------------------------------------------------------------------------
# today's chat models: a tokenizer.json through `tokenizers`, the checkpoint's own template

# zephyr-7b-sft-full's own chat template, as its tokenizer_config.json publishes it
ZEPHYR_PUBLISHED = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
# byte-level BPE takes any text: spaces, tabs and newlines, accents, CJK, emoji, a combining mark
BYTE_CHARS = "abcdefghij ABCXYZ 0123456789 .,!?-+=(){}  \t\n é日本語🎉Ωﬁ\u00a0e\u0301"


def check_against_trl(tok, hf, chats, whole_chat=False):
    """Prompt ids, response ids and the mask of every chat against transformers. whole_chat: take the
    reference response ids from the whole chat tokenized at once (TRL's SFTTrainer), for sentencepiece,
    whose dummy space a response tokenized alone (TRL's DPOTrainer) would get in front."""
    eot = sorted(tok.end_of_turn_ids)
    for chat in chats:
        prompt, response = data.split_chat(chat)
        assert tok.render(prompt, add_generation_prompt=True) == \
            hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        assert tok.render(chat) == hf.apply_chat_template(chat, tokenize=False)
        prompt_ids = trl_prompt_ids(hf, prompt)
        if whole_chat:
            reference = hf(hf.apply_chat_template(chat, tokenize=False))["input_ids"]
            assert reference[:len(prompt_ids)] == prompt_ids
            reference = reference[len(prompt_ids):]
        else:
            reference = trl_response_ids(hf, prompt, response)
        end = min(reference.index(i) for i in eot if i in reference)
        assert hf.decode(reference[end + 1:]) == "\n"  # what the template writes after the end-of-turn token
        ids, mask, cut = data.encode_example(tok, prompt, response, max_prompt=None, max_length=None)
        assert not cut and ids == prompt_ids + reference[:end + 1]
        assert mask == [0] * len(prompt_ids) + [1] * (end + 1)
        assert data.decode_response(tok, reference[:end + 1]) in (response, response.strip())  # a template may trim


def test_smollm2_ids_are_trls(smollm2_tokenizer_dir):
    tok, hf = Tokenizer(smollm2_tokenizer_dir), transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    assert tok.hf is not None and tok.sp is None  # tokenizer.json only: `tokenizers`
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.end_of_turn_ids) == (1, 2, 2, {2})
    assert tok.template_name.endswith("chat_template.jinja")
    chats = random_chats(4, BYTE_CHARS, n=40)  # half with a system turn, prompts of one to three exchanges
    assert any(c[0]["role"] == "system" for c in chats) and any(len(c) > 4 for c in chats)
    check_against_trl(tok, hf, chats)
    # SmolLM2's template writes its default system turn where there is none; its tokenizer adds no BOS
    ids, _ = data.encode_prompt(tok, [{"role": "user", "content": "Hi"}], None)
    assert hf.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    # special tokens written in text become their ids, as in transformers
    rng = random.Random(5)
    pieces = list(BYTE_CHARS) + ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "  "]
    for _ in range(200):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text, bos=True) == hf(text)["input_ids"]
        assert tok.decode(tok.encode(text)) == hf.decode(hf(text)["input_ids"])


def test_mistral_with_zephyrs_template_ids_are_transformers(tmp_path):
    # zephyr-7b-sft-full's layout: Mistral's tokenizer (legacy), its published template, no BOS in it
    source = tmp_path / "zephyr"
    source.mkdir()
    shutil.copy(MISTRAL, source / "tokenizer.model")
    write_json(source / "tokenizer_config.json", {"legacy": True, "chat_template": ZEPHYR_PUBLISHED})
    tokenizer.export_tokenizer(Tokenizer(str(source)), str(source))  # the tokenizer.json transformers reads
    tok, hf = Tokenizer(str(source)), transformers.AutoTokenizer.from_pretrained(source)
    assert tok.sp is not None and tok.legacy and tok.template == ZEPHYR_PUBLISHED and tok.end_of_turn_ids == {2}
    check_against_trl(tok, hf, random_chats(6, MISTRAL_CHARS, n=40), whole_chat=True)
    # the built-in zephyr template (for a folder without one) renders the published one's text after its BOS
    default = Tokenizer(MISTRAL, legacy=True)
    for chat in random_chats(7, MISTRAL_CHARS, n=10):
        assert default.render(chat) == "<s>" + tok.render(chat)
        assert data.encode_chat(default, chat) == data.encode_chat(tok, chat)
    # a response tokenized alone gets sentencepiece's dummy space in front (TRL's DPOTrainer); inside the
    # chat, and as generated after "<|assistant|>\n", it has none: ours is the chat's
    prompt, response = [{"role": "user", "content": "Hi"}], "Hello"
    assert trl_response_ids(hf, prompt, response)[:1] == tok.encode(" Hello", continuation=True)[:1] != \
        data.encode_response(tok, prompt, response)[:1]


def test_template_features_render_as_in_transformers(smollm2_tokenizer_dir, tmp_path):
    # loopcontrols, tojson (no ASCII escapes, no HTML escapes), {% generation %}, raise_exception,
    # strftime_now, the special tokens as variables, a template argument (Qwen3's enable_thinking)
    template = (
        "{{ bos_token }}{%- for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools here') }}"
        "{% endif %}{% if m.role == 'system' and m.content == 'skip' %}{% continue %}{% endif %}"
        "<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>"
        "{% endgeneration %}{% else %}{{ m.content | tojson }}<|im_end|>{% endif %}\n{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
        "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}{{ strftime_now('%Y') }}")
    (tmp_path / "t.jinja").write_text(template)
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    for args in ({}, {"enable_thinking": False}):
        tok = Tokenizer(smollm2_tokenizer_dir, chat_template=str(tmp_path / "t.jinja"), template_args=args)
        assert tok.template_name == str(tmp_path / "t.jinja")
        for chat in random_chats(8, BYTE_CHARS + "<>&'\"", n=20) + [[{"role": "system", "content": "skip"},
                                                                      {"role": "user", "content": "é <b>"}]]:
            for gen in (False, True):
                assert tok.render(chat, gen) == hf.apply_chat_template(
                    chat, chat_template=template, tokenize=False, add_generation_prompt=gen, **args)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 't.jinja'}: TemplateError: no tools here")):
        tok.render([{"role": "tool", "content": "x"}])
    assert tokenizer.parse_template_args(["enable_thinking=false", "n=3", "name=Smol"]) == \
        {"enable_thinking": False, "n": 3, "name": "Smol"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        tokenizer.parse_template_args(["enable_thinking"])


def test_a_template_that_reads_the_date_keeps_the_runs(smollm2_tokenizer_dir, tmp_path):
    # Llama 3.2 writes today's date into its system turn: a resumed run must render the day it started
    (tmp_path / "dated.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if loop.first %}Today: {{ strftime_now('%d %b %Y') }}\n"
        "{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    import train
    argv = ["--model", smollm2_tokenizer_dir, "--out", str(tmp_path / "run"), "--chat-template",
            str(tmp_path / "dated.jinja"), "--chat-template-arg", "enable_thinking=false"]
    os.makedirs(tmp_path / "run")
    chat = [{"role": "user", "content": "What day is it?"}, {"role": "assistant", "content": "Tuesday."}]
    first = train.load_tokenizer(train.parse_args(argv), rank=0)
    record = json.loads((tmp_path / "run" / "template.json").read_text())
    assert record["chat_template_args"] == {"enable_thinking": False}
    assert f"Today: {first.date.strftime('%d %b %Y')}\n" in first.render(chat)
    # the run started on another day: a resume renders that day, whatever the clock says
    (tmp_path / "run" / "template.json").write_text(json.dumps({**record, "date": "2001-02-03T04:05:06"}))
    resumed = train.load_tokenizer(train.parse_args(argv), rank=0)
    assert "Today: 03 Feb 2001\n" in resumed.render(chat)
    fixed = Tokenizer(smollm2_tokenizer_dir, str(tmp_path / "dated.jinja"), date=resumed.date)
    assert data.encode_chat(resumed, chat) == data.encode_chat(fixed, chat) != data.encode_chat(first, chat)
    # a resume with other template arguments would change the ids: refused
    with pytest.raises(SystemExit, match="template.json: this run was started with"):
        train.load_tokenizer(train.parse_args(argv[:-1] + ["enable_thinking=true"]), rank=0)


def test_generation_stops_at_every_end_of_turn_id(smollm2_tokenizer_dir, tmp_path, one_thread):
    # Llama 3's generation_config.json lists three ids; the GGUF-made SmolLM2 folder has none, so copy its
    # tokenizer files and add one
    folder = tmp_path / "llama3ish"
    shutil.copytree(smollm2_tokenizer_dir, folder)
    write_json(folder / "generation_config.json", {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]})
    tok = Tokenizer(str(folder))
    assert tok.end_of_turn_ids == {2, 128001, 128008, 128009}  # + its EOS, which is also the template's
    tokenizer.export_tokenizer(tok, str(tmp_path / "export"))  # the export declares the same set
    assert json.loads((tmp_path / "export" / "generation_config.json").read_text())["eos_token_id"] == \
        [128001, 128008, 128009]  # copied unchanged
    assert Tokenizer(str(tmp_path / "export")).end_of_turn_ids == tok.end_of_turn_ids
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64, vocab_size=128256,
                     max_seq_len=64)
    model = Transformer(args).init_weights(0, std=0.2).eval()
    prompt = [[5, 900, 31000, 7]]
    n = 12
    free = generate(model, prompt, n, temperature=0)[0]
    assert not set(free) & tok.end_of_turn_ids
    for stop in sorted(tok.end_of_turn_ids):  # make the model say `stop` where it said free[k]: it stops there
        k = 3
        changed = Transformer(args).init_weights(0, std=0.2).eval()
        with torch.no_grad():
            changed.output.weight[stop] = 1.05 * changed.output.weight[free[k]]
        out = generate(changed, prompt, n, temperature=0, eos_id=tok.end_of_turn_ids)[0]
        assert out == free[:k] + [stop], stop
        assert generate(changed, prompt, n, temperature=0, eos_id=tok.eos_id)[0][:k + 1] == free[:k] + [stop]


def test_without_tokenizers_the_message_says_what_to_install(smollm2_tokenizer_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers now raises ImportError
    with pytest.raises(ImportError, match="pip install tokenizers"):
        Tokenizer(smollm2_tokenizer_dir)


def test_a_folder_without_a_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: a folder with neither a tokenizer.json nor a tokenizer.model"):
        Tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        Tokenizer(str(tmp_path / "missing"))


def test_a_template_that_rewrites_the_prompt_is_refused(smollm2_tokenizer_dir, tmp_path):
    # as some reasoning templates do: the generation prompt opens a <think> block that the whole chat's
    # rendering of the same turn does not have, so no response text follows the prompt's
    bad = tmp_path / "reasoning.jinja"
    bad.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    tok = Tokenizer(smollm2_tokenizer_dir, chat_template=str(bad))
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(ValueError, match=re.escape(f"{bad}: the chat template's generation prompt is not the start")):
        data.encode_chat(tok, chat)
    # train.py stops before any work, naming the template
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--preset", "smoke", "--out", str(out),
                          "--chat-template", str(bad)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0 and f"{bad}: the chat template's generation prompt is not the start" in res.stderr
    assert not os.path.exists(out / "ckpt") and not os.path.exists(out / "iter_0")


def test_export_of_a_tokenizer_json_checkpoint(smollm2_tokenizer_dir, tmp_path):
    # a checkpoint with only tokenizer.json: its files are copied; a --chat-template replaces its template
    # in the export (chat_template.jinja would win over tokenizer_config.json in transformers: not copied)
    (tmp_path / "t.jinja").write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    for template in (None, str(tmp_path / "t.jinja")):
        out = tmp_path / f"export-{template is None}"
        tok = Tokenizer(smollm2_tokenizer_dir, chat_template=template)
        tokenizer.export_tokenizer(tok, str(out), model_max_length=2048)
        assert not (out / "tokenizer.model").exists()
        assert (out / "tokenizer.json").read_bytes() == open(tok.file, "rb").read()
        assert (out / "chat_template.jinja").exists() == (template is None)
        hf = transformers.AutoTokenizer.from_pretrained(out)
        again = Tokenizer(str(out))
        assert again.template == tok.template and again.end_of_turn_ids == {2}
        chats = random_chats(9, BYTE_CHARS, n=10)
        check_against_trl(again, hf, chats)
        assert [data.encode_chat(again, c) for c in chats] == [data.encode_chat(tok, c) for c in chats]
    # no pad token: EOS pads (masked out everywhere)
    folder = tmp_path / "nopad"
    shutil.copytree(smollm2_tokenizer_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["pad_token"]
    write_json(folder / "tokenizer_config.json", config)
    assert Tokenizer(str(folder)).pad_id == Tokenizer(str(folder)).eos_id == 2


def test_check_command_on_a_tokenizer_json_checkpoint(smollm2_tokenizer_dir, tmp_path, capsys):
    chats = [{"messages": c} for c in random_chats(10, BYTE_CHARS, n=12)]
    path = tmp_path / "chats.jsonl"
    data.save_jsonl(str(path), chats)
    assert data.main(["check", str(path), "--tokenizer", smollm2_tokenizer_dir, "--max-prompt", "4096",
                      "--max-length", "8192"]) == 0
    out = capsys.readouterr().out
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    total = sum(len(trl_prompt_ids(hf, c["messages"][:-1])) + len(trl_response_ids(hf, c["messages"][:-1],
                c["messages"][-1]["content"])) - 1 for c in chats)  # minus the "\n" after <|im_end|>
    assert f"tokens: {total} in 12 sequences, 0 truncated" in out
    assert data.main(["check", str(path), "--tokenizer", str(tmp_path / "nowhere")]) == 1
    assert f"{tmp_path / 'nowhere'}: no such file or folder" in capsys.readouterr().err
    assert data.main(["check", str(path), "--tokenizer", smollm2_tokenizer_dir, "--chat-template-arg", "x"]) == 1
    assert "--chat-template-arg 'x': expected KEY=VALUE" in capsys.readouterr().err


def test_train_names_the_flag_of_a_missing_tokenizer(tmp_path):
    import train
    for argv, message in ((["--model", str(tmp_path / "smol")], f"--model: {tmp_path / 'smol'}: no such file or folder"),
                          (["--model", str(tmp_path)], f"--model: {tmp_path}: a folder with neither a tokenizer.json"),
                          (["--tokenizer", str(tmp_path / "t.json")], f"--tokenizer: {tmp_path / 't.json'}: no such"),
                          (["--chat-template", str(tmp_path / "x.jinja")], f"--chat-template: {tmp_path / 'x.jinja'}: no such")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            train.load_tokenizer(train.parse_args(argv + ["--out", str(tmp_path / "out")]), rank=0)


def test_a_tokenizer_that_adds_bos_and_a_template_that_writes_it(smollm2_tokenizer_dir, tmp_path):
    # Llama 3's layout: tokenizer.json's post-processor adds a BOS, and the template writes bos_token
    # too: transformers' tokenizer then gives two, TRL's rule (and ours) keeps one
    folder = tmp_path / "bos"
    shutil.copytree(smollm2_tokenizer_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    write_json(folder / "tokenizer_config.json", {**config, "bos_token": "<|endoftext|>"})
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}
    write_json(folder / "tokenizer.json", spec)
    (folder / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok, hf = Tokenizer(str(folder)), transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.bos_id == hf.bos_token_id == 0 and hf("x")["input_ids"][0] == 0  # transformers adds it too
    chats = random_chats(11, BYTE_CHARS, n=20)
    assert all(hf(hf.apply_chat_template(c[:-1], add_generation_prompt=True, tokenize=False))["input_ids"][:2] == [0, 0]
               for c in chats)
    check_against_trl(tok, hf, chats)
    # a long prompt keeps its BOS and its last tokens
    ids, cut = data.encode_prompt(tok, [{"role": "user", "content": "word " * 300}], max_prompt=64)
    full, _ = data.encode_prompt(tok, [{"role": "user", "content": "word " * 300}], max_prompt=None)
    assert cut and ids == [0] + full[-63:]


def test_when_a_stored_response_re_encodes_to_other_ids(smollm2_tokenizer_dir):
    # generated responses are stored as text; self-play logs the share whose text re-encodes to other ids
    tok = Tokenizer(smollm2_tokenizer_dir)
    prompt = [{"role": "user", "content": "Say something."}]
    canonical = data.encode_response(tok, prompt, "Hello wörld, 日本語!")
    assert canonical[-1] == 2 and data.encode_response(tok, prompt, data.decode_response(tok, canonical)) == canonical
    # a split byte-level BPE would not make: one token per character of "Hello"
    split = [i for ch in "Hello" for i in tok.encode(ch)] + canonical[1:]
    assert split != canonical and data.decode_response(tok, split) == data.decode_response(tok, canonical)
    assert data.encode_response(tok, prompt, data.decode_response(tok, split)) == canonical != split
    # a reply cut at the length limit inside a character: its text ends in U+FFFD, which encodes otherwise
    cut = tok.encode("Hello 日")[:-1]  # "日" is three bytes, more than one token here
    assert data.decode_response(tok, cut).endswith("\ufffd")
    assert data.encode_response(tok, prompt, data.decode_response(tok, cut))[:-1] != cut
