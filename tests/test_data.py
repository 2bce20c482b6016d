"""Tests for data.py: the template and loss mask on the real Mistral-7B tokenizer, every kind of bad
JSONL line, truncation, batching, convert and the demo task. tests/test_tokenizer.py holds the
tokenizer's own tests and the comparisons with transformers."""
import json
import os
import re
import sys

import mistral_common
import pytest
import torch

import data
from tokenizer import Tokenizer

MISTRAL = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42."},
    {"role": "user", "content": " Now say héllo in Japanese 🎉"},
    {"role": "assistant", "content": "こんにちは!\nThat is  \"hello\"."},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(MISTRAL)

# -----------------------------------------------------------------------------
# the template and the loss mask, on Mistral-7B's tokenizer


def test_chat_has_bos_and_an_eos_per_turn(tok):
    ids, loss_mask = data.encode_chat(tok, CHAT)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids.count(tok.eos_id) == len(CHAT) and ids[-1] == tok.eos_id
    # each turn, cut at its EOS, is that turn's text in the template
    turns, start = [], 1
    for end in [i for i, t in enumerate(ids) if t == tok.eos_id]:
        turns.append(tok.decode(ids[start:end], continuation=start > 1))
        start = end + 1
    assert turns == [("\n" if i else "") + f"<|{m['role']}|>\n{m['content']}" for i, m in enumerate(CHAT)]
    # the whole conversation: the template's text, ending at the last EOS (no "\n" after it) ...
    assert tok.decode(ids) == tok.render(CHAT)[:-1]
    # ... and the same tokens as encoding that text in one piece: splitting off the response changed nothing
    assert ids == tok.encode(tok.render(CHAT)[:-1], bos=True)


def test_loss_mask_is_the_last_assistant_turn(tok):
    ids, loss_mask = data.encode_chat(tok, CHAT)
    assert len(ids) == len(loss_mask) and set(loss_mask) == {0, 1}
    first = loss_mask.index(1)
    assert all(loss_mask[first:]) and loss_mask[-1] == 1  # one contiguous run, ending with the EOS
    assert tok.decode(ids[first:], continuation=True) == CHAT[-1]["content"] + "</s>"
    assert tok.decode(ids[:first]) == tok.render(CHAT[:-1], add_generation_prompt=True)


def test_render_chat(tok):
    # zephyr's template (tokenizer.model.v1 comes with no template), BOS first: the tokenizer adds one
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert tok.render(msgs) == "<s><|user|>\nHi</s>\n<|assistant|>\nYo</s>\n"
    assert tok.render(msgs[:1], add_generation_prompt=True) == "<s><|user|>\nHi</s>\n<|assistant|>\n"
    assert data.split_chat(CHAT) == (CHAT[:-1], CHAT[-1]["content"])
    with pytest.raises(ValueError):
        data.split_chat(CHAT[:-1])


def test_decode_response(tok):
    ids = tok.encode(" Sure: 42", continuation=True) + [tok.eos_id, 5, 6]
    assert data.decode_response(tok, ids) == " Sure: 42"
    assert data.decode_response(tok, tok.encode("no eos", continuation=True)) == "no eos"

# -----------------------------------------------------------------------------
# truncation


def test_truncation_keeps_bos_and_the_last_prompt_tokens(tok):
    prompt = [{"role": "user", "content": " ".join(f"w{i}" for i in range(400))}]
    response = " ".join(f"r{i}" for i in range(200))
    full_prompt = tok.encode(tok.render(prompt, add_generation_prompt=True), bos=True)
    full_reply = tok.encode(response + "</s>", continuation=True)
    assert len(full_prompt) > 64 and len(full_reply) > 100

    ids, loss_mask, truncated = data.encode_example(tok, prompt, response, max_prompt=64, max_length=100)
    assert truncated and len(ids) == len(loss_mask) == 100
    assert ids[:64] == [tok.bos_id] + full_prompt[-63:]  # BOS, then the last tokens, which end in "<|assistant|>\n"
    assert ids[64:] == full_reply[:36] and loss_mask == [0] * 64 + [1] * 36

    # a long prompt with a short response: only the prompt is cut, the response keeps its EOS
    ids, loss_mask, truncated = data.encode_example(tok, prompt, "ok", max_prompt=64, max_length=100)
    assert truncated and len(ids) == 64 + len(tok.encode("ok</s>", continuation=True)) and ids[-1] == tok.eos_id
    # a short prompt with a long response: the response is cut to max_length - len(prompt)
    short = [{"role": "user", "content": "Hi"}]
    ids, loss_mask, truncated = data.encode_example(tok, short, response, max_prompt=64, max_length=100)
    assert truncated and len(ids) == 100 and loss_mask.count(0) == len(data.encode_prompt(tok, short)[0])
    # nothing to cut
    ids, loss_mask, truncated = data.encode_example(tok, short, "Hello")
    assert not truncated and ids[-1] == tok.eos_id
    with pytest.raises(ValueError):
        data.encode_example(tok, short, "Hello", max_prompt=100, max_length=100)

# -----------------------------------------------------------------------------
# dataset files

GOOD_CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
U, A, S = ({"role": r, "content": "x"} for r in ("user", "assistant", "system"))
GOOD_SELFPLAY = {"messages": [S, U], "real": "yes", "generated": ["no", ""], "ref_real": -3.5, "ref_generated": [-1, -2.25],
                 "drawn_by": 0}

BAD_CHATS = [  # (line, field or phrase the error must name)
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ("{}", "messages: missing"),
    ('{"messages": []}', "messages: must be a non-empty list"),
    ('{"messages": "hi"}', "messages: must be a non-empty list"),
    ('{"messages": ["hi"]}', "messages[0]: must be an object"),
    (json.dumps({"messages": [U, {"role": "bot", "content": "x"}]}), "messages[1].role: unknown role 'bot'"),
    (json.dumps({"messages": [U, {"content": "x"}]}), "messages[1].role: missing"),
    (json.dumps({"messages": [U, {"role": "assistant"}]}), "messages[1].content: missing"),
    (json.dumps({"messages": [U, {"role": "assistant", "content": 5}]}), "messages[1].content: must be a string"),
    (json.dumps({"messages": [U, {"role": "assistant", "content": " \n"}]}), "messages[1].content: is empty"),
    (json.dumps({"messages": [{"role": "user", "content": "a</s>b"}, A]}), "messages[0].content: contains"),
    (json.dumps({"messages": [A, U, A]}), "messages[0].role: got 'assistant' where 'user'"),
    (json.dumps({"messages": [U, U, A]}), "messages[1].role: got 'user' where 'assistant'"),
    (json.dumps({"messages": [U, S, A]}), "messages[1].role: got 'system'"),
    (json.dumps({"messages": [S, S, U, A]}), "messages[1].role"),
    (json.dumps({"messages": [U, A, U]}), "messages: the last turn is 'user'"),
    (json.dumps({"messages": [S]}), "messages: the last turn is 'system'"),
]

BAD_SELFPLAY = [
    ({"messages": [U, A]}, "messages: the last turn is 'assistant', expected 'user'"),
    ({"real": None}, "real: must be a non-empty string"),
    ({"real": ""}, "real: must be a non-empty string"),
    ({"generated": []}, "generated: must be a non-empty list"),
    ({"generated": ["a", 3]}, "generated: must be a non-empty list of strings"),
    ({"ref_real": "1.0"}, "ref_real: must be a finite number"),
    ({"ref_real": True}, "ref_real: must be a finite number"),
    ({"ref_real": float("nan")}, "ref_real: must be a finite number"),
    ({"ref_generated": [1.0, float("inf")]}, "ref_generated: must be a list of finite numbers"),
    ({"ref_generated": [1.0]}, "ref_generated: has 1 scores for 2 generated"),
    ({"generated": ["a", "b", "c"], "ref_generated": [1, 2, 3]}, "generated: has 3 responses where the earlier lines have 2"),
    ({"drawn_by": None}, "drawn_by: must be the iteration whose model drew the responses"),
    ({"drawn_by": -1}, "drawn_by: must be the iteration"),
    ({"drawn_by": 1.0}, "drawn_by: must be the iteration"),
]


def write_lines(tmp_path, lines):
    path = str(tmp_path / "file.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("line,problem", BAD_CHATS)
def test_bad_chat_line(tmp_path, line, problem):
    path = write_lines(tmp_path, [json.dumps(GOOD_CHAT), "", line, json.dumps(GOOD_CHAT)])
    with pytest.raises(ValueError) as e:
        data.load_chats(path)
    assert f"{path}:3: {problem}" in str(e.value)  # the blank line 2 still counts


@pytest.mark.parametrize("change,problem", BAD_SELFPLAY)
def test_bad_selfplay_line(tmp_path, change, problem):
    path = write_lines(tmp_path, [json.dumps(GOOD_SELFPLAY), json.dumps({**GOOD_SELFPLAY, **change})])
    with pytest.raises(ValueError) as e:
        data.load_selfplay(path)
    assert f"{path}:2: {problem}" in str(e.value)


def test_every_bad_line_is_reported(tmp_path):
    path = write_lines(tmp_path, ["{", json.dumps(GOOD_CHAT), json.dumps({"messages": [U]}), "3"])
    with pytest.raises(ValueError) as e:
        data.load_chats(path)
    assert [m.split(": ")[0] for m in str(e.value).splitlines()] == [f"{path}:1", f"{path}:3", f"{path}:4"]


def test_bad_utf8_and_empty_files(tmp_path):
    path = str(tmp_path / "bytes.jsonl")
    with open(path, "wb") as f:
        f.write(json.dumps(GOOD_CHAT).encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not valid UTF-8")):
        data.load_chats(path)
    with pytest.raises(ValueError, match="no records"):
        data.load_chats(write_lines(tmp_path, [""]))


def test_good_files_roundtrip(tmp_path):
    chats = [GOOD_CHAT, {"messages": CHAT}]
    data.save_jsonl(str(tmp_path / "a" / "chats.jsonl"), chats)
    assert data.load_chats(str(tmp_path / "a" / "chats.jsonl")) == chats
    records = [GOOD_SELFPLAY, {**GOOD_SELFPLAY, "real": "é 🎉"}]
    data.save_jsonl(str(tmp_path / "sp.jsonl"), records)
    assert data.load_selfplay(str(tmp_path / "sp.jsonl")) == records
    assert sorted(os.listdir(tmp_path)) == ["a", "sp.jsonl"]  # no temporary file left behind
    with pytest.raises(ValueError):  # NaN is not JSON: refused at write time, the old file kept
        data.save_jsonl(str(tmp_path / "sp.jsonl"), [{**GOOD_SELFPLAY, "ref_real": float("nan")}])
    assert data.load_selfplay(str(tmp_path / "sp.jsonl")) == records


def test_check_command(tmp_path, capsys):
    good = str(tmp_path / "good.jsonl")
    data.save_jsonl(good, [GOOD_CHAT, {"messages": CHAT}])
    assert data.main(["check", good, "--tokenizer", MISTRAL, "--max-prompt", "20", "--max-length", "40"]) == 0
    out = capsys.readouterr().out
    assert "2 chats, 7 turns" in out and "1 truncated" in out
    sp_file = str(tmp_path / "sp.jsonl")
    data.save_jsonl(sp_file, [GOOD_SELFPLAY])
    assert data.main(["check", sp_file, "--tokenizer", MISTRAL]) == 0
    assert "1 self-play prompts, K = 2" in capsys.readouterr().out
    bad = write_lines(tmp_path, [json.dumps(GOOD_CHAT), json.dumps({"messages": [U, U]})])
    assert data.main(["check", bad]) == 1
    assert f"{bad}:2: messages[1].role" in capsys.readouterr().err

# -----------------------------------------------------------------------------
# batching


def test_batches_split_across_ranks():
    n, batch_size = 103, 8
    one = data.batches(n, batch_size, seed=1, epoch=0)
    assert len(one) == n // batch_size and all(len(b) == batch_size for b in one)
    flat = [i for b in one for i in b]
    assert len(set(flat)) == len(flat) and set(flat) <= set(range(n))
    for world_size in (2, 4):
        ranks = [data.batches(n, batch_size, seed=1, epoch=0, rank=r, world_size=world_size) for r in range(world_size)]
        assert [sum((r[i] for r in ranks), []) for i in range(len(one))] == one
    assert data.batches(n, batch_size, seed=1, epoch=0) == one  # same seed, same order
    assert data.batches(n, batch_size, seed=1, epoch=1) != one  # a new epoch reshuffles
    assert data.batches(n, batch_size, seed=2, epoch=0) != one
    with pytest.raises(ValueError, match="divisible"):
        data.batches(n, batch_size, seed=1, world_size=3)
    with pytest.raises(ValueError):
        data.batches(5, batch_size, seed=1)


def test_collate_by_hand():
    examples = [([1, 10, 11, 12, 2], [0, 0, 0, 1, 1]),
                ([1, 20, 21, 22, 23, 24, 25, 26, 2], [0, 0, 0, 0, 0, 1, 1, 1, 1]),
                ([1, 2], [0, 1])]
    tokens, targets, mask = data.collate(examples, pad_id=99)
    P = 99
    assert tokens.tolist() == [[1, 10, 11, 12, P, P, P, P], [1, 20, 21, 22, 23, 24, 25, 26], [1, P, P, P, P, P, P, P]]
    assert targets.tolist() == [[10, 11, 12, 2, P, P, P, P], [20, 21, 22, 23, 24, 25, 26, 2], [2, P, P, P, P, P, P, P]]
    assert mask.tolist() == [[0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert tokens.dtype == targets.dtype == torch.long and mask.dtype == torch.bool


def test_collate_lines_up_with_a_per_example_logprob(tmp_path):
    # A toy "model" whose logits at a position depend on that position's token only. The batched,
    # padded log-prob of each response must equal the one computed on the unpadded example alone.
    splits = data.demo_splits(seed=0, n_train=300, n_selfplay=0, n_test=0)
    tok = data.demo_tokenizer(splits["train"], str(tmp_path))
    examples = [data.encode_example(tok, *data.split_chat(c["messages"]))[:2] for c in splits["train"][:16]]
    assert len({len(ids) for ids, _ in examples}) > 3  # varied lengths
    table = torch.randn(tok.vocab_size, tok.vocab_size, generator=torch.Generator().manual_seed(0))
    tokens, targets, mask = data.collate(examples, tok.pad_id)
    logp = table[tokens].log_softmax(-1).gather(-1, targets[..., None])[..., 0]  # [B, T]
    batched = (logp * mask).sum(-1)
    for b, (ids, loss_mask) in enumerate(examples):
        naive = sum(table[ids[t]].log_softmax(-1)[ids[t + 1]] for t in range(len(ids) - 1) if loss_mask[t + 1])
        assert torch.allclose(batched[b], naive, atol=1e-5)
        assert mask[b].sum() == sum(loss_mask)  # every response token (BOS is never a target)

# -----------------------------------------------------------------------------
# the demo task


def _problem(chat):  # what a problem is, regardless of phrasing: its numbers or letters, and its answer
    question, answer = chat["messages"][0]["content"], chat["messages"][1]["content"]
    return tuple(re.findall(r"\d+|\b[a-z]\b", question)), answer


def test_demo_splits_disjoint_deterministic_and_correct():
    splits = data.demo_splits(seed=5, n_train=2000, n_selfplay=500, n_test=200)
    assert {k: len(v) for k, v in splits.items()} == {"train": 2000, "selfplay": 500, "test": 200}
    problems = {k: {_problem(c) for c in v} for k, v in splits.items()}
    assert len(problems["train"]) == 2000 and len(problems["test"]) == 200
    assert not problems["train"] & problems["test"] and not problems["train"] & problems["selfplay"]
    assert not problems["selfplay"] & problems["test"]
    assert data.demo_splits(seed=5, n_train=2000, n_selfplay=500, n_test=200) == splits
    assert data.demo_splits(seed=6, n_train=2000, n_selfplay=500, n_test=200) != splits
    assert data.demo_splits(seed=5, n_train=10, n_selfplay=500, n_test=200)["test"] == splits["test"]
    for chat in sum(splits.values(), []):  # recompute every answer
        assert [m["role"] for m in chat["messages"]] == ["user", "assistant"]
        question, answer = chat["messages"][0]["content"], chat["messages"][1]["content"]
        if re.fullmatch(r"\d+ [+-] \d+ = \d+", answer):
            a, op, b, _, c = answer.split()
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) and int(c) >= 0
            assert a in question and b in question
        else:
            letters = question.split(": ")[1].split()
            assert answer.split() in (letters[::-1], sorted(letters))


def test_exact_match():
    assert data.exact_match("12 + 30 = 42", "12 + 30 = 42")
    assert data.exact_match("  12 +  30 = 42\n", "12 + 30 = 42")
    assert not data.exact_match("12 + 30 = 43", "12 + 30 = 42")
    assert not data.exact_match("12 + 30 = 42.", "12 + 30 = 42")
    assert not data.exact_match("A b c", "a b c")
    assert not data.exact_match("", "a")


def test_demo_tokenizer(tmp_path):
    chats = sum(data.demo_splits(seed=0).values(), [])
    tok = data.demo_tokenizer(chats, str(tmp_path / "a"))
    data.demo_tokenizer(chats, str(tmp_path / "b"))
    with open(tmp_path / "a" / "tokenizer.model", "rb") as a, open(tmp_path / "b" / "tokenizer.model", "rb") as b:
        assert a.read() == b.read()  # same chats, same model
    assert 200 < tok.vocab_size <= 320 and (tok.bos_id, tok.eos_id, tok.sp.unk_id()) == (1, 2, 0)
    assert tok.encode("Add 2") == tok.encode("Add 2", continuation=True)  # no dummy space: see demo_tokenizer
    assert tok.encode("</s>") == [tok.eos_id] and tok.encode("<s>") == [tok.bos_id]
    for tag in ("<|user|>", "<|assistant|>", "<|system|>", "\n"):
        assert len(tok.encode(tag, continuation=True)) == 1
    for chat in chats[::7]:
        text = tok.render(chat["messages"])
        assert tok.decode(tok.encode(text, bos=True)) == text  # one BOS, the template's
        ids, loss_mask = data.encode_chat(tok, chat["messages"])
        assert tok.decode([i for i, m in zip(ids, loss_mask) if m], continuation=True) == chat["messages"][-1]["content"] + "</s>"
    assert tok.encode("é", continuation=True) == [tok.sp.unk_id()]  # no byte fallback: not in the demo text


def test_demo_command(tmp_path, capsys):
    assert data.main(["demo", str(tmp_path)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["selfplay.jsonl", "test.jsonl", "tokenizer.model", "train.jsonl"]
    assert data.load_chats(str(tmp_path / "test.jsonl")) == data.demo_splits(seed=0)["test"]

# -----------------------------------------------------------------------------
# data.py convert: ShareGPT, Alpaca and our own layout into chat JSONL. The expected chats are
# written out by hand, turn by turn, from the layouts' published shapes.


def _m(*turns):  # ("user", "Hi"), ... -> a chat
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


SHAREGPT = [  # (record, the chat it must become)
    ({"conversations": [{"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "2 + 2 = 4."}]},
     _m(("user", "What is 2 + 2?"), ("assistant", "2 + 2 = 4."))),
    ({"id": "x1", "conversations": [
        {"from": "system", "value": "You answer in French."}, {"from": "human", "value": "Hello, how are you?"},
        {"from": "gpt", "value": "Très bien, merci !"}, {"from": "human", "value": "And in Japanese? 🎌"},
        {"from": "gpt", "value": "元気です。\n\nThat is \"genki desu\"."}]},
     _m(("system", "You answer in French."), ("user", "Hello, how are you?"), ("assistant", "Très bien, merci !"),
        ("user", "And in Japanese? 🎌"), ("assistant", "元気です。\n\nThat is \"genki desu\"."))),
    ({"system": "Be brief.", "conversations": [{"from": "user", "value": "Name a prime."}, {"from": "assistant", "value": "7"}]},
     _m(("system", "Be brief."), ("user", "Name a prime."), ("assistant", "7"))),
    ({"conversations": [{"from": "system", "value": ""}, {"from": "human", "value": "Hi"}, {"from": "chatgpt", "value": "Hey"}]},
     _m(("user", "Hi"), ("assistant", "Hey"))),  # an empty system prompt is none
]

ALPACA = [
    ({"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well.\n2. Sleep.\n3. Move."},
     _m(("user", "Give three tips for staying healthy."), ("assistant", "1. Eat well.\n2. Sleep.\n3. Move."))),
    ({"instruction": "Translate to German.", "input": "Good morning, café ☕", "output": "Guten Morgen, Café ☕"},
     _m(("user", "Translate to German.\n\nGood morning, café ☕"), ("assistant", "Guten Morgen, Café ☕"))),
    ({"instruction": "Add the numbers.", "input": None, "output": "5", "system": "You are a calculator."},
     _m(("system", "You are a calculator."), ("user", "Add the numbers."), ("assistant", "5"))),
    ({"instruction": "Say hi.", "output": "Hi!", "system": ""}, _m(("user", "Say hi."), ("assistant", "Hi!"))),
]

MESSAGES = [
    ({"prompt": "Hi", "prompt_id": "abc", "messages": [{"role": "user", "content": "Hi", "name": "x"},
                                                       {"role": "assistant", "content": "Hello 👋"}]},
     _m(("user", "Hi"), ("assistant", "Hello 👋"))),  # UltraChat200k's shape: the extra fields go
    ({"messages": CHAT}, {"messages": CHAT}),
]

LAYOUTS = {"sharegpt": SHAREGPT, "alpaca": ALPACA, "messages": MESSAGES}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_convert_layouts(tmp_path, capsys, layout):
    src = write_lines(tmp_path, [json.dumps(r, ensure_ascii=False) for r, _ in LAYOUTS[layout]])
    out = str(tmp_path / "chats.jsonl")
    assert data.main(["convert", src, out, "--from", layout]) == 0
    n = len(LAYOUTS[layout])
    assert f"read {n}, written {n} to {out}, rejected 0" in capsys.readouterr().out
    assert data.load_chats(out) == [chat for _, chat in LAYOUTS[layout]]
    assert os.path.getsize(tmp_path / "chats.rejected.jsonl") == 0  # written even when empty: no stale file misleads
    assert data.main(["check", out, "--tokenizer", MISTRAL]) == 0


def test_convert_first_turn(tmp_path):
    """The system turn and the first exchange; what follows is not kept, so it is not checked either."""
    records = [r for r, _ in SHAREGPT] + [
        {"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"}, {"from": "human", "value": "unanswered"}]},
        {"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"}, {"from": "gpt", "value": 3}]},
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "only a question"}]},
    ]
    src = write_lines(tmp_path, [json.dumps(r) for r in records])
    out = str(tmp_path / "first.jsonl")
    assert data.convert(src, out, "sharegpt", first_turn=True) == (7, 6, 1)
    first = [chat["messages"][:3 if chat["messages"][0]["role"] == "system" else 2] for _, chat in SHAREGPT]
    assert [c["messages"] for c in data.load_chats(out)] == first + [[U | {"content": "Q1"}, A | {"content": "A1"}]] * 2
    with open(data.rejected_path(out)) as f:
        (bad,) = [json.loads(line) for line in f]
    assert bad["line"] == 7 and bad["reason"].startswith("conversations: the last turn is 'user'")
    # our own layout too: UltraChat's multi-turn chats become single-turn ones
    ours = write_lines(tmp_path, [json.dumps({"messages": CHAT})])
    data.convert(ours, out, "messages", first_turn=True)
    assert data.load_chats(out) == [{"messages": CHAT[:3]}]


def test_convert_drops_a_leading_assistant_turn(tmp_path, capsys):
    # ShareGPT's split conversations: FastChat's trainer drops a first turn that is the assistant's. A
    # system turn before it stays; with --first-turn the first user/assistant exchange after it is kept.
    G, H = ({"from": "gpt", "value": "tail of an earlier answer"}, {"from": "human", "value": "Q1 ¿qué?"})
    records = [
        {"conversations": [G, H, {"from": "gpt", "value": "A1"}]},
        {"conversations": [{"from": "system", "value": "Be brief."}, G, H, {"from": "gpt", "value": "A1"}]},
        {"system": "S", "conversations": [G, H, {"from": "gpt", "value": "A1"}, H, {"from": "gpt", "value": "A2"}]},
        {"conversations": [H, {"from": "gpt", "value": "A1"}]},  # starts with the user: unchanged, not counted
        {"conversations": [G]},  # nothing left: rejected, not counted
    ]
    src = write_lines(tmp_path, [json.dumps(r) for r in records])
    out = str(tmp_path / "chats.jsonl")
    assert data.convert(src, out, "sharegpt", first_turn=True) == (5, 4, 1)
    assert "; 3 written started with the assistant, whose turn was dropped" in capsys.readouterr().out
    q, a = {"role": "user", "content": "Q1 ¿qué?"}, {"role": "assistant", "content": "A1"}
    assert [c["messages"] for c in data.load_chats(out)] == [
        [q, a], [{"role": "system", "content": "Be brief."}, q, a], [{"role": "system", "content": "S"}, q, a], [q, a]]
    with open(data.rejected_path(out)) as f:
        (bad,) = [json.loads(line) for line in f]
    assert bad["line"] == 5 and bad["reason"] == "conversations: must be a non-empty list of turns"
    # the other layouts keep their order rule: a chat starts with the user
    src = write_lines(tmp_path, [json.dumps({"messages": [A, U, A]})])
    assert data.convert(src, out, "messages") == (1, 0, 1)


BAD_CONVERT = [  # (layout, line, the reason the rejected file must give)
    ("sharegpt", "{not json", "not valid JSON"),
    ("sharegpt", "[1, 2]", "not a JSON object (got list)"),
    ("sharegpt", json.dumps({"messages": [U, A]}), "conversations: missing or null"),
    ("sharegpt", json.dumps({"conversations": []}), "conversations: must be a non-empty list"),
    ("sharegpt", json.dumps({"conversations": ["hi"]}), "conversations[0]: must be an object"),
    ("sharegpt", json.dumps({"conversations": [{"value": "x"}]}), "conversations[0].from: missing or null"),
    ("sharegpt", json.dumps({"conversations": [{"from": "bard", "value": "x"}]}), "conversations[0].from: unknown speaker 'bard'"),
    ("sharegpt", json.dumps({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt"}]}), "conversations[1].value: missing"),
    ("sharegpt", json.dumps({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "  "}]}), "conversations[1].value: is empty"),
    ("sharegpt", json.dumps({"conversations": [{"from": "human", "value": ["x"]}, {"from": "gpt", "value": "y"}]}),
     "conversations[0].value: must be a string, got list"),
    # a leading assistant turn is dropped (below), then the rest must still be a chat; fields keep their indices
    ("sharegpt", json.dumps({"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}),
     "conversations: the last turn is 'user'"),
    ("sharegpt", json.dumps({"conversations": [{"from": "gpt", "value": "x"}, {"from": "gpt", "value": "y"}]}),
     "conversations[1].from: got 'assistant' where 'user' belongs"),
    ("sharegpt", json.dumps({"conversations": [{"from": "human", "value": "x"}, {"from": "human", "value": "y"}]}),
     "conversations[1].from: got 'user' where 'assistant' belongs"),
    ("sharegpt", json.dumps({"system": "S", "conversations": [{"from": "human", "value": "x"}, {"from": "human", "value": "y"}]}),
     "conversations[1].from: got 'user'"),  # the top-level system turn does not shift the index
    ("sharegpt", json.dumps({"system": 7, "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}),
     "system: must be a string, got int"),
    ("sharegpt", json.dumps({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y</s>"}]}),
     "conversations[1].value: contains '<s>' or '</s>'"),
    ("sharegpt", json.dumps({"conversations": [{"from": "human", "value": "x"}]}), "conversations: the last turn is 'user'"),
    ("alpaca", "not json at all", "not valid JSON"),
    ("alpaca", json.dumps({"input": "x", "output": "y"}), "instruction: missing or null"),
    ("alpaca", json.dumps({"instruction": "", "input": "x", "output": "y"}), "instruction: is empty"),
    ("alpaca", json.dumps({"instruction": 3, "output": "y"}), "instruction: must be a string, got int"),
    ("alpaca", json.dumps({"instruction": "x", "input": ["a"], "output": "y"}), "input: must be a string, got list"),
    ("alpaca", json.dumps({"instruction": "x"}), "output: missing or null"),
    ("alpaca", json.dumps({"instruction": "x", "output": ""}), "output: is empty"),
    ("alpaca", json.dumps({"instruction": "x", "output": {"text": "y"}}), "output: must be a string, got dict"),
] + [("messages", line, problem) for line, problem in BAD_CHATS]  # the same reasons load_chats gives


@pytest.mark.parametrize("layout,line,reason", BAD_CONVERT)
def test_convert_rejects_with_line_and_reason(tmp_path, capsys, layout, line, reason):
    good = json.dumps(LAYOUTS[layout][0][0])
    src = write_lines(tmp_path, [good, "", line, good])
    out = str(tmp_path / "out.jsonl")
    assert data.convert(src, out, layout) == (3, 2, 1)  # the blank line is no record
    assert data.load_chats(out) == [LAYOUTS[layout][0][1]] * 2
    with open(tmp_path / "out.rejected.jsonl", encoding="utf-8") as f:
        (bad,) = [json.loads(x) for x in f]
    assert bad["line"] == 3 and bad["reason"].startswith(reason)
    try:
        kept = json.loads(line)
    except json.JSONDecodeError:
        kept = line  # a line that is not JSON is kept as its text
    assert bad["input"] == kept
    assert f"{src}:3: {reason}" in capsys.readouterr().err


def test_convert_bad_utf8_keeps_the_text(tmp_path):
    src = str(tmp_path / "in.jsonl")
    with open(src, "wb") as f:
        f.write(json.dumps(GOOD_CHAT).encode() + b"\n\xff{}\n")
    out = str(tmp_path / "out")  # no .jsonl suffix: the rejected file is out.rejected.jsonl
    assert data.convert(src, out, "messages") == (2, 1, 1)
    with open(tmp_path / "out.rejected.jsonl", encoding="utf-8") as f:
        assert json.loads(f.read()) == {"line": 2, "reason": "not valid UTF-8 (invalid start byte at byte 0)", "input": "\ufffd{}"}


def test_convert_json_array_reports_indices(tmp_path, capsys):
    records = [r for r, _ in SHAREGPT] * 5  # 20 records
    records[17] = {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": ""}]}
    records[3] = "a string"
    src = tmp_path / "sharegpt.json"
    src.write_text("\n  " + json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")  # leading space: still an array
    out = str(tmp_path / "chats.jsonl")
    assert data.main(["convert", str(src), out, "--from", "sharegpt"]) == 0
    captured = capsys.readouterr()
    assert "read 20, written 18" in captured.out and "rejected 2" in captured.out
    assert f"{src}: record 17: conversations[1].value: is empty" in captured.err
    with open(data.rejected_path(out)) as f:
        assert [(b["record"], b["reason"]) for b in map(json.loads, f)] == [
            (3, "not a JSON object (got str)"), (17, "conversations[1].value: is empty")]
    expected = [chat for _, chat in SHAREGPT] * 5
    assert data.load_chats(out) == expected[:3] + expected[4:17] + expected[18:]


def test_convert_refuses_what_it_cannot_read(tmp_path, capsys):
    src = tmp_path / "broken.json"
    src.write_text('[{"instruction": "x", "output": "y"},\n {"instruction": ')  # an array cut short
    out = tmp_path / "out.jsonl"
    assert data.main(["convert", str(src), str(out), "--from", "alpaca"]) == 1
    assert f"{src}: not a valid JSON array (" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["broken.json"]  # no output, no half-written file
    # every record rejected: most likely the wrong --from, so the command fails (the reasons are kept)
    src = write_lines(tmp_path, [json.dumps(r) for r, _ in ALPACA])
    assert data.main(["convert", src, str(out), "--from", "sharegpt"]) == 1
    assert "is --from sharegpt its layout?" in capsys.readouterr().err
    assert len(open(tmp_path / "out.rejected.jsonl").readlines()) == len(ALPACA)
    with pytest.raises(ValueError, match="would overwrite the input"):
        data.convert(src, src, "messages")


def test_loaders_stay_strict_where_convert_cleans(tmp_path):
    """The same file: load_chats refuses it, naming the bad line; convert keeps the good lines and says why it left the bad one."""
    src = write_lines(tmp_path, [json.dumps(GOOD_CHAT), json.dumps({"messages": [U, U]}), json.dumps({"messages": CHAT})])
    with pytest.raises(ValueError, match=re.escape(f"{src}:2: messages[1].role")):
        data.load_chats(src)
    out = str(tmp_path / "clean.jsonl")
    assert data.convert(src, out, "messages") == (3, 2, 1)
    assert data.load_chats(out) == [GOOD_CHAT, {"messages": CHAT}]


def test_rejected_path():
    assert data.rejected_path("out/chats.jsonl") == "out/chats.rejected.jsonl"
    assert data.rejected_path("chats") == "chats.rejected.jsonl"
    assert data.rejected_path("chats.json") == "chats.json.rejected.jsonl"


def test_convert_then_check_on_the_command_line(tmp_path):
    """As a user runs it: two processes, the README's commands."""
    import subprocess
    src = tmp_path / "ultrachat_like.json"
    src.write_text(json.dumps([r for r, _ in SHAREGPT] + [{"conversations": []}]), encoding="utf-8")
    out = tmp_path / "train.jsonl"
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data.py")
    run = subprocess.run([sys.executable, script, "convert", str(src), str(out), "--from", "sharegpt", "--first-turn"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"read 5, written 4 to {out}, rejected 1 to {tmp_path / 'train.rejected.jsonl'}" in run.stdout
    assert "record 4: conversations: must be a non-empty list" in run.stderr
    run = subprocess.run([sys.executable, script, "check", str(out)], capture_output=True, text=True)
    assert run.returncode == 0 and "4 chats, 10 turns" in run.stdout, run.stderr
