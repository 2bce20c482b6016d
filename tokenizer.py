"""
A checkpoint's tokenizer, its chat template, and the tokenizer files of an export. No torch, no numpy:
sample.py's command line and data.py's checks load it without them.

    from tokenizer import Tokenizer
    tok = Tokenizer("zephyr-7b-sft-full/tokenizer.model")
    ids = tok.encode(render_chat(messages, add_generation_prompt=True), bos=True)
"""
import json
import os
import re
import shutil

import sentencepiece as spm

# -----------------------------------------------------------------------------
# the tokenizer

BOS, EOS, UNK = "<s>", "</s>", "<unk>"  # how text writes the special tokens (Mistral's piece names)
_SPECIAL = re.compile("(<s>|</s>|<unk>)")

# The serialized model plus these four bytes is the same model with add_dummy_prefix = false.
# In protobuf's wire format they read: ModelProto field 3 (normalizer_spec, length 2) holding
# NormalizerSpec field 3 (add_dummy_prefix, varint) = 0. A message field that appears twice is
# merged, so nothing else changes: same pieces, same merges, same byte fallback.
_NO_DUMMY_PREFIX = bytes([3 << 3 | 2, 2, 3 << 3 | 0, 0])


class Tokenizer:
    """sentencepiece, plus the special tokens that the chat template writes as text.

    The trap: sentencepiece with add_dummy_prefix (Mistral's model has it) encodes every string as
    if it began with a space, "Hi" -> "▁Hi". Text is encoded piece by piece between the special
    tokens, so which pieces get that dummy space is a choice, and transformers' Llama tokenizers make
    it with the `legacy` flag of a checkpoint's tokenizer_config.json:
    - legacy=False, sentencepiece's own rule: text at the start of a document (the start, or right
      after <s>) gets the dummy space; text that continues (after </s>, or a response after its
      prompt: continuation=True) gets none.
    - legacy=True, as Mistral-7B's and zephyr's tokenizers are published: text after any special
      token gets it too, so "</s>\\n" is "</s>", "▁", "<0x0A>".
    A model must see the ids it was trained on, so Tokenizer(path) follows the transformers files
    beside path (tokenizer.json, tokenizer_config.json: see _legacy_setting), and raises where they
    ask for what it cannot reproduce; with none there it uses sentencepiece's rule; legacy=True/False
    overrides both. decode mirrors encode, so decode(encode(x)) == x and
    decode(encode(x, continuation=True), continuation=True) == x.
    """

    def __init__(self, model_file, legacy=None):
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.sp_continue = spm.SentencePieceProcessor(model_proto=self.sp.serialized_model_proto() + _NO_DUMMY_PREFIX)
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.special = {BOS: self.bos_id, EOS: self.eos_id, UNK: self.unk_id}  # as transformers reads them in text
        if any(i < 0 or self.sp.id_to_piece(i) != s for s, i in self.special.items()):
            raise ValueError(f"{model_file}: the tokenizer needs the pieces {UNK}, {BOS} and {EOS}")
        # Mistral's model has no pad piece. Padding sits after the real tokens (right padding under a
        # causal mask) and is masked out of every loss, so any id would do: we use EOS.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.vocab_size = self.sp.vocab_size()
        self.legacy = _legacy_setting(self, os.path.dirname(os.path.abspath(model_file))) if legacy is None else legacy

    def encode(self, text, bos=False, continuation=False):
        """Token ids of text; "<s>", "</s>" and "<unk>" inside it become their ids."""
        ids = [self.bos_id] if bos else []
        at_start = not continuation
        for part in _SPECIAL.split(text):  # text, special, text, special, ..., text
            if part in self.special:
                ids.append(self.special[part])
                at_start = part == BOS or self.legacy
            elif part:
                ids.extend((self.sp if at_start else self.sp_continue).encode(part))
        return ids

    def decode(self, ids, continuation=False):
        """Text of ids, the inverse of encode with the same continuation flag; special ids come back as text."""
        text_of = {i: s for s, i in self.special.items()}
        out, run, at_start = [], [], not continuation
        for i in [int(i) for i in ids] + [None]:  # None flushes the last run of ordinary tokens
            if i is None or i in text_of:
                if run:  # at a document start, sentencepiece drops the dummy space the encoder added
                    out.append((self.sp if at_start else self.sp_continue).decode(run))
                run = []
                if i is not None:
                    out.append(text_of[i])
                    at_start = i == self.bos_id or self.legacy
            else:
                run.append(i)
        return "".join(out)

# -----------------------------------------------------------------------------
# the chat template (zephyr's, as SPIN uses it) and the rule that turns a chat into tokens


def render_chat(messages, add_generation_prompt=False):
    """The zephyr template: "<|role|>\\n{content}</s>\\n" per turn; a prompt ends with "<|assistant|>\\n".
    No BOS in the text: the encoders prepend its id."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}{EOS}\n" for m in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text


# render_chat in Jinja, for transformers' apply_chat_template, vLLM's chat endpoint and lm-eval's
# --apply_chat_template. It writes bos_token first, as Llama-family templates do, since those
# tokenize the rendered text without adding special tokens: the ids are then encode_prompt's.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                 "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")

# -----------------------------------------------------------------------------
# transformers' tokenizer files. Those a checkpoint comes with decide `legacy`; every export carries
# a full set, so transformers, vLLM and lm-eval tokenize and template as training did.

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def export_tokenizer(tokenizer_file, out_dir, source_dir=None, model_max_length=None):
    """Write transformers' tokenizer files (TOKENIZER_FILES) into out_dir, beside an exported checkpoint.

    With source_dir (the checkpoint that training started from) holding the same tokenizer.model,
    its own files are copied unchanged (and its chat_template.jinja, if any) and only the missing
    ones are written, except that a source without a chat template gets ours in its
    tokenizer_config.json: the exported model was trained in it. Written files describe
    Tokenizer(tokenizer_file), its legacy setting included. tokenizer.json is always there, so that
    transformers need not convert tokenizer.model, which takes sentencepiece and protobuf (and
    transformers 5 loses the dummy space doing it for model_type mistral). model_max_length: the
    longest sequence the model takes; None writes transformers' "no limit", as Mistral-7B's does."""
    tok = Tokenizer(tokenizer_file)
    source = None
    if source_dir is not None and os.path.exists(os.path.join(source_dir, "tokenizer.model")):
        with open(tokenizer_file, "rb") as a, open(os.path.join(source_dir, "tokenizer.model"), "rb") as b:
            same = a.read() == b.read()  # if not, the source's files describe another tokenizer: ignore them
        if same and Tokenizer(os.path.join(source_dir, "tokenizer.model")).legacy != tok.legacy:
            raise ValueError(f"{source_dir}: its tokenizer files ask for legacy={not tok.legacy}, "
                             f"but {tokenizer_file} was read with legacy={tok.legacy}")
        source = source_dir if same else None
    pad = tok.sp.id_to_piece(tok.pad_id)
    ours = {
        "tokenizer_config.json": {
            "tokenizer_class": "LlamaTokenizer", "bos_token": BOS, "eos_token": EOS, "unk_token": UNK,
            "pad_token": pad, "add_bos_token": True, "add_eos_token": False, "legacy": tok.legacy,
            "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
            "model_max_length": int(1e30) if model_max_length is None else model_max_length},
        "special_tokens_map.json": {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": pad},
        "generation_config.json": {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id},
    }
    os.makedirs(out_dir, exist_ok=True)
    names = TOKENIZER_FILES + ("chat_template.jinja",)
    copies = [name for name in names if source is not None and os.path.exists(os.path.join(source, name))]
    for name in copies:  # read, then write: out_dir may be source_dir
        with open(os.path.join(source, name), "rb") as f:
            content = f.read()
        if name == "tokenizer_config.json" and "chat_template" not in json.loads(content) \
                and "chat_template.jinja" not in copies:
            content = json.dumps({**json.loads(content), "chat_template": CHAT_TEMPLATE}, indent=2).encode()
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(content)
    for name in TOKENIZER_FILES:
        path = os.path.join(out_dir, name)
        if name in copies:
            continue
        if name == "tokenizer.model":
            if not (os.path.exists(path) and os.path.samefile(tokenizer_file, path)):
                shutil.copyfile(tokenizer_file, path)
        else:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(_tokenizer_json(tok) if name == "tokenizer.json" else ours[name], f,
                          indent=None if name == "tokenizer.json" else 2, ensure_ascii=False)


NORMAL, USER_DEFINED, BYTE = 1, 4, 6  # sentencepiece's piece types (ModelProto.SentencePiece.Type)


def _piece_types(tok):
    """The type of every piece, read from the serialized model in protobuf's wire format: each
    ModelProto field 1 is a piece, whose field 3 is its type (NORMAL when absent). sentencepiece's
    Python API tells control, unknown, unused and byte pieces apart, but not user-defined ones."""
    def fields(buf):  # (field number, value) of each field of one message
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            if key & 7 == 0:
                value, i = varint(buf, i)
            elif key & 7 == 2:
                n, i = varint(buf, i)
                value, i = buf[i:i + n], i + n
            else:  # 1: 64-bit, 5: 32-bit (the score)
                value, i = None, i + (8 if key & 7 == 1 else 4)
            yield key >> 3, value

    def varint(buf, i):
        value = shift = 0
        while True:
            value, shift, i = value | (buf[i] & 0x7F) << shift, shift + 7, i + 1
            if buf[i - 1] < 0x80:
                return value, i
    pieces = (value for field, value in fields(tok.sp.serialized_model_proto()) if field == 1)
    return [dict(fields(piece)).get(3, NORMAL) for piece in pieces]


# sentencepiece's dummy space as a normalizer of the tokenizers library. _PREPEND puts it before each
# piece of text that the added tokens cut out before normalizing: after every special token, as under
# legacy (Mistral-7B's own tokenizer.json). _AT_START puts it only at the start of such a piece and
# not before "</s>" or "<unk>", which are then matched after normalizing rather than before: at the
# start of the text and after <s> only, as without legacy (\A is the start of the text; ^ of a line).
_PREPEND = {"type": "Prepend", "prepend": "▁"}
_AT_START = {"type": "Replace", "pattern": {"Regex": "\\A(?!</s>|<unk>)"}, "content": "▁"}


def _legacy_setting(tok, folder):
    """The `legacy` setting that the transformers files in folder ask for; False where there are none.

    tokenizer.json is what transformers runs for a Mistral checkpoint: its normalizer (above) or its
    pre-tokenizer (Metaspace, transformers' own spelling) places the dummy space. tokenizer_config.json's
    flag is what transformers builds a tokenizer from without tokenizer.json, and in version 5 for
    model_type llama. Where both exist they must agree, since which one wins depends on the version."""
    config_file, json_file = os.path.join(folder, "tokenizer_config.json"), os.path.join(folder, "tokenizer.json")
    config = None
    if os.path.exists(config_file):
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        if config.get("add_bos_token") is False:
            raise ValueError(f"{config_file}: add_bos_token is false, but every sequence here starts with {BOS}")
    flag = (config or {}).get("legacy")
    if not os.path.exists(json_file):
        if config is not None and not isinstance(flag, bool):
            raise ValueError(f"{config_file}: no `legacy` setting, and transformers versions disagree on its "
                             "default; add \"legacy\": true or false, as the model was trained")
        return bool(flag)
    with open(json_file, encoding="utf-8") as f:
        spec = json.load(f)
    model, vocab = spec.get("model") or {}, {tok.sp.id_to_piece(i): i for i in range(tok.vocab_size)}
    if model.get("type") != "BPE" or model.get("vocab") != vocab:
        raise ValueError(f"{json_file}: not a BPE model with tokenizer.model's vocabulary")

    def parts(x, key):  # a normalizer or pre-tokenizer, or the list of those in a Sequence
        return [] if x is None else sum((parts(y, key) for y in x[key]), []) if key in x else [x]
    normalizers = parts(spec.get("normalizer"), "normalizers")
    pre_tokenizers = parts(spec.get("pre_tokenizer"), "pretokenizers")
    schemes = [p.get("prepend_scheme") for p in pre_tokenizers if p.get("type") == "Metaspace"]
    dummy_prefix = tok.sp.normalize("a") != "a"
    if _PREPEND in normalizers or _AT_START in normalizers:
        legacy = _PREPEND in normalizers
    elif schemes and schemes[0] in ("always", "first"):
        # transformers' own; the same on templated text, which neither starts with a space nor holds <s>
        legacy = schemes[0] == "always"
    elif dummy_prefix:
        raise ValueError(f"{json_file}: it adds no dummy space, where tokenizer.model does")
    else:  # no dummy space in either: both settings encode alike
        legacy = bool(flag)
    # added tokens are cut out of the text before anything else; data.py does that with the special ones,
    # and sentencepiece keeps its user-defined pieces whole, which is the same where there is no dummy space
    types = _piece_types(tok)
    matched_late = {EOS, UNK} if _AT_START in normalizers else set()
    for t in spec.get("added_tokens", []):
        s, i = t["content"], t["id"]
        known = tok.special.get(s) == i or (not dummy_prefix and 0 <= i < tok.vocab_size
                                            and types[i] == USER_DEFINED and tok.sp.id_to_piece(i) == s)
        if not known or t["normalized"] != (s in matched_late):
            raise ValueError(f"{json_file}: added token {s!r} (id {i}) is not one that data.py reproduces")
    if isinstance(flag, bool) and flag != legacy:
        raise ValueError(f"{folder}: tokenizer_config.json says legacy={flag} but tokenizer.json encodes as "
                         f"legacy={legacy}; transformers follows one or the other depending on its version")
    return legacy


def _tokenizer_json(tok):
    """The `tokenizers` library's tokenizer.json that encodes as tok does, whatever the text.

    sentencepiece's BPE repeatedly merges the adjacent pair that makes the best-scored piece; the
    tokenizers library merges the pair that comes first in its list, so the list is sorted by score.
    (transformers 5 sorts the merges it converts from tokenizer.model by id instead, which splits runs
    of spaces differently: another reason to write this file.) The dummy space is _PREPEND or _AT_START."""
    pieces, types = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)], _piece_types(tok)
    dummy_prefix = tok.sp.normalize("a") != "a"
    if dummy_prefix and USER_DEFINED in types:  # the demo tokenizer has no dummy space for this reason
        raise ValueError("transformers cannot put sentencepiece's dummy space in front of a user-defined "
                         "piece, and this tokenizer.model has both")
    normal = {p: i for i, p in enumerate(pieces) if types[i] == NORMAL}
    merges = sorted((-tok.sp.get_score(i), i, k, p[:k], p[k:]) for p, i in normal.items()
                    for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal)
    dummy = ([_PREPEND] if tok.legacy else [_AT_START]) if dummy_prefix else []
    added = [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": dummy == [_AT_START] and p in (EOS, UNK), "special": p in tok.special}
             for i, p in enumerate(pieces) if p in tok.special or types[i] == USER_DEFINED]
    bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
    space = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": dummy + [space]}, "pre_tokenizer": None,
        "post_processor": {  # BOS first, as add_bos_token says
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS: {"id": BOS, "ids": [tok.bos_id], "tokens": [BOS]}}},
        "decoder": {"type": "Sequence", "decoders": [  # the dummy space is stripped, as sentencepiece does
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
            *([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if dummy_prefix else [])]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": UNK, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": BYTE in types,
            "ignore_merges": False, "vocab": {p: i for i, p in enumerate(pieces)},
            "merges": [[a, b] for _, _, _, a, b in merges]},
    }
