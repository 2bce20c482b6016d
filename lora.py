"""
LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen linear layer
plus a trainable low-rank update, merged back into the weights at the end of each self-play iteration,
and saved in PEFT's adapter format so PEFT and vLLM load what train.py trained.

    from lora import add_lora, adapter_state, merge_weights, save_adapter
    add_lora(model, r=16, alpha=32, dropout=0.0, targets=ALL_TARGETS, seed=0, iteration=t)
    ...train: only the adapters require grad...
    adapters = adapter_state(model)                           # {"layers.0.attention.wq.lora_a": [r, in], ...}
    merge_weights(master, adapters, alpha / r)               # θ_t becomes θ_{t+1} = θ_t + (α/r) B A, in fp32
    save_adapter("OUT/iter_1/adapter", adapters, r, alpha, targets, base_model_name_or_path="/abs/OUT/iter_0")

The layer (eq. 3 of the paper): y = x W^T + b + (α/r) · dropout(x) A^T B^T, with W [out, in] and b
frozen, A = lora_a [r, in] random and B = lora_b [out, r] zero at the start, so a fresh adapter
leaves the model exactly as it was. α/r keeps the update's size independent of r when α is scaled
with it (the default α = 2r of train.py).

Why a file of its own beside model.py: model.py is the architecture and its checkpoints, copied into
other projects with torch and safetensors alone, and its Linear layers stay plain nn.Linear. The
adapter is a training-time idea that wraps those layers from outside (as PEFT does), and brings
what a plain model never needs: seeded generators, the merge, PEFT's file format.

Randomness: A's initialisation and the dropout masks never draw from the global RNG. A comes from a
torch.Generator seeded by (seed, iteration, layer, target); a dropout mask is a hash of (seed,
iteration, step, the sequence's number in the data, the module, the position, the channel). So the
same sequence gets the same mask whichever rank, micro-batch or padded length it lands in (a resumed
run and a run on any number of ranks are the same run), and activation checkpointing's recompute,
which runs the forward again, computes the very same mask.
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import hf_name

# --lora-targets: our (Mistral's) names, and the module each lives in. Their Hugging Face names, which
# PEFT's target_modules and key names use, come from model.hf_name.
ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
_PARENT = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
           "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}
_WRAPPER = "_checkpoint_wrapped_module."  # activation checkpointing's wrapper, not part of a parameter's name


def parse_targets(text: str, flag: str = "--lora-targets") -> tuple[str, ...]:
    """'wq,wv' or 'wq wv' -> ('wq', 'wv'), in the model's order; an unknown name is an error naming the flag."""
    names = [n for n in text.replace(",", " ").split() if n]
    unknown = [n for n in names if n not in ALL_TARGETS]
    if unknown or not names:
        raise ValueError(f"{flag} {text!r}: expected some of {' '.join(ALL_TARGETS)} "
                         f"(attention wq wk wv wo, feed-forward w1 w2 w3)" + (f"; unknown: {' '.join(unknown)}" if unknown else ""))
    return tuple(n for n in ALL_TARGETS if n in names)


def hf_target(name: str) -> str:
    """wq -> q_proj, w1 -> gate_proj, ...: the module name PEFT's target_modules matches."""
    return hf_name(f"layers.0.{_PARENT[name]}.{name}.weight").split(".")[-2]

# -----------------------------------------------------------------------------
# Counter-based randomness: a 32-bit integer hash on int64 tensors. The multiplier is below 2^27, so
# a 32-bit value times it stays below 2^59 and int64 never overflows, on any device.

_M32 = 0xFFFFFFFF


def _mix(x):
    """A bijective avalanche of 32-bit values (two multiply-xorshift rounds), elementwise on int64 tensors or ints."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def fold(*values) -> int:
    """One 32-bit seed from several non-negative integers: (seed, iteration, step, ...)."""
    h = 0x9E3779B9
    for v in values:
        h = _mix((h + _mix(int(v) & _M32) + (int(v) >> 32)) & _M32)
    return h


def dropout_mask(rows: torch.Tensor, module_key: int, T: int, d: int, p: float, device) -> torch.Tensor:
    """Keep-mask [B, T, d] of dropout with probability p: element (b, t, c) is a hash of (rows[b],
    module_key, t, c), compared with p. rows: one 32-bit key per sequence (row_keys). Position t's
    mask does not depend on T, so padding a sequence further does not change it. It costs a few int64
    temporaries of the input's size per adapted layer, which is why --lora-dropout defaults to 0."""
    rows = rows.to(device=device, dtype=torch.int64)
    base = _mix((rows * 0x2545F491 + module_key) & _M32)           # [B], one stream per (sequence, module)
    idx = torch.arange(T * d, device=device, dtype=torch.int64)    # [T*d] = t * d + c
    h = _mix(_mix((base[:, None] + idx) & _M32) ^ base[:, None])   # [B, T*d], 32 random bits each
    u = (h >> 8).to(torch.float32) / 2**24                         # 24 bits: exact in fp32, in [0, 1)
    return (u >= p).view(-1, T, d)


def row_keys(seed: int, iteration: int, step: int, ids) -> torch.Tensor:
    """The dropout key of each sequence of a micro-batch: ids are the sequences' numbers in the
    iteration's data (not their slot in the batch), so the key does not depend on the rank count."""
    return torch.tensor([fold(seed, iteration, step, i) for i in ids], dtype=torch.int64)

# -----------------------------------------------------------------------------
# The layer


class LoRALinear(nn.Module):
    """A frozen nn.Linear's weight (and bias) plus the trainable low-rank update (α/r) B A.

    The base keeps its dtype (bf16 with --bf16: the memory LoRA exists to save); lora_a and lora_b are
    fp32 (float64 over a float64 base), the optimizer's only parameters. The state dict keeps the
    base's names (`...wq.weight`), so a checkpoint of the base loads into the wrapped model unchanged."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, key: int = 0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.scale, self.p = r, alpha, alpha / r, dropout
        self.key = key  # this module's stream of dropout masks
        self.rows = None  # [B] dropout keys of the current micro-batch's sequences (set_dropout_rows)
        # fp32 over a bf16 (or fp32) base; float64 over a float64 one (the tests' exact comparisons)
        kw = dict(device=base.weight.device, dtype=torch.promote_types(base.weight.dtype, torch.float32))
        self.lora_a = nn.Parameter(torch.zeros(r, self.in_features, **kw))   # [r, in], initialised by add_lora
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, r, **kw))  # [out, r]: zero, a fresh adapter is a no-op

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.p > 0 and self.training:
            if self.rows is None or len(self.rows) != x.shape[0]:
                raise RuntimeError("LoRA dropout needs each sequence's key: call lora.set_dropout_rows(model, keys) "
                                   "with one key per row before the forward pass")
            keep = dropout_mask(self.rows, self.key, x.shape[1], x.shape[2], self.p, x.device)
            x = x * keep.to(x.dtype) / (1 - self.p)
        if x.dtype != self.lora_a.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_a.dtype)  # a bf16 base outside autocast: the adapter's path in its own fp32
        return y + (self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)).to(y.dtype)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, dropout={self.p}"


def lora_modules(model) -> dict:
    """{'layers.3.attention.wq': LoRALinear, ...} in the model's order, under our names (activation
    checkpointing's wrapper removed from them)."""
    return {name.replace(_WRAPPER, ""): m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model, r: int, alpha: float, dropout: float = 0.0, targets=ALL_TARGETS, seed: int = 0, iteration: int = 0):
    """Replace the targeted linear layers of every block by LoRALinear, freeze everything else, and
    initialise the adapters (init_adapters). In place; returns the model."""
    if r < 1:
        raise ValueError(f"LoRA rank {r} (--lora): must be at least 1")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout {dropout} (--lora-dropout): must be in [0, 1)")
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; merge them (merge_lora) before adding new ones")
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        clean = name.replace(_WRAPPER, "")
        parts = clean.split(".")
        if len(parts) == 4 and parts[0] == "layers" and parts[3] in targets and parts[2] == _PARENT[parts[3]]:
            if not isinstance(module, nn.Linear):
                raise TypeError(f"{clean}: expected an nn.Linear to adapt, found {type(module).__name__}")
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            key = fold(int(parts[1]), ALL_TARGETS.index(parts[3]))
            setattr(parent, parts[3], LoRALinear(module, r, alpha, dropout, key))
    init_adapters(model, seed, iteration)
    return model


def init_adapters(model, seed: int, iteration: int):
    """A fresh adapter for iteration t: B = 0 and A uniform in ±1/sqrt(in) (kaiming_uniform with
    a = sqrt(5), the initialisation of nn.Linear, PEFT and torchtune), drawn on the CPU from a generator
    seeded by (seed, iteration, module), whatever the device, the module order or the sharding."""
    for m in lora_modules(model).values():
        g = torch.Generator().manual_seed(fold(seed, iteration, m.key))
        bound = 1 / math.sqrt(m.in_features)
        a = (torch.rand(m.r, m.in_features, generator=g, dtype=torch.float64) * 2 - 1) * bound
        with torch.no_grad():
            _assign(m.lora_a, a)
            _assign(m.lora_b, torch.zeros(m.lora_b.shape))


def _assign(param, full: torch.Tensor):
    """Copy a full tensor into a parameter, or into this rank's shard of it under FSDP2 (a DTensor)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        # every rank drew the same full tensor from the same seed: each keeps its slice, no communication
        full = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full)


def set_dropout_rows(model, keys: torch.Tensor | None):
    """Tell every adapter the dropout keys of the next micro-batch's sequences (row_keys). They stay
    set through backward, where activation checkpointing runs the forward again with the same masks."""
    for m in lora_modules(model).values():
        m.rows = keys


# -----------------------------------------------------------------------------
# Merging


def adapter_state(model) -> dict:
    """{'layers.0.attention.wq.lora_a': [r, in], '...lora_b': [out, r], ...}: the adapters, whole
    (gathered from their shards under FSDP2), in their own dtype (fp32) on the CPU."""
    out = {}
    for name, m in lora_modules(model).items():
        for part in ("lora_a", "lora_b"):
            t = getattr(m, part).detach()
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            out[f"{name}.{part}"] = t.to("cpu", copy=True)
    return out


def merge_weights(weights: dict, adapters: dict, scale: float) -> dict:
    """θ_t + (α/r) B A, in place: each adapted weight W of the state dict (our names) becomes
    W + scale · B @ A, computed and stored in fp32; returns the same dict, now θ_{t+1}. In place because
    at 7B θ_t and θ_{t+1} side by side would take 58 GB of host memory instead of 29. Pass the fp32
    master: merged into a bf16 copy, an iteration's update (far below bf16's step of 0.4-0.8% of |W|
    at the papers' learning rates) would round away."""
    for key in adapters:
        if not key.endswith(".lora_a"):
            continue
        module = key.removesuffix(".lora_a")
        w = weights[f"{module}.weight"]
        if w.dtype != torch.float32 and w.dtype != torch.float64:
            raise ValueError(f"{module}.weight is {w.dtype}: merge into the fp32 master of the weights, not a {w.dtype} copy")
        a, b = adapters[key].to(w.device, w.dtype), adapters[f"{module}.lora_b"].to(w.device, w.dtype)
        w.add_(b @ a, alpha=scale)
    return weights


def merge_lora(model):
    """Fold every adapter into its layer's weight (W + (α/r) B A, computed in fp32 or wider) and put the
    plain nn.Linear back: the model is then an ordinary Transformer again (as PEFT's merge_and_unload).
    For a model on one device; the training loop merges into its fp32 master with merge_weights."""
    for name, m in list(lora_modules(model).items()):
        dtype = torch.promote_types(m.weight.dtype, torch.float32)
        with torch.no_grad():
            w = m.weight.to(dtype) + m.scale * (m.lora_b.to(dtype) @ m.lora_a.to(dtype))
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight = nn.Parameter(w.to(m.weight.dtype), requires_grad=False)
        if m.bias is not None:
            linear.bias = m.bias
        holder = next(mod for n, mod in model.named_modules() if n.replace(_WRAPPER, "") == name.rsplit(".", 1)[0])
        setattr(holder, name.rsplit(".", 1)[1], linear)
    return model

# -----------------------------------------------------------------------------
# PEFT's adapter format (what PeftModel.from_pretrained and vLLM's LoRA loader read)


def peft_key(name: str) -> str:
    """layers.3.attention.wq.lora_a -> base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"""
    module, part = name.rsplit(".", 1)
    hf = hf_name(f"{module}.weight").removesuffix(".weight")
    return f"base_model.model.{hf}.{'lora_A' if part == 'lora_a' else 'lora_B'}.weight"


def save_adapter(folder, adapters: dict, r: int, alpha: float, targets, base_model_name_or_path: str,
                 dropout: float = 0.0):
    """adapter_config.json and adapter_model.safetensors (fp32) in PEFT's format. base_model_name_or_path
    is where the weights the adapter was trained on live (for train.py: the absolute path of OUT/iter_t)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    alpha = int(alpha) if float(alpha).is_integer() else alpha  # PEFT writes an int; a float is read as well
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": [hf_target(t) for t in targets], "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "inference_mode": True, "base_model_name_or_path": base_model_name_or_path,
    }
    tensors = {peft_key(k): t.detach().to("cpu", torch.float32).contiguous() for k, t in adapters.items()}
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
