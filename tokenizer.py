"""
A checkpoint's tokenizer and its chat template, used as transformers uses them, and the tokenizer
files of an export. No torch, no numpy: sample.py's command line and data.py's checks load it alone.

    tok = Tokenizer("SmolLM2-135M-Instruct")            # a folder, or its tokenizer.model / tokenizer.json
    text = tok.render(messages, add_generation_prompt=True)   # the checkpoint's own template (jinja2)
    ids = tok.encode(text, bos=True)                    # its special-token rule: BOS where it adds one
    tok.end_of_turn_ids                                 # where generation stops

Which file tokenizes: a folder with a tokenizer.model is read with sentencepiece (Mistral-7B, zephyr,
Llama 2 and the demo), even where a tokenizer.json sits beside it: the tokenizer.json of those
checkpoints is a conversion of the same model, which this file reads only to find the `legacy`
setting and refuses where it would encode differently (so the ids are transformers' either way),
and the papers' checkpoints then need none of the optional packages. A folder with only a
tokenizer.json (Qwen2.5 and Qwen3, Llama 3.x, SmolLM2: byte-level BPE) is read with Hugging Face's
`tokenizers`, imported only then.

The template: `--chat-template FILE`, else the checkpoint's own (chat_template.jinja, else
tokenizer_config.json's chat_template, as transformers picks), else zephyr's (SPIN's). It is rendered
as transformers' apply_chat_template renders it; data.py turns the text into ids and a loss mask.
"""
import datetime
import functools
import json
import os
import re
import shutil

import sentencepiece as spm

# -----------------------------------------------------------------------------
# the tokenizer

BOS, EOS, UNK = "<s>", "</s>", "<unk>"  # how text writes sentencepiece's special tokens (Mistral's piece names)
_SPECIAL = re.compile("(<s>|</s>|<unk>)")

# The serialized model plus these four bytes is the same model with add_dummy_prefix = false.
# In protobuf's wire format they read: ModelProto field 3 (normalizer_spec, length 2) holding
# NormalizerSpec field 3 (add_dummy_prefix, varint) = 0. A message field that appears twice is
# merged, so nothing else changes: same pieces, same merges, same byte fallback.
_NO_DUMMY_PREFIX = bytes([3 << 3 | 2, 2, 3 << 3 | 0, 0])


class Tokenizer:
    """A checkpoint's tokenizer (sentencepiece, or `tokenizers` for a tokenizer.json-only folder) and
    its chat template.

    path: a checkpoint folder, or a tokenizer.model / tokenizer.json file (the transformers files
    beside it are read). chat_template: a Jinja file that replaces the checkpoint's template.
    template_args: more variables for the template (Qwen3's enable_thinking). date: what the
    template's strftime_now reads (default: now, once), so a run renders the same text every time.

    The sentencepiece trap: with add_dummy_prefix (Mistral's model has it) sentencepiece encodes every
    string as if it began with a space, "Hi" -> "▁Hi". Text is encoded piece by piece between the
    special tokens, so which pieces get that dummy space is a choice, and transformers' Llama
    tokenizers make it with the `legacy` flag of a checkpoint's tokenizer_config.json:
    - legacy=False, sentencepiece's own rule: text at the start of a document (the start, or right
      after <s>) gets the dummy space; text that continues (after </s>, or a response after its
      prompt: continuation=True) gets none.
    - legacy=True, as Mistral-7B's and zephyr's tokenizers are published: text after any special
      token gets it too, so "</s>\\n" is "</s>", "▁", "<0x0A>".
    A model must see the ids it was trained on, so the transformers files beside the model decide
    (tokenizer.json, tokenizer_config.json: see _legacy_setting), and files that ask for what this
    class cannot reproduce are refused; with none there it uses sentencepiece's rule; legacy=True/False
    overrides both. decode mirrors encode, so decode(encode(x)) == x and
    decode(encode(x, continuation=True), continuation=True) == x. A tokenizer.json has no such
    choice: `tokenizers` encodes it as transformers does, and continuation changes nothing.
    """

    def __init__(self, path, chat_template=None, template_args=None, date=None, legacy=None):
        if os.path.isdir(path):
            folder = path
            file = next((os.path.join(path, f) for f in ("tokenizer.model", "tokenizer.json")
                         if os.path.exists(os.path.join(path, f))), None)
            if file is None:
                raise FileNotFoundError(f"{path}: a folder with neither a tokenizer.json nor a tokenizer.model")
        elif os.path.isfile(path):
            folder, file = os.path.dirname(os.path.abspath(path)), path
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
        self.file, self.folder = file, folder
        config = _read_json(os.path.join(folder, "special_tokens_map.json")) or {}
        config.update(_read_json(os.path.join(folder, "tokenizer_config.json")) or {})
        self.sp = self.hf = None
        if not file.endswith(".json"):
            self.sp = spm.SentencePieceProcessor(model_file=file)
            self.sp_continue = spm.SentencePieceProcessor(model_proto=self.sp.serialized_model_proto() + _NO_DUMMY_PREFIX)
            self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
            self.special = {BOS: self.bos_id, EOS: self.eos_id, UNK: self.unk_id}  # as transformers reads them in text
            if any(i < 0 or self.sp.id_to_piece(i) != s for s, i in self.special.items()):
                raise ValueError(f"{file}: the tokenizer needs the pieces {UNK}, {BOS} and {EOS}")
            # Mistral's model has no pad piece. Padding sits after the real tokens (right padding under a
            # causal mask) and is masked out of every loss, so any id would do: we use EOS.
            self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
            self.vocab_size = self.sp.vocab_size()
            self.legacy = _legacy_setting(self, folder) if legacy is None else legacy
            self.tokens = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
        else:
            self._init_tokenizers(file, config)
        self._init_template(folder, chat_template, template_args, date)

    def _init_tokenizers(self, file, config):
        """A tokenizer.json, through the `tokenizers` library, with the special tokens tokenizer_config.json names."""
        try:
            import tokenizers
        except ImportError:
            raise ImportError(f"{file}: a tokenizer.json is read with Hugging Face's tokenizers library, which is "
                              "not installed: pip install tokenizers") from None
        self.hf = tokenizers.Tokenizer.from_file(file)
        self.legacy = None
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        self.special = {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        self.tokens = {}  # the template's bos_token, eos_token, ...: transformers' special_tokens_map
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            token = config.get(name)
            token = token.get("content") if isinstance(token, dict) else token
            if token is not None:
                if self.hf.token_to_id(token) is None:
                    raise ValueError(f"{os.path.join(self.folder, 'tokenizer_config.json')}: {name} {token!r} is "
                                     f"not a token of {file}")
                self.tokens[name] = token
        ids = {name: self.hf.token_to_id(t) for name, t in self.tokens.items()}
        self.bos_id, self.eos_id, self.unk_id = ids.get("bos_token"), ids.get("eos_token"), ids.get("unk_token")
        if self.eos_id is None:
            raise ValueError(f"{self.folder}: tokenizer_config.json names no eos_token, where generation stops")
        self.pad_id = ids.get("pad_token", self.eos_id)  # no pad token: EOS, masked out like any padding
        # the special tokens it adds (its BOS or none) are its post-processor's: transformers 5 ignores
        # tokenizer_config.json's add_bos_token where there is a tokenizer.json

    def encode(self, text, bos=False, continuation=False):
        """Token ids of text; special tokens written in it become their ids. bos=True: with the
        tokenizer's own special tokens (BOS where it adds one), never two BOS where the text starts
        with one (a template that writes bos_token itself)."""
        if self.hf is not None:
            ids = self.hf.encode(text, add_special_tokens=bos).ids
        else:
            ids = [self.bos_id] if bos else []
            at_start = not continuation
            for part in _SPECIAL.split(text):  # text, special, text, special, ..., text
                if part in self.special:
                    ids.append(self.special[part])
                    at_start = part == BOS or self.legacy
                elif part:
                    ids.extend((self.sp if at_start else self.sp_continue).encode(part))
        if bos and self.bos_id is not None and ids[:2] == [self.bos_id, self.bos_id]:
            ids = ids[1:]
        return ids

    def decode(self, ids, continuation=False):
        """Text of ids, the inverse of encode with the same continuation flag; special ids come back as text."""
        if self.hf is not None:
            return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)
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

    # -------------------------------------------------------------------------
    # the chat template

    def _init_template(self, folder, chat_template, template_args, date):
        """The template and its name (for errors), its variables, and the ids that end a turn."""
        if chat_template is not None:
            with open(chat_template, encoding="utf-8") as f:
                self.template, self.template_name = f.read(), chat_template
        elif _own_template(folder)[0] is not None:
            self.template, self.template_name = _own_template(folder)
        else:  # zephyr's, with BOS written first where the tokenizer adds one (so apply_chat_template's ids are ours)
            adds_bos = self.bos_id is not None and self.encode("", bos=True)[:1] == [self.bos_id]
            self.template = ZEPHYR_TEMPLATE if adds_bos else ZEPHYR_TEMPLATE.removeprefix("{{ bos_token }}")
            self.template_name = f"zephyr's template (built in; {folder} has none)"
        self.template_args = dict(template_args or {})
        self.date = date or datetime.datetime.now()
        # where generation stops: the tokenizer's EOS, every eos_token_id of generation_config.json
        # (Llama 3: <|end_of_text|>, <|eom_id|>, <|eot_id|>), and the special token that the template
        # writes right after an assistant turn's text
        stop = (_read_json(os.path.join(folder, "generation_config.json")) or {}).get("eos_token_id")
        stop = {self.eos_id} | set(stop if isinstance(stop, list) else [] if stop is None else [stop])
        marker = "\x00reply\x00"
        after = self.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}])
        first = self.encode(after.split(marker, 1)[-1])[:1]
        self.end_of_turn_ids = frozenset(stop | {i for i in first if i in self.special.values()})

    def render(self, messages, add_generation_prompt=False):
        """The chat as text in the template, as transformers' apply_chat_template(tokenize=False) writes it."""
        try:
            return render_template(self.template, messages, add_generation_prompt, self.date,
                                   **{**self.tokens, **self.template_args})  # an argument wins, as in transformers
        except Exception as e:  # jinja2's errors and the template's own raise_exception
            raise ValueError(f"{self.template_name}: {type(e).__name__}: {e}") from None


def add_template_flags(parser):
    """--chat-template and --chat-template-arg, the same for train.py, data.py check and sample.py."""
    parser.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template instead of the checkpoint's "
                        "own (its chat_template.jinja or tokenizer_config.json's; else zephyr's)")
    parser.add_argument("--chat-template-arg", metavar="KEY=VALUE", action="append", default=[],
                        help="a variable for the chat template, VALUE read as JSON where it parses (Qwen3's "
                             "enable_thinking=false); repeatable")


def parse_template_args(pairs, flag="--chat-template-arg"):
    """["enable_thinking=false", "name=x"] -> {"enable_thinking": False, "name": "x"}: a VALUE is read as
    JSON where it parses (false, 3, "x", [1, 2]), else taken as the string."""
    args = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq or not key.isidentifier():
            raise ValueError(f"{flag} {pair!r}: expected KEY=VALUE with KEY a template variable name")
        try:
            args[key] = json.loads(value)
        except json.JSONDecodeError:
            args[key] = value
    return args


def _own_template(folder):
    """(template, where it was found) of a checkpoint folder, or (None, None): chat_template.jinja first,
    as transformers picks, else tokenizer_config.json's chat_template (of several named ones, "default")."""
    jinja, config = os.path.join(folder, "chat_template.jinja"), os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read(), jinja
    own = (_read_json(config) or {}).get("chat_template")
    if isinstance(own, list):
        own = next((t["template"] for t in own if t.get("name") == "default"), None)
    return (own, f"{config}: chat_template") if isinstance(own, str) else (None, None)


def _read_json(path):
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)

# -----------------------------------------------------------------------------
# rendering a chat template as transformers does (its chat_template_utils): a sandboxed jinja2
# environment, trim_blocks and lstrip_blocks, the loopcontrols extension, and the same helpers.

# SPIN's zephyr template; eos_token where zephyr writes </s>. It writes bos_token first, as Llama-family
# templates do, because apply_chat_template tokenizes without adding special tokens; Tokenizer drops
# it for a tokenizer that adds no BOS.
ZEPHYR_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                   "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def render_template(template, messages, add_generation_prompt=False, date=None, **variables):
    """template (Jinja source) rendered for messages; variables: bos_token, eos_token, ... and template
    arguments. strftime_now reads date (default: now) instead of the clock."""
    date = date or datetime.datetime.now()
    return _compile(template).render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt,
                                     strftime_now=date.strftime, **variables)


@functools.lru_cache(maxsize=16)
def _compile(template):
    import jinja2  # comes with torch; only a template needs it
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """{% generation %}...{% endgeneration %}: transformers marks the assistant's text with it
        (for its assistant-token mask); the text renders unchanged."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja2's own tojson escapes HTML characters; transformers' writes plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)

# -----------------------------------------------------------------------------
# transformers' tokenizer files. Those a checkpoint comes with decide `legacy`; every export carries
# a full set, so transformers, vLLM and lm-eval tokenize and template as training did.

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def export_tokenizer(tok, out_dir, source_dir=None, model_max_length=None):
    """Write transformers' tokenizer files into out_dir, beside an exported checkpoint: tokenizer.model
    (sentencepiece only), tokenizer.json, tokenizer_config.json with the chat template that training
    used, special_tokens_map.json, generation_config.json with every end-of-turn id.

    The files of source_dir (the checkpoint that training started from; default the folder tok was
    read from) are copied unchanged where it holds the same tokenizer file (and its
    chat_template.jinja, if any), and only the missing ones are written; except that where training
    used another template (a --chat-template file, or zephyr's for a source with none), the export's
    tokenizer_config.json carries that one and no chat_template.jinja overrides it. tokenizer.json is
    always there, so that transformers need not convert tokenizer.model, which takes sentencepiece and
    protobuf (and transformers 5 loses the dummy space doing it for model_type mistral).
    model_max_length: the longest sequence the model takes; None writes transformers' "no limit", as
    Mistral-7B's does."""
    name_of_file = "tokenizer.json" if tok.hf is not None else "tokenizer.model"
    source = source_dir if source_dir is not None else tok.folder
    if not os.path.exists(os.path.join(source, name_of_file)):
        source = None
    else:
        with open(tok.file, "rb") as a, open(os.path.join(source, name_of_file), "rb") as b:
            same = a.read() == b.read()  # if not, the source's files describe another tokenizer: ignore them
        if same and tok.sp is not None and Tokenizer(os.path.join(source, name_of_file)).legacy != tok.legacy:
            raise ValueError(f"{source}: its tokenizer files ask for legacy={not tok.legacy}, "
                             f"but {tok.file} was read with legacy={tok.legacy}")
        source = source if same else None
    stop = sorted(tok.end_of_turn_ids)
    tokens = {**tok.tokens, "pad_token": tok.decode([tok.pad_id])}
    ours = {
        "tokenizer_config.json": {
            "tokenizer_class": "LlamaTokenizer" if tok.sp is not None else "PreTrainedTokenizerFast", **tokens,
            **({"add_bos_token": True, "add_eos_token": False, "legacy": tok.legacy} if tok.sp is not None else {}),
            "clean_up_tokenization_spaces": False, "chat_template": tok.template,
            "model_max_length": int(1e30) if model_max_length is None else model_max_length},
        "special_tokens_map.json": tokens,
        "generation_config.json": {**({"bos_token_id": tok.bos_id} if tok.bos_id is not None else {}),
                                   "eos_token_id": stop if len(stop) > 1 else stop[0]},
    }
    os.makedirs(out_dir, exist_ok=True)
    names = [n for n in TOKENIZER_FILES if tok.sp is not None or n != "tokenizer.model"]
    copies = [n for n in names + ["chat_template.jinja"] if source is not None and os.path.exists(os.path.join(source, n))]
    own = None if source is None else _own_template(source)[0]  # the template the copies would give
    for name in copies:  # read, then write: out_dir may be source_dir
        with open(os.path.join(source, name), "rb") as f:
            content = f.read()
        if own != tok.template and name == "chat_template.jinja":
            continue
        if own != tok.template and name == "tokenizer_config.json":
            content = json.dumps({**json.loads(content), "chat_template": tok.template}, indent=2, ensure_ascii=False).encode()
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(content)
    if own != tok.template and os.path.exists(os.path.join(out_dir, "chat_template.jinja")):
        os.remove(os.path.join(out_dir, "chat_template.jinja"))  # it would win over tokenizer_config.json's
    for name in names:
        path = os.path.join(out_dir, name)
        if name in copies:
            continue
        if name == name_of_file:
            if not (os.path.exists(path) and os.path.samefile(tok.file, path)):
                shutil.copyfile(tok.file, path)
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
    # added tokens are cut out of the text before anything else; Tokenizer.encode does that with the special ones,
    # and sentencepiece keeps its user-defined pieces whole, which is the same where there is no dummy space
    types = _piece_types(tok)
    matched_late = {EOS, UNK} if _AT_START in normalizers else set()
    for t in spec.get("added_tokens", []):
        s, i = t["content"], t["id"]
        known = tok.special.get(s) == i or (not dummy_prefix and 0 <= i < tok.vocab_size
                                            and types[i] == USER_DEFINED and tok.sp.id_to_piece(i) == s)
        if not known or t["normalized"] != (s in matched_late):
            raise ValueError(f"{json_file}: added token {s!r} (id {i}) is not one that tokenizer.py reproduces")
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
