"""
The Mistral transformer, written out by hand, the families that share its shape, and their checkpoints.

    from model import ModelArgs, Transformer, PRESETS, load_model, save_model
    model = load_model("path/to/zephyr-7b-sft-full", dtype=torch.bfloat16, device="cuda")
    logits = model(tokens)                        # [B, T, V]
    hidden = model(tokens, return_hidden=True)    # [B, T, d], for space.sequence_logprobs

The architecture (Jiang et al. 2023, "Mistral 7B") in the names of Mistral's own reference:
pre-norm blocks of grouped-query attention with rotary positions and a sliding window,
followed by a SwiGLU feed-forward; RMSNorm everywhere; an untied (or tied) output head.

Today's chat models are the same network with a few switches in ModelArgs, each written where it acts:
  - Llama, Llama 3.x, SmolLM2 (model_type "llama"): no sliding window; Llama 3.1+ rescales the RoPE
    frequencies (rope_scaling, rope_type "llama3"); the 1B and 3B sizes tie the output head.
  - Qwen2, Qwen2.5 ("qwen2"): biases on the q, k and v projections (qkv_bias).
  - Qwen3 ("qwen3"): an RMSNorm over each head of q and k before RoPE (qk_norm), and a head_dim that
    is not dim / n_heads.
Other families (Gemma, Phi, mixture-of-experts, ...), other RoPE scalings and Qwen's per-layer sliding
windows are refused by name when the config is read.

Checkpoints: Hugging Face folders (config.json + model.safetensors, or shards listed in
model.safetensors.index.json; model_type "mistral", "llama", "qwen2" or "qwen3") and Mistral's native
folders (params.json + consolidated.safetensors) load; save_model writes the Hugging Face layout under
the model's own model_type, in 5 GB shards as transformers does, so a trained model goes straight to
transformers, lm-eval or vLLM. A damaged file (truncated, not safetensors, JSON that does not parse) is
reported with its path and the reason. This file needs only torch and safetensors.
"""
import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# The Hugging Face families this file reproduces: the class transformers builds for each model_type,
# and the switches that model_type implies (q/k/v biases, q/k norms). Everything else is the same network.
FAMILIES = {
    "mistral": dict(architecture="MistralForCausalLM", qkv_bias=False, qk_norm=False),
    "llama": dict(architecture="LlamaForCausalLM", qkv_bias=False, qk_norm=False),
    "qwen2": dict(architecture="Qwen2ForCausalLM", qkv_bias=True, qk_norm=False),
    "qwen3": dict(architecture="Qwen3ForCausalLM", qkv_bias=False, qk_norm=True),
}
LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128                 # Mistral, Llama, Qwen2: dim / n_heads; Qwen3 sets its own
    hidden_dim: int = 14336
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # Llama 3.x's rope_type "llama3": the four LLAMA3_ROPE numbers
    sliding_window: int | None = 4096   # a token sees itself and the W-1 tokens before it; None = full causal
    max_seq_len: int = 32768            # longest sequence the sampler's KV cache may hold
    tie_embeddings: bool = False        # output.weight is tok_embeddings.weight
    qkv_bias: bool = False              # Qwen2: wq, wk and wv have biases (wo does not)
    qk_norm: bool = False               # Qwen3: RMSNorm over each head of q and of k, before RoPE
    model_type: str = "mistral"         # a key of FAMILIES: the config.json a save writes
    bos_id: int = 1
    eos_id: int = 2

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        """Read a transformers config.json of one of FAMILIES (transformers 4.x or 5.x spelling)."""
        model_type = cfg.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported (expected one of "
                             f"{', '.join(repr(k) for k in FAMILIES)})")

        def need(key):
            if key not in cfg:
                raise ValueError(f"{source}: required field {key!r} is missing")
            return cfg[key]

        # switches of transformers' classes that change the network and that this file does not build
        # (Qwen2's class has its q/k/v biases whatever attention_bias says, and none on o_proj)
        refused = {"hidden_act": lambda v: v not in (None, "silu"), "mlp_bias": bool,
                   "attention_bias": lambda v: bool(v) and model_type != "qwen2",
                   "use_sliding_window": bool, "partial_rotary_factor": lambda v: v not in (None, 1, 1.0),
                   "layer_types": lambda v: any(x != "full_attention" for x in v or [])}
        for key, unsupported in refused.items():
            if unsupported(cfg.get(key)):
                raise ValueError(f"{source}: {key} = {json.dumps(cfg[key])} is not supported for model_type "
                                 f"{model_type!r}" + (" (Qwen's per-layer sliding windows; the published Qwen2.5 "
                                                      "and Qwen3 models have it false)" if key == "use_sliding_window" else ""))
        dim, n_heads = need("hidden_size"), need("num_attention_heads")
        rope_theta, rope_scaling = _read_rope(cfg, source)
        # transformers' Qwen3Config defaults head_dim to 128 whatever dim / n_heads is; the others derive it
        head_dim = cfg.get("head_dim") or (128 if model_type == "qwen3" else dim // n_heads)
        return cls(
            dim=dim,
            n_layers=need("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            hidden_dim=need("intermediate_size"),
            vocab_size=need("vocab_size"),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            sliding_window=cfg.get("sliding_window") if model_type == "mistral" else None,
            max_seq_len=cfg.get("max_position_embeddings", 32768),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=FAMILIES[model_type]["qkv_bias"],
            qk_norm=FAMILIES[model_type]["qk_norm"],
            model_type=model_type,
            bos_id=_token_id(cfg, "bos_token_id", 1),
            eos_id=_token_id(cfg, "eos_token_id", 2),
        )

    @classmethod
    def from_mistral(cls, params: dict, source: str = "params.json") -> "ModelArgs":
        """Read Mistral's native params.json."""
        try:
            return cls(
                dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                n_kv_heads=params.get("n_kv_heads", params["n_heads"]),
                head_dim=params.get("head_dim", params["dim"] // params["n_heads"]),
                hidden_dim=params["hidden_dim"], vocab_size=params["vocab_size"],
                norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
                sliding_window=params.get("sliding_window"),
                tie_embeddings=params.get("tied_embeddings", False),
            )
        except KeyError as e:
            raise ValueError(f"{source}: required field {e.args[0]!r} is missing") from None

    def to_hf(self) -> dict:
        """A config.json that transformers loads unchanged as this model_type's class (MistralForCausalLM,
        LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM), in both transformers 4.x and 5.x spellings."""
        family = FAMILIES.get(self.model_type)
        if family is None:
            raise ValueError(f"model_type {self.model_type!r} has no Hugging Face class here (one of {', '.join(FAMILIES)})")
        # the config names the class; the class decides the network. Switches that disagree with it
        # would give a checkpoint that transformers loads into another network, silently.
        for key in ("qkv_bias", "qk_norm"):
            if getattr(self, key) != family[key]:
                raise ValueError(f"model_type {self.model_type!r} has {key}={family[key]}, these args say {getattr(self, key)}")
        if self.sliding_window is not None and self.model_type != "mistral":
            raise ValueError(f"model_type {self.model_type!r} has no sliding window; set sliding_window=None")
        rope = {"rope_type": "llama3" if self.rope_scaling else "default", "rope_theta": self.rope_theta,
                **(self.rope_scaling or {})}
        cfg = {
            "architectures": [family["architecture"]],
            "model_type": self.model_type,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,  # 4.x reads rope_theta and rope_scaling, 5.x rope_parameters
            "rope_scaling": dict(rope) if self.rope_scaling else None,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "torch_dtype": "float32",
        }
        if self.model_type == "mistral":
            cfg["sliding_window"] = self.sliding_window
        if self.model_type in ("llama", "qwen3"):
            cfg["attention_bias"] = False  # both classes can put biases on all four projections; not these
        if self.model_type == "llama":
            cfg["mlp_bias"] = False
        if self.model_type in ("qwen2", "qwen3"):
            cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.n_layers)
        return cfg


def _read_rope(cfg: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, Llama 3's scaling or None). transformers 5 writes rope_parameters (theta inside);
    4.x writes rope_theta and rope_scaling at the top level, with the type under "rope_type" or "type"."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    field = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"{source}: {field} has rope_type {rope_type!r}, which is not supported "
                         "(only 'default' and Llama 3's 'llama3')")
    scaling = {}
    for key in LLAMA3_ROPE:
        # as transformers: a top-level original_max_position_embeddings wins, else max_position_embeddings
        if key == "original_max_position_embeddings":
            value = cfg.get(key, rope.get(key, cfg.get("max_position_embeddings")))
        else:
            value = rope.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{source}: {field} (rope_type 'llama3') needs a positive number {key!r}, got {value!r}")
        scaling[key] = value
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"{source}: {field} needs high_freq_factor > low_freq_factor, got "
                         f"{scaling['high_freq_factor']} and {scaling['low_freq_factor']}")
    return theta, scaling


def _token_id(cfg: dict, key: str, default: int) -> int:
    x = cfg.get(key)
    if x is None:
        return default
    # Llama 3 lists several EOS ids ([128001, 128008, 128009]); the first is kept here. Which ids end a
    # turn when generating is the tokenizer's and generation_config.json's business, not the network's.
    return x[0] if isinstance(x, list) else x


PRESETS = {
    "mistral-7b": ModelArgs(),  # Mistral-7B-v0.1, also zephyr-7b-sft-full: 7,241,732,096 parameters
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=176,
                      vocab_size=512, sliding_window=16, max_seq_len=512),
}


# -----------------------------------------------------------------------------
# The network

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 island: the mean of squares of bf16 activations loses too much precision
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """The rotary inverse frequencies θ^(-2i/hd), i < hd/2, in fp32 as transformers computes them, and
    with Llama 3's scaling (Meta's Llama 3.1 release, transformers' rope_type "llama3") when given.

    Llama 3.1 stretched Llama 3's 8k context to 128k by rescaling each frequency by its wavelength
    2π/f, measured against the pretraining context L = original_max_position_embeddings:
      - wavelength < L / high_freq_factor: unchanged. These turned many times within the pretraining
        context, so the model knows every angle they take.
      - wavelength > L / low_freq_factor: scaled, f / factor (position interpolation). These never
        completed a turn in pretraining; slowed down, positions up to factor × L stay in angles it saw.
      - in between: interpolated, a blend (1 - s) f / factor + s f with s = (L / wavelength - low) /
        (high - low), running from scaled at one edge to unchanged at the other."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)  # [hd/2]
    if scaling is None:
        return inv_freq
    factor, low, high, L = (scaling[k] for k in LLAMA3_ROPE)
    wavelength = 2 * math.pi / inv_freq
    s = (L / wavelength - low) / (high - low)
    blend = (1 - s) * inv_freq / factor + s * inv_freq
    return torch.where(wavelength < L / high, inv_freq, torch.where(wavelength > L / low, inv_freq / factor, blend))


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float, scaling: dict | None = None):
    """cos and sin of the rotary angles for each position: [..., T] -> two [..., T, head_dim/2] in fp32."""
    inv_freq = rope_frequencies(head_dim, theta, scaling, positions.device)
    angles = positions.float()[..., None] * inv_freq  # fp32: positions up to 32k times a frequency need the mantissa
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x [B, H, T, hd] in the "rotate-half" layout (the pair of channel i is channel i + hd/2).
    This is the layout of Hugging Face checkpoints; Mistral's native checkpoints interleave the pairs
    (2i, 2i+1) and are permuted once at load time instead (see _mistral_to_ours)."""
    cos = cos[:, None] if cos.dim() == 3 else cos  # [B, 1, T, hd/2], or [T, hd/2] shared by every row
    sin = sin[:, None] if sin.dim() == 3 else sin
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.type_as(x)


def attend_one(q, k, v, mask):
    """Attention of one query per row, q [B, H, 1, hd], over k, v [B, n_kv, S, hd]; mask [B, 1, 1, S]
    (True: visible) or None (every key). What F.scaled_dot_product_attention computes, in fp32 as it
    does, as two plain products: each group of H / n_kv query heads against its shared key head. In
    bf16 on a CPU, torch 2.13's SDPA kernel takes twice as long at this shape, which is every decode
    step of sampling. Not on a GPU: there SDPA's decode kernels read the bf16 cache once, where this
    would copy it to fp32 every step (not measured: no GPU run yet)."""
    B, H, _, hd = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    scores = q.float().view(B, n_kv, H // n_kv, hd) @ k.float().transpose(-1, -2) * hd ** -0.5  # [B, n_kv, H/n_kv, S]
    scores = scores.view(B, H, 1, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1).view(B, n_kv, H // n_kv, S)
    return (probs @ v.float()).to(q.dtype).view(B, H, 1, hd)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.qk_norm = args.qk_norm
        if args.qk_norm:  # Qwen3: one gain per channel of a head, shared by all heads
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)     # [B, T, H, hd]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, n_kv, hd]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            # each head's q and k normalised, which bounds the attention logits; before RoPE, as Qwen3
            # was trained (the per-channel gains do not commute with the rotation)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)              # [B, H or n_kv, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # the cache stores this step's keys and values and returns every key and value so far
            k, v = cache.update(self.layer_id, k, v)                               # [B, n_kv, S, hd]
        # mask None means plain causal attention over T; otherwise True marks the keys a query may see
        if T == 1 and q.device.type == "cpu":  # a decode step on a CPU: one query per row against the cache
            y = attend_one(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, cache=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """True where query position q may attend key position k: k <= q and, with a sliding window W,
    q - k < W (the token itself and the W-1 before it, the convention of transformers' Mistral)."""
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    allowed = diff >= 0
    if window is not None:
        allowed = allowed & (diff < window)
    return allowed


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
            # load_state_dict(assign=True) puts a new parameter under each name on its own, which unties
            # the head. Every path that builds a model on the meta device loads that way: load_model,
            # parallel.frozen_copy, and FSDP2's broadcast from rank 0 (set_model_state_dict), where an
            # untied head would be a stray parameter FSDP does not manage. So tie again after any load.
            self.register_load_state_dict_post_hook(lambda module, incompatible: module._tie())

    def _tie(self):
        self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens, positions=None, mask=None, cache=None, return_hidden=False):
        """tokens [B, T] -> logits [B, T, V], or the final normed hidden states [B, T, d].

        Training calls it with tokens alone: positions 0..T-1, causal attention with the sliding
        window. The sampler passes per-row positions [B, T] (left-padded prompts start at 0 at
        their first real token), a boolean mask [B, 1, T, S] over the cache's S slots, and the cache.
        """
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device)
            window = self.args.sliding_window
            if mask is None and window is not None and window < T:
                mask = causal_mask(positions, positions, window)  # [T, T]; plain causal is the fast path
        cos, sin = rope_angles(positions, self.args.head_dim, self.args.rope_theta, self.args.rope_scaling)
        h = self.tok_embeddings(tokens)  # [B, T, d]
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
        h = self.norm(h)
        return h if return_hidden else self.output(h)

    def init_weights(self, seed: int | None = None, std: float = 0.02):
        """Random initialisation for a model trained from scratch (the demo); scaled residual outputs."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.data.fill_(1.0)
            elif name.endswith(".bias"):
                p.data.zero_()
            else:
                s = std / math.sqrt(2 * self.args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else std
                p.data.copy_(torch.randn(p.shape, generator=g) * s)
        return self


# -----------------------------------------------------------------------------
# Checkpoints

# Hugging Face names for our (Mistral's) parameter names, per layer and at the top
_HF_LAYER = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attention.q_norm": "self_attn.q_norm", "attention.k_norm": "self_attn.k_norm",  # Qwen3
}
_HF_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
# transformers' names: one file, or shards model-00001-of-00003.safetensors ... listed in the index
INDEX_NAME = "model.safetensors.index.json"
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


def hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face name, e.g. layers.3.attention.wq.weight -> model.layers.3.self_attn.q_proj.weight"""
    base, suffix = name.rsplit(".", 1)
    if base.startswith("layers."):
        _, i, rest = base.split(".", 2)
        return f"model.layers.{i}.{_HF_LAYER[rest]}.{suffix}"
    return f"{_HF_TOP[base]}.{suffix}"


def _interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Mistral's native wq/wk rows pair channels (2i, 2i+1) of each head for RoPE; ours pair (i, i+hd/2).
    Reorder the rows of each head: [hd/2 pairs, 2] -> [2, hd/2 pairs]."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _read_json(path) -> dict:
    """A JSON object from a checkpoint folder; a file that does not parse is named with the line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_safetensors(files, rename, dtype, device):
    """Yield (file, our name, its name in the file, tensor) from safetensors files, one tensor at a time, so that casting a 7B
    checkpoint to another dtype never holds two copies of it."""
    from safetensors import SafetensorError, safe_open
    for f in files:
        # safetensors' own messages ("incomplete metadata, file not fully covered") do not say which
        # file of a sharded checkpoint is bad; the header is parsed and checked against the file size
        # when it is opened, so that is where a truncated or foreign file shows up
        try:
            st = safe_open(f, framework="pt", device="cpu")
        except SafetensorError as e:
            raise ValueError(f"{f}: not a readable safetensors file ({e}); a truncated file, as an interrupted "
                             "copy or download leaves it, or a file in another format reads this way") from None
        except OSError as e:
            raise OSError(f"{f}: cannot read the file ({e})") from None
        with st:
            for key in st.keys():
                name = rename(key)
                yield f, name, key, st.get_tensor(key).to(device=device, dtype=dtype)


def load_model(path, dtype=torch.float32, device="cpu") -> Transformer:
    """Load a Hugging Face or a Mistral-native checkpoint folder into a Transformer.

    The model is built on the meta device and the tensors are assigned into it, so no memory is
    spent on a random initialisation that would be overwritten."""
    path = str(path)
    if os.path.exists(os.path.join(path, "config.json")):
        src = os.path.join(path, "config.json")
        args = ModelArgs.from_hf(_read_json(src), src)
        index = os.path.join(path, INDEX_NAME)
        if os.path.exists(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
            files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
        else:
            files = [os.path.join(path, "model.safetensors")]
        ours = {hf_name(n): n for n in _param_names(args)}
        rename = lambda key: ours.get(key, key)
        permute = None
    elif os.path.exists(os.path.join(path, "params.json")):
        src = os.path.join(path, "params.json")
        args = ModelArgs.from_mistral(_read_json(src), src)
        files = [os.path.join(path, "consolidated.safetensors")]
        rename = lambda key: key
        permute = {"wq": args.n_heads, "wk": args.n_kv_heads}
    else:
        raise FileNotFoundError(f"{path}: no config.json (Hugging Face) or params.json (Mistral) in this folder")
    for f in files:
        if not os.path.exists(f):
            raise FileNotFoundError(f"{f}: checkpoint file is missing")

    with torch.device("meta"):
        model = Transformer(args)
    expected = {n: p.shape for n, p in model.named_parameters()}  # tied weights appear once, as tok_embeddings
    state = {}
    for file, name, key, t in _read_safetensors(files, rename, dtype, device):
        if args.tie_embeddings and name == "output.weight":
            continue  # a tied checkpoint may still carry lm_head; the embedding is the one used
        if name not in expected:
            raise ValueError(f"{file}: unexpected tensor {key!r} (not part of a {args.model_type} model with this config)")
        if permute and name.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = _interleaved_to_half(t, permute[name.split(".")[-2]])
        if t.shape != expected[name]:
            raise ValueError(f"{file}: tensor {key!r} has shape {tuple(t.shape)}, the config says {tuple(expected[name])}")
        state[name] = t
    missing = [n for n in expected if n not in state]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{path}: missing tensors: {shown}")
    model.load_state_dict(state, assign=True, strict=not args.tie_embeddings)  # ties the head again (Transformer)
    return model


def _param_names(args: ModelArgs):
    with torch.device("meta"):
        return [n for n, _ in Transformer(args).named_parameters()] + (["output.weight"] if args.tie_embeddings else [])


_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
    """Bytes in a shard size: an int, or a string such as "5GB", "500MB" or "2GiB". As in transformers,
    KB/MB/GB/TB are powers of 1000 and KiB/MiB/GiB/TiB powers of 1024."""
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", size, re.IGNORECASE)
        if m is None:
            raise ValueError(f"max_shard_size {size!r}: expected bytes or a number with KB, MB, GB, TB (or KiB, MiB, ...)")
        size = float(m[1]) * _SIZE_UNITS[m[2].upper()] if m[2] else float(m[1])
    if isinstance(size, bool) or not isinstance(size, (int, float)) or int(size) < 1:
        raise ValueError(f"max_shard_size must be a positive number of bytes, got {size!r}")
    return int(size)


def save_model(model: Transformer, path, state_dict: dict | None = None, max_shard_size="5GB"):
    """Write the Hugging Face layout: config.json + model.safetensors, or, when the tensors exceed
    max_shard_size, shards model-0000k-of-0000n.safetensors + model.safetensors.index.json (tied heads
    stored once). state_dict lets a distributed trainer pass a gathered full state dict instead of the
    module's. Weight files of an earlier save into the same folder are removed first, so a folder
    never holds two layouts (the index would win, pointing at stale shards)."""
    from safetensors.torch import save_file
    max_bytes = parse_size(max_shard_size)
    os.makedirs(path, exist_ok=True)
    args = model.args
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {hf_name(n): t.detach() for n, t in state.items() if not (args.tie_embeddings and n == "output.weight")}
    dtypes = {t.dtype for t in tensors.values()}
    cfg = args.to_hf()
    cfg["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"

    # Fill shards in the model's own order (embedding, layer 0, 1, ..., norm, head), so a layer's
    # tensors sit together and the same model always gives the same files. A tensor is never split:
    # one larger than max_bytes gets a shard of its own, as in transformers.
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes

    for f in os.listdir(path):
        if f == INDEX_NAME or _WEIGHT_FILE.fullmatch(f):
            os.remove(os.path.join(path, f))
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    for shard, file in zip(shards, names):  # one shard at a time on the host, however large the model
        save_file({k: t.contiguous().cpu() for k, t in shard.items()}, os.path.join(path, file), metadata={"format": "pt"})
    if len(shards) > 1:  # the index last: it never names a shard that is not written yet
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: file for shard, file in zip(shards, names) for k in shard}}
        with open(os.path.join(path, INDEX_NAME), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
