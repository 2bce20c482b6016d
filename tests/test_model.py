"""model.py against transformers' MistralForCausalLM / LlamaForCausalLM on random tiny checkpoints."""
import json
import os
import re

import pytest
import torch

from model import PRESETS, ModelArgs, Transformer, attend_one, load_model, save_model

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file

# GQA (4 query heads share 2 KV heads) and a window of 8 inside sequences of 24
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=300, rms_norm_eps=1e-5,
            max_position_embeddings=256, rope_theta=5000.0)


def hf_model(model_type="mistral", tied=False, seed=0):
    """A transformers model with every weight random, norm gains included (ones would hide a swapped norm)."""
    torch.manual_seed(seed)
    if model_type == "mistral":
        cfg = transformers.MistralConfig(**TINY, sliding_window=8, tie_word_embeddings=tied)
        m = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**TINY, tie_word_embeddings=tied)
        m = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    return m.eval()


def tokens(seed=1, B=3, T=24):
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(m, x):
    with torch.no_grad():
        return m(x).logits


@pytest.mark.parametrize("model_type", ["mistral", "llama"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("sharded", [False, True])
def test_loads_hf_checkpoint_with_matching_logits(tmp_path, model_type, tied, sharded):
    ref = hf_model(model_type, tied)
    ref.save_pretrained(tmp_path, max_shard_size="60KB" if sharded else "1GB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json") == sharded
    ours = load_model(tmp_path)
    assert ours.args.model_type == model_type and ours.args.tie_embeddings == tied
    assert ours.args.sliding_window == (8 if model_type == "mistral" else None)
    if tied:
        assert ours.output.weight is ours.tok_embeddings.weight
    x = tokens()
    with torch.no_grad():
        diff = (ours(x) - hf_logits(ref, x)).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_is_sdpa(dtype):
    """attend_one (a decode step's one query per row) against SDPA in float64: GQA (6 query heads on 2
    key heads), a mask with left padding and a window, and the fp32 arithmetic SDPA uses in bf16."""
    g = torch.Generator().manual_seed(3)
    B, H, n_kv, S, hd = 4, 6, 2, 37, 16
    q = (2 * torch.randn(B, H, 1, hd, generator=g)).to(dtype)
    k, v = (torch.randn(B, n_kv, S, hd, generator=g).to(dtype) for _ in range(2))
    slots = torch.arange(S)
    mask = (slots >= torch.tensor([0, 5, 11, 20])[:, None]) & (slots > S - 1 - 24)  # pads, then a window of 24
    mask = mask[:, None, None, :]
    for m in (mask, None):
        want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m,
                                                                enable_gqa=True)
        got = attend_one(q, k, v, m)
        assert got.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 8e-3  # bf16: the output's own rounding
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_sliding_window_changes_the_result():
    """The window really is applied: the same weights with the window widened give other logits."""
    m = Transformer(ModelArgs(**_args(sliding_window=8))).init_weights(0)
    wide = Transformer(ModelArgs(**_args(sliding_window=None)))
    wide.load_state_dict(m.state_dict())
    x = tokens()
    with torch.no_grad():
        a, b = m(x), wide(x)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)  # inside the first window nothing differs
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


def _args(**kw):
    base = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=160, vocab_size=300,
                sliding_window=8, max_seq_len=256, rope_theta=5000.0)
    base.update(kw)
    return base


def test_hidden_states_match_transformers(tmp_path):
    ref = hf_model()
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    x = tokens()
    with torch.no_grad():
        h = ours(x, return_hidden=True)
        h_ref = ref(x, output_hidden_states=True).hidden_states[-1]  # after the final norm
    assert (h - h_ref).abs().max() < 1e-4
    assert torch.allclose(ours.output(h), ours(x))


@pytest.mark.parametrize("tied", [False, True])
def test_save_model_loads_in_transformers(tmp_path, tied):
    torch.manual_seed(0)
    ours = Transformer(ModelArgs(**_args(tie_embeddings=tied))).init_weights(3, std=0.08)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    save_model(ours, tmp_path)
    ref = transformers.MistralForCausalLM.from_pretrained(tmp_path).eval()
    assert ref.config.sliding_window == 8 and ref.config.tie_word_embeddings == tied
    x = tokens(seed=5)
    with torch.no_grad():
        assert (ours(x) - hf_logits(ref, x)).abs().max() < 1e-4
    again = load_model(tmp_path)  # and back: a round trip is exact
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))


def _random_model(tied=False, seed=3):
    """Our model with every weight random, norm gains included."""
    ours = Transformer(ModelArgs(**_args(tie_embeddings=tied))).init_weights(seed, std=0.08)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return ours


def _weight_files(path):
    return sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".index.json")))


@pytest.mark.parametrize("tied", [False, True])
def test_sharded_save_loads_in_transformers_and_back(tmp_path, tied):
    from safetensors import safe_open
    ours = _random_model(tied)
    max_bytes = 40_000  # the 300 x 64 fp32 embedding (76.8 kB) is larger: it must get a shard of its own
    save_model(ours, tmp_path, max_shard_size=max_bytes)
    files = _weight_files(tmp_path)
    shards = [f for f in files if f.endswith(".safetensors")]
    n = len(shards)
    assert n > 2 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)] + ["model.safetensors.index.json"]

    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    state = {k: v for k, v in ours.state_dict().items() if not (tied and k == "output.weight")}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert len(index["weight_map"]) == len(state) and set(index["weight_map"].values()) == set(shards)
    for shard in shards:  # every tensor whole, in the shard the index names; a shard over the limit holds one tensor
        with safe_open(tmp_path / shard, framework="pt") as st:
            keys = list(st.keys())
            assert keys and all(index["weight_map"][k] == shard for k in keys)
            size = sum(st.get_tensor(k).numel() * 4 for k in keys)
            assert size <= max_bytes or len(keys) == 1
    # the model's order: the embedding is in the first shard, the final norm in the last
    assert index["weight_map"]["model.embed_tokens.weight"] == shards[0]
    assert index["weight_map"]["model.norm.weight"] in shards[-2:]

    x = tokens(seed=7)
    ref = transformers.MistralForCausalLM.from_pretrained(tmp_path).eval()
    again = load_model(tmp_path)
    with torch.no_grad():
        assert (ours(x) - hf_logits(ref, x)).abs().max() < 1e-4
        assert torch.equal(again(x), ours(x))
    if tied:
        assert again.output.weight is again.tok_embeddings.weight


def test_save_is_deterministic_and_one_file_below_the_limit(tmp_path):
    ours = _random_model()
    save_model(ours, tmp_path / "a", max_shard_size="50KB")
    save_model(ours, tmp_path / "b", max_shard_size=50_000)
    for f in _weight_files(tmp_path / "a"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    save_model(ours, tmp_path / "c")  # the default, 5GB
    assert _weight_files(tmp_path / "c") == ["model.safetensors"]


def test_save_replaces_the_other_layout(tmp_path):
    """Saving into a folder that holds an earlier save leaves only the new layout: a stale index would
    point load_model and transformers at stale shards."""
    a, b = _random_model(seed=3), _random_model(seed=4)
    x = tokens(seed=8)
    save_model(a, tmp_path, max_shard_size="40KB")
    (tmp_path / "tokenizer.model").write_bytes(b"kept")  # not a weight file: left alone
    save_model(b, tmp_path)
    assert _weight_files(tmp_path) == ["model.safetensors"] and (tmp_path / "tokenizer.model").exists()
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path)(x), b(x))
    save_model(a, tmp_path, max_shard_size="40KB")
    assert "model.safetensors" not in _weight_files(tmp_path)
    save_model(b, tmp_path, max_shard_size="100KB")  # fewer shards than before: no leftover from the 40KB save
    with open(tmp_path / "model.safetensors.index.json") as f:
        named = set(json.load(f)["weight_map"].values())
    assert set(_weight_files(tmp_path)) == named | {"model.safetensors.index.json"}
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path)(x), b(x))


def test_parse_size():
    from model import parse_size
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 500 * 10**6
    assert parse_size("60kb") == 60_000 and parse_size("2GiB") == 2 * 2**30 and parse_size("1.5 MB") == 1_500_000
    assert parse_size(123) == 123 and parse_size("123") == 123
    for bad in ["5 GBs", "GB", "-1MB", "0", 0, True, None]:
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


def _half_to_interleaved(w, n_heads):
    """Mistral's native layout, built independently of model.py: within each head, native row 2i is
    rotate-half row i and native row 2i+1 is rotate-half row i + hd/2."""
    hd = w.shape[0] // n_heads
    perm = torch.tensor([i // 2 + (i % 2) * (hd // 2) for i in range(hd)])
    return w.view(n_heads, hd, -1)[:, perm].reshape(w.shape)


def _mistral_native_folder(ref, path, tied=False):
    cfg = ref.config
    sd = {}
    for name, t in ref.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        n = (name.replace("model.embed_tokens", "tok_embeddings").replace("model.norm", "norm")
             .replace("lm_head", "output").replace("model.layers", "layers")
             .replace("self_attn.q_proj", "attention.wq").replace("self_attn.k_proj", "attention.wk")
             .replace("self_attn.v_proj", "attention.wv").replace("self_attn.o_proj", "attention.wo")
             .replace("mlp.gate_proj", "feed_forward.w1").replace("mlp.down_proj", "feed_forward.w2")
             .replace("mlp.up_proj", "feed_forward.w3").replace("post_attention_layernorm", "ffn_norm")
             .replace("input_layernorm", "attention_norm"))
        if n.endswith("attention.wq.weight"):
            t = _half_to_interleaved(t, cfg.num_attention_heads)
        if n.endswith("attention.wk.weight"):
            t = _half_to_interleaved(t, cfg.num_key_value_heads)
        sd[n] = t.contiguous()
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "consolidated.safetensors"))
    params = dict(dim=cfg.hidden_size, n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
                  n_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_dim=cfg.intermediate_size,
                  vocab_size=cfg.vocab_size, norm_eps=cfg.rms_norm_eps, rope_theta=TINY["rope_theta"],
                  sliding_window=cfg.sliding_window, tied_embeddings=tied)
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(params, f)
    return sd


def test_mistral_native_folder_loads_to_the_same_logits(tmp_path):
    ref = hf_model()
    sd = _mistral_native_folder(ref, tmp_path)
    ours = load_model(tmp_path)
    x = tokens(seed=2)
    with torch.no_grad():
        assert (ours(x) - hf_logits(ref, x)).abs().max() < 1e-4

    # The native layout rotates interleaved pairs, as Mistral's reference does with complex numbers.
    # Attention scores computed that way from the native file equal ours (scores do not depend on
    # how channels are ordered inside a head, only on which channels are paired).
    emb = sd["tok_embeddings.weight"][x[0]]  # [T, d]
    h = ours.layers[0].attention_norm(emb)
    q_nat = (h @ sd["layers.0.attention.wq.weight"].T).view(24, 4, 16)
    k_nat = (h @ sd["layers.0.attention.wk.weight"].T).view(24, 2, 16)
    freqs = 1.0 / 5000.0 ** (torch.arange(0, 16, 2).double() / 16)
    rot = torch.polar(torch.ones(24, 8, dtype=torch.float64), torch.outer(torch.arange(24).double(), freqs))
    as_complex = lambda t: torch.view_as_complex(t.double().reshape(*t.shape[:-1], -1, 2))
    q_c = as_complex(q_nat) * rot[:, None]
    k_c = as_complex(k_nat) * rot[:, None]
    scores_ref = torch.einsum("qhc,khc->hqk", q_c, k_c.repeat_interleave(2, dim=1).conj()).real
    from model import apply_rope, rope_angles
    att = ours.layers[0].attention
    cos, sin = rope_angles(torch.arange(24), 16, 5000.0)
    with torch.no_grad():
        q = apply_rope(att.wq(h).view(1, 24, 4, 16).transpose(1, 2), cos, sin)[0]
        k = apply_rope(att.wk(h).view(1, 24, 2, 16).transpose(1, 2), cos, sin)[0]
    scores = torch.einsum("hqc,hkc->hqk", q.double(), k.repeat_interleave(2, dim=0).double())
    assert (scores - scores_ref).abs().max() < 1e-4


def test_mistral_7b_preset_has_the_published_parameter_count():
    with torch.device("meta"):
        m = Transformer(PRESETS["mistral-7b"])
    assert sum(p.numel() for p in m.parameters()) == 7_241_732_096
    assert PRESETS["mistral-7b"].to_hf()["sliding_window"] == 4096


def test_load_in_bf16(tmp_path):
    ref = hf_model()
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    x = tokens()
    with torch.no_grad():
        diff = (ours(x).float() - hf_logits(ref, x)).abs().max().item()
    assert diff < 0.5  # bf16 keeps ~3 significant digits; a wrong layout would be off by whole units


# --- bad checkpoints: each names its problem -------------------------------------------------

def _edit_config(path, **changes):
    with open(path / "config.json") as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(path / "config.json", "w") as f:
        json.dump(cfg, f)


def _edit_tensors(path, edit):
    from safetensors.torch import load_file
    sd = load_file(path / "model.safetensors")
    edit(sd)
    save_file(sd, path / "model.safetensors")


@pytest.fixture
def good(tmp_path):
    hf_model().save_pretrained(tmp_path)
    return tmp_path


def test_rejects_unknown_model_type(good):
    _edit_config(good, model_type="gpt2")
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        load_model(good)


def test_rejects_missing_config_field(good):
    _edit_config(good, num_hidden_layers=None)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        load_model(good)


def test_rejects_missing_tensor(good):
    _edit_tensors(good, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: layers\.1\.feed_forward\.w3\.weight"):
        load_model(good)


def test_rejects_unexpected_tensor(good):
    _edit_tensors(good, lambda sd: sd.update({"model.layers.9.self_attn.q_proj.weight": torch.zeros(4, 4)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.9\.self_attn\.q_proj\.weight'"):
        load_model(good)


def test_rejects_wrong_shape(good):
    _edit_config(good, intermediate_size=128)  # the tensors are 160 wide
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape \(\d+, \d+\), the config says .*128"):
        load_model(good)


def test_rejects_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_rejects_missing_shard(tmp_path):
    hf_model().save_pretrained(tmp_path, max_shard_size="60KB")
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[0]
    os.remove(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / shard))):
        load_model(tmp_path)


# A damaged file is named with its path, not only with the reason safetensors or json gives.

def _cut_in_half(f):
    raw = f.read_bytes()
    f.write_bytes(raw[:len(raw) // 2])


@pytest.mark.parametrize("damage,reason", [
    (_cut_in_half, "file not fully covered"),                     # an interrupted copy or download
    (lambda f: f.write_bytes(b""), "header too small"),           # a copy that never started
    (lambda f: f.write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8,
                                           generator=torch.Generator().manual_seed(0)).numpy().tobytes()), "header"),
    (lambda f: torch.save({"w": torch.zeros(3)}, f), "header"),  # a PyTorch pickle under the safetensors name
])
def test_damaged_safetensors_file_is_named(good, damage, reason):
    damage(good / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape(str(good / "model.safetensors")) + r": not a readable safetensors file \(.*" + reason):
        load_model(good)


def test_damaged_shard_is_named(tmp_path):
    hf_model().save_pretrained(tmp_path, max_shard_size="60KB")
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[-1]
    _cut_in_half(tmp_path / shard)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / shard)) + ": not a readable safetensors file"):
        load_model(tmp_path)


def test_unreadable_weight_file_is_named(good):
    os.remove(good / "model.safetensors")
    os.mkdir(good / "model.safetensors")  # exists, but is no file to read
    with pytest.raises(OSError, match=re.escape(str(good / "model.safetensors")) + ": cannot read"):
        load_model(good)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "params.json"])
def test_json_syntax_error_is_named_with_line_and_column(tmp_path, name):
    ref = hf_model()
    if name == "params.json":
        _mistral_native_folder(ref, tmp_path)
    else:
        ref.save_pretrained(tmp_path, max_shard_size="60KB")
    text = json.dumps(json.loads((tmp_path / name).read_text()), indent=2)
    (tmp_path / name).write_text(text[:-2] + ",\n}\n")  # a trailing comma: the commonest hand-edit mistake
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / name)) + r": not valid JSON \(.* at line \d+, column \d+\)"):
        load_model(tmp_path)


def test_config_that_is_not_an_object_or_not_text(good):
    (good / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(str(good / "config.json")) + ": expected a JSON object, got list"):
        load_model(good)
    (good / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=re.escape(str(good / "config.json")) + ": not valid JSON"):
        load_model(good)


def test_index_without_a_weight_map_is_named(tmp_path):
    hf_model().save_pretrained(tmp_path, max_shard_size="60KB")
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "model.safetensors.index.json")) + ": 'weight_map'"):
        load_model(tmp_path)


# --- today's families against transformers' own classes ----------------------------------------
# Each on random weights of a small config: logits, greedy generation through sample.py's KV cache,
# and the export reopened by transformers' AutoModelForCausalLM.

# Llama 3's RoPE: head_dim 16 and rope_theta 500 give 8 frequencies with wavelengths 2π · 500^(i/8) =
# 6.3, 14, 30, 64, 140, 303, 658, 1429 tokens. With a pretraining context of 96 and the released factors
# (8, 1, 4), the wavelengths below 96/4 = 24 stay, those above 96/1 = 96 are divided by 8 and the two
# between are blended.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 96}
FAMILY = {
    "llama3": lambda tied: transformers.LlamaConfig(**{**TINY, "rope_theta": 500.0}, rope_parameters={
        **LLAMA3_ROPE, "rope_theta": 500.0}, tie_word_embeddings=tied),
    "qwen2": lambda tied: transformers.Qwen2Config(**TINY, tie_word_embeddings=tied),
    # head_dim 24 with 4 heads of a 64-wide model: q is 96 wide, not 64
    "qwen3": lambda tied: transformers.Qwen3Config(**{**TINY, "head_dim": 24}, tie_word_embeddings=tied),
}
HF_CLASS = {"llama3": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
LONG = 112  # longer than Llama 3's original_max_position_embeddings (96): positions past it are scaled


def family_model(family, tied, seed=0):
    """transformers' own model of the family, every weight random: norm gains (q/k norms included) around
    1, biases large enough to matter (0.5), the rest at 0.15, where greedy decoding does not yet fall into
    repeating one token (at 0.08 it does, and a generation test would compare little)."""
    torch.manual_seed(seed)
    m = getattr(transformers, HF_CLASS[family])(FAMILY[family](tied))
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else
                    0.5 * torch.randn_like(p) if name.endswith("bias") else 0.15 * torch.randn_like(p))
    return m.eval()


FAMILIES_TIED = [(f, t) for f in FAMILY for t in (False, True)]


@pytest.mark.parametrize("family,tied", FAMILIES_TIED)
def test_family_loads_with_transformers_logits(tmp_path, family, tied):
    ref = family_model(family, tied)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    a = ours.args
    assert (a.model_type, a.tie_embeddings) == (ref.config.model_type, tied)
    assert (a.qkv_bias, a.qk_norm) == (family == "qwen2", family == "qwen3") and a.sliding_window is None
    assert a.head_dim == (24 if family == "qwen3" else 16)
    assert a.rope_scaling == ({k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"} if family == "llama3" else None)
    if family == "qwen2":
        assert ours.layers[0].attention.wq.bias.abs().min() > 0 and ours.layers[0].attention.wo.bias is None
    if tied:
        assert ours.output.weight is ours.tok_embeddings.weight
    x = tokens(seed=3, T=LONG)
    with torch.no_grad():
        assert (ours(x) - hf_logits(ref, x)).abs().max() < 1e-4


def test_llama3_rope_has_all_three_bands():
    """The three bands occur in the test config, and our frequencies are transformers' own."""
    from model import rope_frequencies
    ref = family_model("llama3", False)
    theirs = ref.model.rotary_emb.inv_freq
    plain = 1.0 / 500.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    wavelength = 2 * torch.pi / plain
    L = LLAMA3_ROPE["original_max_position_embeddings"]
    kept, scaled = wavelength < L / 4.0, wavelength > L / 1.0
    blended = ~kept & ~scaled
    assert kept.sum() >= 2 and scaled.sum() >= 2 and blended.sum() >= 2
    ours = rope_frequencies(16, 500.0, {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"})
    assert torch.equal(ours, theirs.float())
    assert torch.allclose(ours[kept].double(), plain[kept]) and torch.allclose(ours[scaled].double(), plain[scaled] / 8)
    between = ours[blended].double()
    assert ((between < plain[blended]) & (between > plain[blended] / 8)).all()


@pytest.mark.parametrize("family,tied", [("llama3", True), ("qwen2", False), ("qwen3", True)])
def test_family_greedy_generation_matches_transformers(tmp_path, family, tied, one_thread):
    """sample.generate (batched, left-padded, KV cache) against transformers' generate, one prompt at a time.
    The longest prompt runs past Llama 3's original context."""
    from sample import generate
    ref = family_model(family, tied)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist() for n in (5, 90, 17)]
    n_new = 24
    got = generate(ours, prompts, n_new, temperature=0.0)
    assert all(len(set(row)) > n_new // 2 for row in got)  # varied text, not one token repeated
    ref.generation_config.eos_token_id = None  # run to the length limit, as ours does without eos_id
    for p, mine in zip(prompts, got):
        with torch.no_grad():
            # the mask given: otherwise transformers masks every token equal to pad_token_id out of the prompt
            out = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=n_new, do_sample=False, pad_token_id=0)
        assert mine == out[0, len(p):].tolist()


@pytest.mark.parametrize("family,tied", FAMILIES_TIED)
def test_family_export_opens_in_transformers(tmp_path, family, tied):
    from safetensors import safe_open
    ref = family_model(family, tied)
    ref.save_pretrained(tmp_path / "src")
    ours = load_model(tmp_path / "src")
    save_model(ours, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == [HF_CLASS[family]] and cfg["model_type"] == ref.config.model_type
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as st:
        names = set(st.keys())
    assert names == set(ref.state_dict()) - ({"lm_head.weight"} if tied else set())  # transformers' names
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(back).__name__ == HF_CLASS[family]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert back.config.tie_word_embeddings == tied
    if tied:
        assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    x = tokens(seed=6, T=LONG)
    with torch.no_grad():
        assert (hf_logits(back.eval(), x) - ours(x)).abs().max() < 1e-4
        again = load_model(tmp_path / "out")
        assert again.args == ours.args and torch.equal(again(x), ours(x))  # the round trip is exact


@pytest.mark.parametrize("key", ["type", "rope_type"])
def test_llama3_config_in_transformers_4_spelling(tmp_path, key):
    """transformers 4.x wrote rope_theta and rope_scaling at the top level (older files: "type")."""
    family_model("llama3", True).save_pretrained(tmp_path)
    five = load_model(tmp_path)
    scaling = {key: "llama3", **{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}}
    _edit_config(tmp_path, rope_parameters=None, rope_theta=500.0, rope_scaling=scaling)
    four = load_model(tmp_path)
    assert four.args == five.args
    x = tokens(seed=9, T=LONG)
    with torch.no_grad():
        assert torch.equal(four(x), five(x))


# The config.json files of published checkpoints, in transformers 4.x's spelling as they were released
# (bf16 dtype and version fields left out). Built on the meta device: the same tensor names and shapes
# as transformers' own model of the same config, and the published parameter counts.
PUBLISHED = {
    "Llama-3.2-1B-Instruct": (1_235_814_400, dict(
        architectures=["LlamaForCausalLM"], attention_bias=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
        head_dim=64, hidden_act="silu", hidden_size=2048, intermediate_size=8192, max_position_embeddings=131072,
        mlp_bias=False, model_type="llama", num_attention_heads=32, num_hidden_layers=16, num_key_value_heads=8,
        pretraining_tp=1, rms_norm_eps=1e-05, rope_theta=500000.0, tie_word_embeddings=True, vocab_size=128256,
        rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0, original_max_position_embeddings=8192,
                          rope_type="llama3"))),
    "Qwen2.5-0.5B-Instruct": (494_032_768, dict(
        architectures=["Qwen2ForCausalLM"], bos_token_id=151643, eos_token_id=151645, hidden_act="silu", hidden_size=896,
        intermediate_size=4864, max_position_embeddings=32768, max_window_layers=21, model_type="qwen2",
        num_attention_heads=14, num_hidden_layers=24, num_key_value_heads=2, rms_norm_eps=1e-06, rope_theta=1000000.0,
        sliding_window=32768, tie_word_embeddings=True, use_sliding_window=False, vocab_size=151936)),
    "Qwen3-0.6B": (596_049_920, dict(
        architectures=["Qwen3ForCausalLM"], attention_bias=False, bos_token_id=151643, eos_token_id=151645, head_dim=128,
        hidden_act="silu", hidden_size=1024, intermediate_size=3072, max_position_embeddings=40960, max_window_layers=28,
        model_type="qwen3", num_attention_heads=16, num_hidden_layers=28, num_key_value_heads=8, rms_norm_eps=1e-06,
        rope_scaling=None, rope_theta=1000000, sliding_window=None, tie_word_embeddings=True, use_sliding_window=False,
        vocab_size=151936)),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_build_transformers_tensors(name):
    from model import hf_name
    count, cfg = PUBLISHED[name]
    args = ModelArgs.from_hf(cfg, name)
    with torch.device("meta"):
        ours = Transformer(args)
        theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    assert sum(p.numel() for p in ours.parameters()) == count == sum(p.numel() for p in theirs.parameters())
    shapes = {n: tuple(t.shape) for n, t in theirs.state_dict().items() if n != "lm_head.weight"}
    assert {hf_name(n): tuple(t.shape) for n, t in ours.state_dict().items() if n != "output.weight"} == shapes
    assert ModelArgs.from_hf(args.to_hf()) == args  # and what a save writes reads back the same
    if args.rope_scaling:  # Llama 3.2's own RoPE numbers (theta 500000, factor 32 over 8192 positions)
        from model import rope_frequencies
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](theirs.config, "cpu")
        assert torch.equal(rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling), inv_freq)


# --- what is refused, by name ------------------------------------------------------------------

@pytest.fixture
def qwen2_folder(tmp_path):
    family_model("qwen2", False).save_pretrained(tmp_path)
    return tmp_path


def test_qwen_sliding_window_is_refused(qwen2_folder):
    _edit_config(qwen2_folder, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(ValueError, match=re.escape(str(qwen2_folder / "config.json")) + r": use_sliding_window = true"):
        load_model(qwen2_folder)
    _edit_config(qwen2_folder, use_sliding_window=False, layer_types=["full_attention", "sliding_attention", "full_attention"])
    with pytest.raises(ValueError, match="layer_types"):
        load_model(qwen2_folder)


@pytest.mark.parametrize("model_type", ["gemma2", "phi3", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_other_families_are_refused_by_model_type(qwen2_folder, model_type):
    _edit_config(qwen2_folder, model_type=model_type)
    with pytest.raises(ValueError, match=f"model_type '{model_type}' is not supported"):
        load_model(qwen2_folder)


@pytest.mark.parametrize("field", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("rope_type", ["yarn", "linear", "dynamic", "longrope"])
def test_other_rope_types_are_refused_by_name(tmp_path, field, rope_type):
    family_model("llama3", False).save_pretrained(tmp_path)
    _edit_config(tmp_path, rope_parameters=None, rope_scaling=None)
    _edit_config(tmp_path, **{field: {"rope_type": rope_type, "factor": 4.0, "rope_theta": 10000.0}})
    with pytest.raises(ValueError, match=f"{field} has rope_type '{rope_type}'"):
        load_model(tmp_path)


@pytest.mark.parametrize("change,field", [(dict(attention_bias=True), "attention_bias"), (dict(mlp_bias=True), "mlp_bias"),
                                          (dict(hidden_act="gelu"), "hidden_act"),
                                          (dict(partial_rotary_factor=0.5), "partial_rotary_factor")])
def test_switches_this_file_does_not_build_are_refused(tmp_path, change, field):
    family_model("llama3", False).save_pretrained(tmp_path)
    _edit_config(tmp_path, **change)
    with pytest.raises(ValueError, match=f"config.json: {field} = "):
        load_model(tmp_path)


def test_llama3_rope_needs_its_numbers(tmp_path):
    family_model("llama3", False).save_pretrained(tmp_path)
    _edit_config(tmp_path, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0})
    with pytest.raises(ValueError, match="rope_parameters \\(rope_type 'llama3'\\) needs a positive number 'high_freq_factor'"):
        load_model(tmp_path)


def test_args_that_disagree_with_their_model_type_are_not_saved(tmp_path):
    """A qwen2 config without biases would load in transformers with randomly initialised ones."""
    for args in (ModelArgs(**_args(sliding_window=None), model_type="qwen2"),
                 ModelArgs(**_args(sliding_window=None), model_type="llama", qk_norm=True),
                 ModelArgs(**_args(sliding_window=8), model_type="qwen3", qk_norm=True)):
        with pytest.raises(ValueError, match="model_type"):
            save_model(Transformer(args), tmp_path)


# --- the real SmolLM2-135M-Instruct (dequantised from a 4-bit GGUF) -----------------------------

def test_smollm2_matches_transformers_and_exports_tied(smollm2_dir, tmp_path, one_thread):
    from safetensors import safe_open
    from sample import generate
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ours = load_model(smollm2_dir)
    assert ours.args.model_type == "llama" and ours.args.tie_embeddings and ours.args.n_layers == 30
    x = torch.randint(0, ours.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf_logits(ref, x)
        assert (ours(x) - want).abs().max() / want.abs().max() < 1e-4
        prompt = x[0].tolist()
        theirs = ref.generate(x[:1], attention_mask=torch.ones_like(x[:1]), max_new_tokens=8, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, 12:]
    assert generate(ours, [prompt], 8, temperature=0.0) == [theirs.tolist()]
    del ref

    save_model(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(tmp_path / "model.safetensors", framework="pt") as st:
        assert "lm_head.weight" not in st.keys()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert (hf_logits(back, x) - want).abs().max() / want.abs().max() < 1e-4
