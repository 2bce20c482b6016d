"""
Data for self-play fine-tuning: the rule that turns a chat into token ids and a loss mask, the two
JSONL formats (chats and self-play samples) with their validation, batching, a small built-in task,
and the conversion of the common SFT layouts (ShareGPT, Alpaca) into chat JSONL. The tokenizer and
the chat template are tokenizer.py's.

    python data.py demo out/demo                     # the demo task: {train,selfplay,test}.jsonl + tokenizer.model
    python data.py check out/demo/train.jsonl --tokenizer out/demo/tokenizer.model
    python data.py check chats.jsonl --tokenizer SmolLM2-135M-Instruct   # a checkpoint folder: its tokenizer and template
    python data.py convert sharegpt.json chats.jsonl --from sharegpt --first-turn   # or --from alpaca|messages

Every sequence the trainer sees comes from `encode_example`, so SFT, scoring by the frozen opponent,
self-play training and generation all see the same tokens.
"""
import argparse
import io
import json
import math
import os
import random
import re
import sys

import numpy as np
import sentencepiece as spm
import torch
from tqdm import tqdm

from tokenizer import BOS, EOS, ZEPHYR_TEMPLATE, Tokenizer, add_template_flags, parse_template_args, render_template

# -----------------------------------------------------------------------------
# the rule that turns a chat into tokens, as TRL's trainers make them for a prompt and a completion


def split_chat(messages):
    """(prompt_messages, real_response): the real response is the last assistant turn."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a chat must end with an assistant turn to split off as the real response")
    return messages[:-1], messages[-1]["content"]


def encode_prompt(tok, prompt_messages, max_prompt=512):
    """(ids, truncated): the prompt rendered in the chat template with its generation prompt, encoded
    with the tokenizer's own special tokens (its BOS where it adds one, never two), at most max_prompt ids.
    SPIN keeps the last max_prompt tokens (the question sits at the end of a long conversation); a BOS
    that the tokenizer puts first stays first, as in pretraining. The cap depends on the prompt alone,
    so generation sees exactly the prompt that training and scoring see."""
    ids = tok.encode(tok.render(prompt_messages, add_generation_prompt=True), bos=True)
    if max_prompt is None or len(ids) <= max_prompt:
        return ids, False
    head = ids[:1] if tok.bos_id is not None and tok.encode("", bos=True)[:1] == ids[:1] == [tok.bos_id] else []
    return head + ids[len(ids) - (max_prompt - len(head)):], True


def response_text(tok, prompt_messages, response):
    """The response as the template writes it: the whole chat's rendering with the prompt's (generation
    prompt included) cut off its front. A template that renders the prompt otherwise in the whole chat
    (some reasoning templates rewrite earlier turns) has no such text: refused."""
    prompt = tok.render(prompt_messages, add_generation_prompt=True)
    chat = tok.render(prompt_messages + [{"role": "assistant", "content": response}])
    if not chat.startswith(prompt):
        raise ValueError(f"{tok.template_name}: the chat template's generation prompt is not the start of the whole "
                         "chat's rendering, so no response can be told apart (pass --chat-template FILE)")
    return chat[len(prompt):]


def encode_response(tok, prompt_messages, response):
    """The response's ids: response_text with no special tokens added (a continuation: no sentencepiece
    dummy space in front), up to and including the first end-of-turn token, where generation stops;
    what the template writes after it (a newline) is neither trained nor scored."""
    ids = tok.encode(response_text(tok, prompt_messages, response), continuation=True)
    end = next((k for k, i in enumerate(ids) if i in tok.end_of_turn_ids), None)
    return ids if end is None else ids[:end + 1]


def encode_example(tok, prompt_messages, response, max_prompt=512, max_length=1024):
    """(ids, loss_mask, truncated): the prompt's ids, then the response's; the mask is 1 on the response,
    its end-of-turn token included. A response longer than max_length - len(prompt) is cut there and
    loses its end-of-turn token, as in SPIN."""
    if max_prompt is not None and max_length is not None and not 1 < max_prompt < max_length:
        raise ValueError(f"need 1 < max_prompt < max_length, got {max_prompt} and {max_length}")
    prompt, truncated = encode_prompt(tok, prompt_messages, max_prompt)
    reply = encode_response(tok, prompt_messages, response)
    if max_length is not None and len(prompt) + len(reply) > max_length:
        reply, truncated = reply[:max_length - len(prompt)], True
    return prompt + reply, [0] * len(prompt) + [1] * len(reply), truncated


def encode_chat(tok, messages):
    """(ids, loss_mask) of a whole conversation, untruncated: encode_example of its last assistant turn."""
    ids, loss_mask, _ = encode_example(tok, *split_chat(messages), max_prompt=None, max_length=None)
    return ids, loss_mask


def decode_response(tok, ids):
    """The text of generated ids before the first end-of-turn token, decoded as a continuation:
    encode_response gives the ids back, unless the model chose a split the tokenizer would not make."""
    ids = [int(i) for i in ids]
    end = next((k for k, i in enumerate(ids) if i in tok.end_of_turn_ids), len(ids))
    return tok.decode(ids[:end], continuation=True)


# -----------------------------------------------------------------------------
# dataset files: chat JSONL, self-play JSONL. Every bad line is reported as path:line: field: problem.

ROLES = ("system", "user", "assistant")


def _check_messages(messages, last_role):
    """The first (field, problem) in a messages list, or None. last_role: the role the list must end with."""
    if messages is None:
        return "messages", "missing or null"
    if not isinstance(messages, list) or not messages:
        return "messages", "must be a non-empty list of turns"
    # zephyr's and UltraChat's order: an optional system turn, then user and assistant alternating
    offset = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            return field, f"must be an object with role and content, got {type(m).__name__}"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return f"{field}.role", "missing or null" if role is None else f"unknown role {role!r} (expected one of {ROLES})"
        expected = "system" if i < offset else ("user", "assistant")[(i - offset) % 2]
        if role != expected:
            return f"{field}.role", (f"got {role!r} where {expected!r} belongs (an optional system turn, "
                                     "then user and assistant alternating, starting with user)")
        if not isinstance(content, str) or not content.strip():
            return f"{field}.content", ("missing or null" if content is None else "is empty" if isinstance(content, str)
                                        else f"must be a string, got {type(content).__name__}")
        if BOS in content or EOS in content:  # it would become a special token and break the template
            return f"{field}.content", f"contains {BOS!r} or {EOS!r}, which the template reserves"
    if messages[-1]["role"] != last_role:
        why = "no assistant response to learn from" if last_role == "assistant" else "a prompt ends with the user's turn"
        return "messages", f"the last turn is {messages[-1]['role']!r}, expected {last_role!r} ({why})"


def _is_finite_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_selfplay(record):
    """The first (field, problem) in a self-play record, or None."""
    problem = _check_messages(record.get("messages"), last_role="user")
    if problem:
        return problem
    real, generated, ref_generated = record.get("real"), record.get("generated"), record.get("ref_generated")
    if not isinstance(real, str) or not real.strip() or BOS in real or EOS in real:
        return "real", f"must be a non-empty string without {BOS!r}/{EOS!r}, got {real!r:.60}"
    # an empty generated response is legal: the model may stop at once
    if not isinstance(generated, list) or not generated or not all(isinstance(g, str) for g in generated):
        return "generated", "must be a non-empty list of strings"
    if not _is_finite_number(record.get("ref_real")):
        return "ref_real", f"must be a finite number, got {record.get('ref_real')!r}"
    if not isinstance(ref_generated, list) or not all(_is_finite_number(x) for x in ref_generated):
        return "ref_generated", "must be a list of finite numbers"
    if len(ref_generated) != len(generated):
        return "ref_generated", f"has {len(ref_generated)} scores for {len(generated)} generated responses"
    drawn_by = record.get("drawn_by")
    if not isinstance(drawn_by, int) or isinstance(drawn_by, bool) or drawn_by < 0:
        return "drawn_by", f"must be the iteration whose model drew the responses (an int >= 0), got {drawn_by!r}"


def _records(path):
    """Yield (where, location, record, problem, text) for every record of a file: the one reader of
    load_chats, load_selfplay and convert. problem: None, or why a line is not JSON (then text is the
    line, for convert's rejects file). A file whose first character is "[" is a JSON array, read
    whole, its records located by index ({"record": i}); one that does not parse is one error for the
    whole file. Anything else is JSONL ({"line": n}): blank lines are skipped but keep their numbers."""
    with open(path, "rb") as f:
        array = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n").startswith("[")
    if array:
        try:
            with open(path, encoding="utf-8-sig") as f:
                array = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            why = f"{e.msg} at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else e.reason
            raise ValueError(f"{path}: not a valid JSON array ({why})") from None
        yield from ((f"{path}: record {i}", {"record": i}, record, None, None) for i, record in enumerate(array))
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where, location = f"{path}:{n}", {"line": n}
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                yield where, location, None, f"not valid UTF-8 ({e.reason} at byte {e.start})", text
                continue
            if not text.strip():
                continue
            try:
                yield where, location, json.loads(text), None, text
            except json.JSONDecodeError as e:
                yield where, location, None, f"not valid JSON ({e.msg} at column {e.colno})", text.rstrip("\r\n")


def _read_jsonl(path, check):
    """The records of a JSONL file; check(record) -> None or (field, problem). Raises ValueError listing
    every bad line, so nothing is dropped silently."""
    records, errors = [], []
    for where, _, record, problem, _ in _records(path):
        if problem is None and not isinstance(record, dict):
            problem = f"not a JSON object (got {type(record).__name__})"
        elif problem is None:
            field_problem = check(record)
            problem = field_problem and f"{field_problem[0]}: {field_problem[1]}"
        if problem:
            errors.append(f"{where}: {problem}")
        else:
            records.append(record)
    if errors or not records:
        more = f"\n... and {len(errors) - 20} more bad lines" if len(errors) > 20 else ""
        raise ValueError("\n".join(errors[:20]) + more if errors else f"{path}: no records")
    return records


def load_chats(path):
    """Chat JSONL (UltraChat200k's shape): {"messages": [{"role", "content"}, ...]} a line (or a JSON array
    of them), ending with an assistant turn."""
    return _read_jsonl(path, lambda r: _check_messages(r.get("messages"), last_role="assistant"))


def load_selfplay(path):
    """Self-play JSONL: {"messages": prompt, "real", "generated": [K], "ref_real", "ref_generated": [K],
    "drawn_by"} a line. Every line has the same K: the trainer stacks the generated responses into [B, K]."""
    k = []

    def check(record):
        problem = _check_selfplay(record)
        if problem is None:
            k.append(len(record["generated"]))
            if k[-1] != k[0]:
                return "generated", f"has {k[-1]} responses where the earlier lines have {k[0]} (K must be the same)"
        return problem
    return _read_jsonl(path, check)


def save_jsonl(path, records):
    """Write records one JSON object a line, atomically: a killed run leaves the old file or the new one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:  # allow_nan=False: NaN is not JSON, refuse to write it
            f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

# -----------------------------------------------------------------------------
# batching


def collate(examples, pad_id):
    """(tokens, targets, mask), each [B, T] with T = longest sequence - 1, right-padded.
    tokens = ids[:-1], targets = ids[1:], mask = loss_mask[1:]: position t predicts targets[t], and the
    mask picks the response's tokens (its end-of-turn token too) as targets. Padded targets hold pad_id
    rather than -100 so that a gather over the vocabulary stays in range; the mask removes them."""
    lengths = [len(ids) - 1 for ids, _ in examples]
    if any(len(ids) != len(loss_mask) for ids, loss_mask in examples) or min(lengths) < 1:
        raise ValueError("every example needs len(ids) == len(loss_mask) >= 2")
    B, T = len(examples), max(lengths)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T]
    targets = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((B, T), dtype=torch.bool)  # [B, T]
    for b, ((ids, loss_mask), n) in enumerate(zip(examples, lengths)):
        tokens[b, :n] = torch.tensor(ids[:-1])
        targets[b, :n] = torch.tensor(ids[1:])
        mask[b, :n] = torch.tensor(loss_mask[1:], dtype=torch.bool)
    return tokens, targets, mask


def batches(n, batch_size, seed, epoch=0, rank=0, world_size=1):
    """This rank's share of every global batch of one epoch: a list of lists of example indices.
    One permutation of range(n), fixed by (seed, epoch) alone, is cut into global batches; rank r takes
    the r-th contiguous slice of each: concatenated, the ranks' slices are one process's batch, and a
    resumed run finds the same order. The incomplete tail is dropped for this epoch only."""
    if batch_size % world_size:
        raise ValueError(f"global batch size {batch_size} is not divisible by world size {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if n < batch_size:
        raise ValueError(f"{n} examples do not fill one global batch of {batch_size}")
    order = np.random.default_rng([seed, epoch]).permutation(n)  # its own generator, never the global RNG
    local = batch_size // world_size
    return [order[i + rank * local:i + (rank + 1) * local].tolist() for i in range(0, n - batch_size + 1, batch_size)]

# -----------------------------------------------------------------------------
# the demo task: problems with exactly checkable answers, made at run time: add two numbers below
# 100, reverse 3 to 8 letters, or sort them. With train.py's demo preset greedy exact match on the
# test split ends near 46% (addition is the hard kind: the carry must be known before the first
# digit is written), so self-play has room to help.

_PHRASINGS = {
    "add": ["What is {a} + {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}.", "Please calculate {a} plus {b}."],
    "reverse": ["Reverse the letters: {s}", "Write these letters in reverse order: {s}", "Reverse this sequence: {s}"],
    "sort": ["Sort the letters alphabetically: {s}", "Put these letters in alphabetical order: {s}", "Sort: {s}"],
}


def _demo_problem(rng):
    """(key, chat) for one random problem. The key names the problem without its phrasing, so no
    problem is shared between splits, not even asked in other words."""
    kind = rng.choice(sorted(_PHRASINGS))
    if kind == "add":  # 9801 problems: past a few thousand, repeats are redrawn and letters take over
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        key, fields, answer = (kind, a, b), {"a": a, "b": b}, f"{a} + {b} = {a + b}"
    else:
        letters = [rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))]
        key, fields = (kind, *letters), {"s": " ".join(letters)}
        answer = " ".join(letters[::-1] if kind == "reverse" else sorted(letters))
    question = rng.choice(_PHRASINGS[kind]).format(**fields)
    return key, {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def demo_splits(seed=0, n_train=6000, n_selfplay=1500, n_test=300):
    """{"train", "selfplay", "test"}: lists of single-turn chats with disjoint problems, fixed by seed.
    The test split is drawn first, so it does not change when the other two grow."""
    rng, seen, splits = random.Random(seed), set(), {}
    for name, n in (("test", n_test), ("selfplay", n_selfplay), ("train", n_train)):
        splits[name] = []
        while len(splits[name]) < n:
            key, chat = _demo_problem(rng)
            if key not in seen:
                seen.add(key)
                splits[name].append(chat)
    return {name: splits[name] for name in ("train", "selfplay", "test")}


def exact_match(prediction, reference):
    """True when the whole response is the answer. Case and punctuation count; runs of whitespace
    count as one space and the ends are stripped, so "4 + 5 = 9 \\n" matches "4 + 5 = 9"."""
    return " ".join(prediction.split()) == " ".join(reference.split())


def demo_tokenizer(chats, out_dir, vocab_size=320):
    """Train a small BPE sentencepiece model on the chats' text, write out_dir/tokenizer.model, load it.

    Built like Mistral's (BPE, digits split, <unk>=0, <s>=1, </s>=2 as control symbols, no pad), but
    without byte fallback (256 byte pieces would crowd the merges out of ~300; other characters
    become <unk>) and without a dummy prefix (sentencepiece would put it before the tag that starts
    the text, which transformers' tokenizers cannot do). The template's tags and "\\n" are
    user-defined symbols, never merged with neighbours, so a response is split the same way with or
    without its prompt. Single-threaded on an ordered input, training is deterministic and fast."""
    # the template's text without <s> and </s>, which are control symbols, not text
    texts = [render_template(ZEPHYR_TEMPLATE, chat["messages"], bos_token="", eos_token="") for chat in chats]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=1.0, byte_fallback=False, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        user_defined_symbols=["<|system|>", "<|user|>", "<|assistant|>", "\n"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return Tokenizer(path)

# -----------------------------------------------------------------------------
# converting the common SFT layouts (ShareGPT, Alpaca) into chat JSONL
#
# A converted record is checked by _check_messages, the same check load_chats applies, so what
# convert writes always loads. What cannot become a valid chat goes to the rejected file with its
# line and the reason, named in the input's own fields (conversations[3].from, not messages[3].role).

CONVERT_LAYOUTS = ("sharegpt", "alpaca", "messages")
# ShareGPT's speakers; dumps also spell them "user"/"assistant", and the original ShareGPT "chatgpt"
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user",
                  "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant"}


class _Reject(Exception):
    """A record that cannot become a chat: (field or None, problem[, the text of a line that is not JSON])."""


def _from_sharegpt(record):
    """(messages, fields): fields[i] names where turn i came from, as (turn, role field, content field)."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _Reject("conversations", "missing or null" if turns is None else "must be a non-empty list of turns")
    messages, fields = [], []
    for j, turn in enumerate(turns):
        where = f"conversations[{j}]"
        if not isinstance(turn, dict):
            raise _Reject(where, f"must be an object with from and value, got {type(turn).__name__}")
        speaker = turn.get("from")
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise _Reject(f"{where}.from", "missing or null" if speaker is None else
                          f"unknown speaker {speaker!r} (expected one of {tuple(SHAREGPT_ROLES)})")
        messages.append({"role": role, "content": turn.get("value")})
        fields.append((where, f"{where}.from", f"{where}.value"))
    return messages, fields


def _from_alpaca(record):
    """(messages, fields): instruction, and input after a blank line when there is one, become the
    user turn; output the assistant turn."""
    instruction, extra, output = record.get("instruction"), record.get("input"), record.get("output")
    if extra is not None and not isinstance(extra, str):
        raise _Reject("input", f"must be a string, got {type(extra).__name__}")
    if isinstance(instruction, str) and instruction.strip() and extra and extra.strip():
        user = f"{instruction}\n\n{extra}"
    else:
        user = instruction  # a missing, empty or non-string instruction is reported by the check
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}], [("instruction",) * 3, ("output",) * 3]


def _from_messages(record):
    """(messages, fields) of our own layout: turns keep only role and content."""
    turns = record.get("messages")
    if not isinstance(turns, list):
        return turns, []  # the check names it
    messages = [{"role": t.get("role"), "content": t.get("content")} if isinstance(t, dict) else t for t in turns]
    return messages, [(f"messages[{i}]", f"messages[{i}].role", f"messages[{i}].content") for i in range(len(turns))]


_CONVERTERS = {"sharegpt": _from_sharegpt, "alpaca": _from_alpaca, "messages": _from_messages}
_LIST_FIELD = {"sharegpt": "conversations", "alpaca": None, "messages": "messages"}


def _to_chat(record, layout, first_turn=False):
    """(chat {"messages": [...]}, whether a leading assistant turn was dropped), or raise _Reject(field, problem).
    ShareGPT's conversations were split into pieces, and 30% of real records start with the assistant:
    that turn is dropped (a system turn before it stays), as FastChat's trainer does. first_turn keeps
    the system turn and the first user/assistant exchange, as SPIN and SPACE use UltraChat (the turns
    after it are not checked). An empty system prompt, as some dumps carry in every record, is left out."""
    if not isinstance(record, dict):
        raise _Reject(None, f"not a JSON object (got {type(record).__name__})")
    messages, fields = _CONVERTERS[layout](record)
    if layout != "messages" and record.get("system") is not None:  # an optional top-level "system" string
        messages, fields = [{"role": "system", "content": record["system"]}] + messages, [("system",) * 3] + fields
    first = messages[0] if isinstance(messages, list) and messages else None
    if isinstance(first, dict) and first["role"] == "system" and isinstance(first["content"], str) and not first["content"].strip():
        messages, fields = messages[1:], fields[1:]
    k = 1 if isinstance(messages, list) and messages and isinstance(messages[0], dict) and messages[0]["role"] == "system" else 0
    dropped = layout == "sharegpt" and len(messages) > k and messages[k]["role"] == "assistant"
    if dropped:
        messages, fields = messages[:k] + messages[k + 1:], fields[:k] + fields[k + 1:]
    if first_turn and isinstance(messages, list) and messages:
        keep = 3 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 2
        messages, fields = messages[:keep], fields[:keep]
    problem = _check_messages(messages, last_role="assistant")
    if problem:
        field, why = problem
        # messages[i], messages[i].role, messages[i].content -> the input's own field
        m = re.fullmatch(r"messages\[(\d+)\](?:\.(role|content))?", field)
        if m:
            field = fields[int(m[1])][(None, "role", "content").index(m[2])]
        elif field == "messages":
            field = _LIST_FIELD[layout]
        raise _Reject(field, why)
    return {"messages": messages}, dropped


def rejected_path(out_path):
    """Where convert writes what it rejects: chats.jsonl (or chats) -> chats.rejected.jsonl."""
    return out_path.removesuffix(".jsonl") + ".rejected.jsonl"


def convert(in_path, out_path, layout, first_turn=False):
    """Convert a ShareGPT, Alpaca or chat file (JSONL or a JSON array) to chat JSONL at out_path.

    Every record lands in one of two files: the chat at out_path, or, at rejected_path(out_path), a
    line {"line": n (or "record": i), "reason": "field: problem", "input": the record, or the text of
    a line that is not JSON}. Prints the counts and the first reasons; returns (read, written,
    rejected). Both files are renamed into place at the end: a failed run leaves no half-written file."""
    if layout not in _CONVERTERS:
        raise ValueError(f"unknown layout {layout!r} (expected one of {CONVERT_LAYOUTS})")
    bad_path = rejected_path(out_path)
    if os.path.abspath(in_path) in (os.path.abspath(out_path), os.path.abspath(bad_path)):
        raise ValueError(f"{in_path}: the output would overwrite the input")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    read = written = rejected = dropped = 0
    shown = []
    try:
        with open(f"{out_path}.tmp", "w", encoding="utf-8") as out, open(f"{bad_path}.tmp", "w", encoding="utf-8") as bad:
            for where, location, record, problem, text in _records(in_path):
                read += 1
                try:
                    if problem:
                        raise _Reject(None, problem, text)
                    chat, dropped_turn = _to_chat(record, layout, first_turn)
                    dropped += dropped_turn
                except _Reject as e:
                    field, why, *text = e.args  # a line that is not JSON comes with its text
                    reason = f"{field}: {why}" if field else why
                    entry = {**location, "reason": reason, "input": text[0] if text else record}
                    bad.write(json.dumps(entry, ensure_ascii=False) + "\n")
                    rejected += 1
                    if len(shown) < 5:
                        shown.append(f"rejected {where}: {reason}")
                    continue
                out.write(json.dumps(chat, ensure_ascii=False) + "\n")
                written += 1
    except BaseException:
        for tmp in (f"{out_path}.tmp", f"{bad_path}.tmp"):
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    os.replace(f"{out_path}.tmp", out_path)
    os.replace(f"{bad_path}.tmp", bad_path)
    started = f"; {dropped} written started with the assistant, whose turn was dropped" if layout == "sharegpt" else ""
    print(f"{in_path}: read {read}, written {written} to {out_path}, rejected {rejected} to {bad_path}{started}")
    for line in shown + ([f"... and {rejected - len(shown)} more in {bad_path}"] if rejected > len(shown) else []):
        print(f"  {line}", file=sys.stderr)
    return read, written, rejected

# -----------------------------------------------------------------------------
# command line


def _stats(xs):
    return f"min {min(xs)}, mean {sum(xs) / len(xs):.1f}, max {max(xs)}" if xs else "none"


def check(path, tok=None, max_prompt=512, max_length=1024):
    """Validate a chat or self-play JSONL file (told apart by its first record) and print its statistics."""
    first = next(_records(path), (None, None, None))[2]
    selfplay = isinstance(first, dict) and "generated" in first  # else load_chats reports the line
    records = load_selfplay(path) if selfplay else load_chats(path)
    if selfplay:
        print(f"{path}: {len(records)} self-play prompts, K = {len(records[0]['generated'])} generated responses each")
    else:
        turns = sum(len(r["messages"]) for r in records)
        print(f"{path}: {len(records)} chats, {turns} turns")
    if tok is None:
        return
    prompt_lens, real_lens, gen_lens, total, truncated = [], [], [], 0, 0
    for r in tqdm(records, desc="encoding", leave=False):
        prompt, real = (r["messages"], r["real"]) if selfplay else split_chat(r["messages"])
        for i, response in enumerate([real] + (r["generated"] if selfplay else [])):
            ids, loss_mask, cut = encode_example(tok, prompt, response, max_prompt, max_length)
            (gen_lens if i else real_lens).append(sum(loss_mask))
            total, truncated = total + len(ids), truncated + cut
        prompt_lens.append(len(ids) - sum(loss_mask))
    print(f"tokens: {total} in {len(real_lens) + len(gen_lens)} sequences, "
          f"{truncated} truncated (max prompt {max_prompt}, max length {max_length})")
    print(f"prompt tokens: {_stats(prompt_lens)}")
    print(f"real response tokens (with the end-of-turn token): {_stats(real_lens)}")
    if selfplay:
        print(f"generated response tokens (with the end-of-turn token): {_stats(gen_lens)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check dataset files, convert other SFT layouts to chat JSONL, "
                                                 "or write the built-in demo task.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("check", help="validate a chat or self-play JSONL file and print its statistics")
    p.add_argument("file", help="chat JSONL ({'messages': [...]} a line) or self-play JSONL")
    p.add_argument("--tokenizer", help="a checkpoint folder, or its tokenizer.model or tokenizer.json; with it, token "
                                       "counts and truncation are printed, the ids made as train.py makes them")
    add_template_flags(p)
    p.add_argument("--max-prompt", type=int, default=512, help="prompt tokens kept (BOS and the last ones), as in training")
    p.add_argument("--max-length", type=int, default=1024, help="prompt + response tokens kept, as in training")
    p = commands.add_parser("demo", help="write the demo task as chat JSONL plus its tokenizer")
    p.add_argument("out_dir", help="writes train.jsonl, selfplay.jsonl, test.jsonl and tokenizer.model here")
    p.add_argument("--seed", type=int, default=0, help="the splits are a function of the seed")
    p = commands.add_parser("convert", help="turn ShareGPT, Alpaca or chat records (JSONL or a JSON array) into chat JSONL",
                            description="Records that cannot become a chat go to OUT.rejected.jsonl, with line and reason.")
    p.add_argument("input", metavar="IN", help="JSONL, one record a line, or a JSON array of records (told apart by the first character)")
    p.add_argument("output", metavar="OUT", help="chat JSONL to write ({'messages': [...]} a line)")
    p.add_argument("--from", dest="layout", required=True, choices=CONVERT_LAYOUTS,
                   help="sharegpt: {'conversations': [{'from': 'human'|'gpt'|'system', 'value'}]}; "
                        "alpaca: {'instruction', 'input', 'output'}; messages: our own layout, checked and cleaned")
    p.add_argument("--first-turn", action="store_true",
                   help="keep only the system turn (if any) and the first user/assistant exchange, as SPIN and SPACE use UltraChat")
    args = parser.parse_args(argv)

    if args.command == "demo":
        splits = demo_splits(seed=args.seed)
        for name, chats in splits.items():
            save_jsonl(os.path.join(args.out_dir, f"{name}.jsonl"), chats)
        vocab = demo_tokenizer(splits["train"], args.out_dir).vocab_size
        print(f"{args.out_dir}: " + ", ".join(f"{len(c)} {n}" for n, c in splits.items()) + f", vocab {vocab}")
        return 0
    if args.command == "convert":
        try:
            _, written, _ = convert(args.input, args.output, args.layout, args.first_turn)
        except (ValueError, OSError) as e:  # a JSON array that does not parse, or a missing file
            print(e, file=sys.stderr)
            return 1
        if not written:
            print(f"{args.input}: no record became a chat; is --from {args.layout} its layout?", file=sys.stderr)
        return 0 if written else 1
    try:
        tok = None if args.tokenizer is None else Tokenizer(
            args.tokenizer, args.chat_template, parse_template_args(args.chat_template_arg))
        check(args.file, tok, args.max_prompt, args.max_length)
    except (ValueError, OSError, ImportError) as e:  # a bad line (named path:line) or a missing file: exit 1
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
