"""lora.py against PEFT (the peer: same weights, same forward, same gradients, same merge, and our saved
adapter loaded by PeftModel.from_pretrained), plus what PEFT has no counterpart for: the fp32 merge of the
training loop against a float64 recomputation, and the seeded dropout (the same mask for a sequence
wherever it lands, and under activation checkpointing's recompute). Then train.py --lora end to end on
the smoke preset: PEFT stacks each saved adapter on the previous export and gets the next, every export
is the previous plus (α/r) B A recomputed in float64, a run stopped mid-iteration resumes bit-identically,
and 2 processes give the losses of 1."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from conftest import ROOT
import lora
import train
from lora import (ALL_TARGETS, LoRALinear, adapter_state, add_lora, dropout_mask, hf_target, init_adapters,
                  lora_modules, merge_lora, merge_weights, parse_targets, peft_key, row_keys, save_adapter,
                  set_dropout_rows)
from model import ModelArgs, Transformer, hf_name, load_model, save_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# GQA and a sliding window of 8 inside sequences of 24, every weight random (norm gains too)
ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=160, vocab_size=300,
            sliding_window=8, max_seq_len=256, rope_theta=5000.0)


def random_model(seed=0, **kw):
    m = Transformer(ModelArgs(**{**ARGS, **kw})).init_weights(seed, std=0.08)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return m


def randomise_b(model, seed=1, std=0.05):
    """Training moves B off zero; the comparisons need it non-zero or the adapter is invisible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g, dtype=torch.float64) * std)


def tokens(seed=1, B=3, T=24):
    return torch.randint(0, ARGS["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def peft_twin(ours, tmp_path, targets, r, alpha, dtype):
    """The same base in transformers, wrapped by PEFT with the same LoRA config, our adapters copied in
    under PEFT's key names (so the names are checked too)."""
    save_model(ours, tmp_path / "base", state_dict={k: v for k, v in ours.state_dict().items() if "lora_" not in k})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype).eval()
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=[hf_target(t) for t in targets], lora_dropout=0.0)
    twin = peft.get_peft_model(hf, cfg)
    res = peft.set_peft_model_state_dict(twin, {peft_key(k): v.to(dtype) for k, v in adapter_state(ours).items()})
    assert not res.unexpected_keys
    return twin


@pytest.mark.parametrize("targets", [ALL_TARGETS, ("wq", "wv", "w2")])
def test_forward_and_gradients_match_peft_in_float64(tmp_path, one_thread, targets):
    r, alpha = 4, 8
    ours = add_lora(random_model().double(), r, alpha, targets=targets, seed=3)
    randomise_b(ours)
    assert sorted(lora_modules(ours)) == sorted(f"layers.{i}.{lora._PARENT[t]}.{t}" for i in range(2) for t in targets)
    twin = peft_twin(ours, tmp_path, targets, r, alpha, torch.float64)

    # layer by layer, on the same float64 input: the same numbers
    g = torch.Generator().manual_seed(8)
    for name, m in lora_modules(ours).items():
        theirs = twin.base_model.model.get_submodule(hf_name(f"{name}.weight").removesuffix(".weight"))
        x = torch.randn(2, 5, m.in_features, generator=g, dtype=torch.float64)
        with torch.no_grad():
            assert (m(x) - theirs(x)).abs().max() < 1e-12, name

    # the whole model: model.py keeps RoPE and RMSNorm in fp32 islands, so the two models agree to
    # ~1e-7 even in float64; the adapters move the logits by far more than that
    x = tokens()
    weights = torch.randn(3, 24, ARGS["vocab_size"], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ours_logits = ours(x)
    twin_logits = twin(input_ids=x).logits
    with torch.no_grad(), twin.disable_adapter():
        base_logits = twin(input_ids=x).logits
    assert (ours_logits - twin_logits).abs().max() < 1e-5
    assert (ours_logits - base_logits).abs().max() > 1e-2
    (ours_logits * weights).sum().backward()
    (twin_logits * weights).sum().backward()

    # only the adapters get gradients; they equal PEFT's
    for name, p in ours.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    twin_grads = {n.replace(".default", ""): p.grad for n, p in twin.named_parameters() if p.grad is not None}
    assert len(twin_grads) == 2 * 2 * len(targets)
    for name, m in lora_modules(ours).items():
        for part in ("lora_a", "lora_b"):
            ref = twin_grads[peft_key(f"{name}.{part}")]
            got = getattr(m, part).grad
            assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), f"{name}.{part}"


def test_a_layer_with_a_bias_matches_peft_in_float64(one_thread):
    """Qwen2's q/k/v projections carry a bias: it is kept, frozen, and not adapted ("bias": "none")."""
    g = torch.Generator().manual_seed(0)
    holder = torch.nn.Module()
    holder.q_proj = torch.nn.Linear(24, 40, bias=True).double()
    with torch.no_grad():
        holder.q_proj.weight.copy_(torch.randn(40, 24, generator=g, dtype=torch.float64) * 0.2)
        holder.q_proj.bias.copy_(torch.randn(40, generator=g, dtype=torch.float64))
    ours = LoRALinear(holder.q_proj, r=3, alpha=5.0)
    with torch.no_grad():
        ours.lora_a.data = torch.randn(3, 24, generator=g, dtype=torch.float64)
        ours.lora_b.data = torch.randn(40, 3, generator=g, dtype=torch.float64)
    twin = peft.get_peft_model(holder, peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj"]))
    with torch.no_grad():
        twin.base_model.model.q_proj.lora_A["default"].weight.copy_(ours.lora_a)
        twin.base_model.model.q_proj.lora_B["default"].weight.copy_(ours.lora_b)
    x = torch.randn(2, 5, 24, generator=g, dtype=torch.float64)
    assert (ours(x) - twin.base_model.model.q_proj(x)).abs().max() < 1e-12
    assert not ours.weight.requires_grad and not ours.bias.requires_grad


def test_merge_matches_peft_merge_and_unload(tmp_path, one_thread):
    ours = add_lora(random_model().double(), 4, 8, seed=5)
    randomise_b(ours, seed=2)
    twin = peft_twin(ours, tmp_path, ALL_TARGETS, 4, 8, torch.float64)
    x = tokens(seed=3)
    with torch.no_grad():
        before = ours(x)
    merge_lora(ours)
    assert not lora_modules(ours) and type(ours.layers[0].attention.wq) is torch.nn.Linear
    theirs = twin.merge_and_unload().state_dict()
    for name, t in ours.state_dict().items():
        assert (t - theirs[hf_name(name)]).abs().max() < 1e-12, name
    with torch.no_grad():
        assert (ours(x) - before).abs().max() < 1e-10  # the merged model computes what the adapted one did


def test_merge_weights_is_fp32_to_within_its_rounding(one_thread):
    """The loop merges into its fp32 master, in place: each adapted weight is W + (α/r) B A to within
    fp32's rounding of W (checked against float64), every other tensor untouched."""
    model = add_lora(random_model(), 4, 8, targets=("wq", "w3"), seed=1)
    randomise_b(model, seed=4, std=0.02)
    adapters = adapter_state(model)
    master = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    before = {k: v.clone() for k, v in master.items()}
    merged = merge_weights(master, adapters, 8 / 4)
    assert merged is master
    for name, w in before.items():
        if name.endswith(("wq.weight", "w3.weight")):
            module = name.removesuffix(".weight")
            b, a = adapters[f"{module}.lora_b"].double(), adapters[f"{module}.lora_a"].double()
            delta = 2.0 * b @ a
            assert merged[name].dtype == torch.float32
            err = (merged[name].double() - (w.double() + delta)).abs()
            # fp32's rounding of the sum (half an ulp of |W + δ|) and of the r-term product B A
            # (r/2 ulps of (α/r)|B||A|): the standard bound of a dot product, r = 4
            assert (err <= torch.finfo(torch.float32).eps * (w.abs() + 5 * 2.0 * b.abs() @ a.abs())).all(), name
            assert delta.abs().max() > 1e-3  # the update is real, not lost in the rounding
        else:
            assert torch.equal(merged[name], w)
    with pytest.raises(ValueError, match="fp32 master"):
        merge_weights({k: v.bfloat16() for k, v in before.items()}, adapters, 2.0)


@pytest.mark.parametrize("tied", [False, True])
def test_saved_adapter_loads_in_peft_on_the_saved_base(tmp_path, one_thread, tied):
    """save_model(base) + save_adapter: PeftModel.from_pretrained on the base gives the merged model's logits."""
    targets = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    base = random_model(seed=2, tie_embeddings=tied, model_type="llama", sliding_window=None)
    save_model(base, tmp_path / "base")
    ours = add_lora(load_model(tmp_path / "base"), 8, 16, targets=targets, seed=9, iteration=2)
    randomise_b(ours, seed=6)
    adapters = adapter_state(ours)
    save_adapter(tmp_path / "adapter", adapters, 8, 16, targets, base_model_name_or_path=str(tmp_path / "base"))

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "bias", "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "bias": "none",
        "base_model_name_or_path": str(tmp_path / "base")}
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (8, 64)     # [r, in]
    assert saved["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 8)       # [out, r]
    assert saved["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (32, 8)    # GQA: 2 heads x 16
    assert len(saved) == 2 * 2 * len(targets)

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = tokens(seed=4, B=2, T=20)
    with torch.no_grad():
        theirs = loaded(input_ids=x).logits
        merged = merge_lora(ours)(x)
    assert ((theirs - merged).abs().max() / merged.abs().max()) < 1e-5


def test_fresh_adapter_is_a_no_op_and_its_init_is_seeded(one_thread):
    model = random_model()
    x = tokens()
    with torch.no_grad():
        plain = model(x)
    rng = torch.get_rng_state()
    add_lora(model, 4, 8, seed=11, iteration=1)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is never drawn from
    with torch.no_grad():
        assert torch.equal(model(x), plain)  # B = 0: exactly the base
    a = {k: v for k, v in adapter_state(model).items() if k.endswith("lora_a")}
    bound = 1 / 64 ** 0.5
    assert all(v.abs().max() <= bound and v.std() > bound / 3 for k, v in a.items() if "w2" not in k)
    assert len({v.sum().item() for v in a.values()}) == len(a)  # every module its own draw
    again = add_lora(random_model(), 4, 8, seed=11, iteration=1)
    assert all(torch.equal(v, adapter_state(again)[k]) for k, v in a.items())
    init_adapters(again, seed=11, iteration=2)  # the next iteration's fresh adapter differs
    assert not any(torch.equal(v, adapter_state(again)[k]) for k, v in a.items())


def test_dropout_mask_is_a_function_of_the_sequence_not_the_batch():
    p = 0.25
    keys = row_keys(seed=0, iteration=1, step=7, ids=[5, 9, 40, 41])
    m = dropout_mask(keys, module_key=123, T=30, d=64, p=p, device="cpu")
    assert abs(m.float().mean().item() - (1 - p)) < 0.01
    # the same sequence in another micro-batch, at another slot, padded to another length: the same mask
    m2 = dropout_mask(keys[[2, 0]], module_key=123, T=12, d=64, p=p, device="cpu")
    assert torch.equal(m2[1], m[0, :12]) and torch.equal(m2[0], m[2, :12])
    # other sequences, steps and modules draw other masks (agreement near the 62.5% of independent ones)
    for other in (m[1], dropout_mask(row_keys(0, 1, 8, [5]), 123, 30, 64, p, "cpu")[0],
                  dropout_mask(keys[:1], 124, 30, 64, p, "cpu")[0]):
        agree = (other == m[0]).float().mean().item()
        assert abs(agree - (p * p + (1 - p) ** 2)) < 0.03


def test_dropout_under_activation_checkpointing_recomputes_the_same_mask(one_thread):
    """Gradients with a block's activations recomputed in backward equal those of the plain forward:
    the recompute drew the same dropout masks. Without the keys the layer refuses to guess."""
    def grads(use_checkpoint):
        model = add_lora(random_model(), 4, 8, dropout=0.3, seed=2)
        randomise_b(model)
        model.train()
        set_dropout_rows(model, row_keys(0, 0, 3, [10, 11, 12]))
        x = model.tok_embeddings(tokens())
        block = model.layers[0]
        cos, sin = lora_rope(model)
        h = checkpoint(block, x, cos, sin, None, use_reentrant=False) if use_checkpoint else block(x, cos, sin, None)
        h.square().sum().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys() and len(plain) == 14
    assert all(torch.equal(plain[k], recomputed[k]) for k in plain)
    model = add_lora(random_model(), 4, 8, dropout=0.3).train()
    with pytest.raises(RuntimeError, match="set_dropout_rows"):
        model(tokens())
    with torch.no_grad():  # eval mode: no dropout, no keys needed
        model.eval()(tokens())


def lora_rope(model):
    from model import rope_angles
    return rope_angles(torch.arange(24), model.args.head_dim, model.args.rope_theta)


def test_dropout_scales_the_adapter_input(one_thread):
    """With dropout p the adapter sees x * mask / (1 - p); the base sees x whole."""
    lin = torch.nn.Linear(16, 8).double()
    layer = LoRALinear(lin, 2, 4, dropout=0.5, key=77)
    with torch.no_grad():
        layer.lora_a.data = torch.randn(2, 16, dtype=torch.float64)
        layer.lora_b.data = torch.randn(8, 2, dtype=torch.float64)
    keys = row_keys(1, 2, 3, [0, 1])
    layer.rows = keys
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    keep = dropout_mask(keys, 77, 5, 16, 0.5, "cpu").double()
    ref = x @ lin.weight.T + lin.bias + 2.0 * ((x * keep / 0.5) @ layer.lora_a.T) @ layer.lora_b.T
    assert (layer.train()(x) - ref).abs().max() < 1e-12
    assert 0.3 < keep.mean() < 0.7


def test_bf16_base_with_fp32_adapters(one_thread):
    """--bf16: the device holds the frozen base in bf16; the adapters, their gradients (and so the
    optimizer's state) stay fp32."""
    model = add_lora(random_model().to(torch.bfloat16), 4, 8, seed=1)
    randomise_b(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens()).float().square().mean().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and p.grad.abs().max() > 0
        else:
            assert p.dtype == torch.bfloat16 and p.grad is None


def test_bad_input_is_named():
    assert parse_targets("wq,wv w2") == ("wq", "wv", "w2")
    assert parse_targets("w3 wq") == ("wq", "w3")  # the model's order
    with pytest.raises(ValueError, match=r"--lora-targets 'wq,q_proj'.*unknown: q_proj"):
        parse_targets("wq,q_proj")
    with pytest.raises(ValueError, match="--lora-targets"):
        parse_targets(" , ")
    with pytest.raises(ValueError, match="--lora"):
        add_lora(random_model(), 0, 8)
    with pytest.raises(ValueError, match="--lora-dropout"):
        add_lora(random_model(), 4, 8, dropout=1.0)
    model = add_lora(random_model(), 4, 8)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, 4, 8)



@pytest.mark.parametrize("method", ["space", "spin", "ipo", "simpo", "sft"])
def test_every_loss_of_train_py_reaches_the_adapters_alone(one_thread, method):
    """train.micro_loss of each method (with --sft-weight; GEM for sft) on a LoRA model: every adapter,
    and nothing else, gets a finite non-zero gradient."""
    cfg = train.parse_args(["--preset", "smoke", "--method", method, "--sft-weight", "0.1", "--sft-loss", "gem",
                                   "--lora", "4"])
    model = add_lora(random_model(), 4, 8, seed=0)
    randomise_b(model)
    g = torch.Generator().manual_seed(0)

    def seq(prompt, response):
        return torch.randint(3, ARGS["vocab_size"], (prompt + response,), generator=g).tolist(), [0] * prompt + [1] * response
    K1 = 1 if method == "sft" else 3  # the real response and K = 2 generated ones
    examples = [{"seqs": [seq(5 + i, 4 + 3 * j + i) for j in range(K1)]} for i in range(3)]
    if method != "sft":
        for i, ex in enumerate(examples):
            ex["ref"] = [-20.0 - 3 * i - j for j in range(K1)]
    batch = train.make_batch(examples, 0, torch.device("cpu"))
    counts = {"prompts": 3, "real_tokens": sum(sum(ex["seqs"][0][1][1:]) for ex in examples)}
    loss, _ = train.micro_loss(model, method, cfg, batch, counts, 1, 0.5)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(n for n, _ in model.named_parameters() if ".lora_" in n)
    assert all(torch.isfinite(v).all() and v.abs().max() > 0 for v in grads.values())


# -----------------------------------------------------------------------------
# train.py --lora end to end, on the smoke preset. One uninterrupted single-process run from scratch is
# the reference (SFT makes θ_0 in full, then 2 LoRA iterations with the recipe's switches and dropout
# under activation checkpointing); the other runs start from its θ_0 (--model) and must end where it ends.

LORA = ["--lora", "4", "--lora-alpha", "8", "--lora-dropout", "0.1", "--activation-checkpointing", "--lr", "1e-3",
        "--mix-previous", "1", "--sft-weight", "0.1", "--gen-batch", "16"]


def free_port():
    """A port no other process holds now: other test runs share the machine."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(out, *extra, nproc=1, check=True, flags=LORA):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [os.path.join(ROOT, "train.py"), "--preset", "smoke", *flags, "--out", str(out), *extra]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()), *cmd]
    res = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"train.py failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [(r["iteration"], r["loss"]) for r in rows if r.get("phase") == "iter" and "loss" in r]


def tensors(path):
    from safetensors.torch import load_file
    return load_file(path)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    res = run_train(out)
    return out, res.stdout


def test_lora_run_writes_merged_models_and_peft_adapters(lora_run):
    out, stdout = lora_run
    assert "LoRA r=4 alpha=8 on wq wk wv wo w1 w2 w3: 8,960 trainable parameters" in stdout
    for t in (1, 2):
        config = json.loads(open(os.path.join(out, f"iter_{t}", "adapter", "adapter_config.json")).read())
        assert config["base_model_name_or_path"] == os.path.abspath(os.path.join(out, f"iter_{t - 1}"))
        assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
        assert json.loads(open(os.path.join(out, f"iter_{t}", "config.json")).read())["torch_dtype"] == "float32"
    assert not os.path.exists(os.path.join(out, "iter_0", "adapter"))  # θ_0 is the full SFT's
    # the checkpoint of a LoRA iteration holds the adapters alone: the base is θ_t, exported already
    import torch.distributed.checkpoint as dcp
    ckpt = os.path.join(out, "ckpt", open(os.path.join(out, "ckpt", "latest")).read())
    saved = dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata
    assert len(saved) == 2 * 2 * 7 and all(".lora_" in k for k in saved)


def test_peft_loads_the_adapter_on_the_previous_export_and_gives_the_next(lora_run):
    """AutoPeftModelForCausalLM finds OUT/iter_0 through base_model_name_or_path, puts OUT/iter_1/adapter
    on it, and computes OUT/iter_1's logits (transformers, fp32)."""
    out, _ = lora_run
    merged = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "iter_1"), dtype=torch.float32).eval()
    stacked = peft.AutoPeftModelForCausalLM.from_pretrained(os.path.join(out, "iter_1", "adapter"), dtype=torch.float32).eval()
    x = torch.randint(3, merged.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = merged(x).logits, stacked(input_ids=x).logits
        with stacked.disable_adapter():
            base = stacked(input_ids=x).logits
    assert (got - ref).abs().max() / ref.abs().max() < 1e-4
    assert (base - ref).abs().max() / ref.abs().max() > 1e-3  # the adapter is what makes the difference


def test_each_export_is_the_previous_plus_its_adapter(lora_run):
    """Between two exports, every adapted matrix moved by exactly (α/r) B A of the saved adapter (float64
    recomputation; to within fp32's rounding of W), and nothing else moved."""
    out, _ = lora_run
    eps = torch.finfo(torch.float32).eps
    for t in (0, 1):
        before = tensors(os.path.join(out, f"iter_{t}", "model.safetensors"))
        after = tensors(os.path.join(out, f"iter_{t + 1}", "model.safetensors"))
        adapter = tensors(os.path.join(out, f"iter_{t + 1}", "adapter", "adapter_model.safetensors"))
        assert before.keys() == after.keys()
        changed = {k for k in after if not torch.equal(after[k], before[k])}
        adapted = {k.removeprefix("base_model.model.").replace(".lora_A", "") for k in adapter if ".lora_A." in k}
        assert changed == adapted and len(adapted) == 2 * 7
        for name in adapted:
            stem = "base_model.model." + name.removesuffix(".weight")
            b, a = adapter[f"{stem}.lora_B.weight"].double(), adapter[f"{stem}.lora_A.weight"].double()
            w = before[name].double()
            err = (after[name].double() - (w + 2.0 * b @ a)).abs()
            assert (err <= eps * (w.abs() + 5 * 2.0 * b.abs() @ a.abs())).all(), name
            assert (2.0 * b @ a).abs().max() > 1e-4  # the adapter learned something at lr 1e-3


def test_lora_nan_then_resume_mid_iteration_ends_bit_identical(lora_run, tmp_path):
    """Stopped mid-iteration 1 (a NaN at global step 11, after the checkpoint of step 2): --resume
    rebuilds θ_1 from OUT/iter_1, reloads the adapter and its optimizer state, and ends with the
    reference's exports and losses, bit for bit."""
    out, _ = lora_run
    model = ["--model", os.path.join(out, "iter_0"), "--ckpt-every", "2"]
    res = run_train(tmp_path, *model, "--inject-nan-step", "11", check=False)
    assert res.returncode != 0 and "global step 11" in res.stderr
    assert open(os.path.join(tmp_path, "ckpt", "latest")).read() == "iter1_step2"
    res = run_train(tmp_path, *model, "--resume", check=False, flags=[])  # without --lora: refused, with the reason
    assert res.returncode != 0 and "iter1_step2: this checkpoint holds LoRA adapters" in res.stderr
    res = run_train(tmp_path, *model, "--resume")
    assert "resumed from" in res.stdout and ": iter 1, step 2" in res.stdout
    assert losses(tmp_path) == losses(out)
    for f in ("model.safetensors", os.path.join("adapter", "adapter_model.safetensors")):
        a, b = tensors(os.path.join(out, "iter_2", f)), tensors(os.path.join(tmp_path, "iter_2", f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_lora_two_processes_give_the_losses_of_one(lora_run, tmp_path):
    """FSDP2 on 2 gloo ranks, the adapters sharded with their layers, dropout keyed by sequence."""
    out, _ = lora_run
    run_train(tmp_path, "--model", os.path.join(out, "iter_0"), "--iterations", "1", nproc=2)
    one, two = [x for x in losses(out) if x[0] == 0], losses(tmp_path)
    assert len(one) == len(two) == 4
    for (_, a), (_, b) in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a), (one, two)
    a, b = (tensors(os.path.join(o, "iter_1", "model.safetensors")) for o in (out, tmp_path))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_lora_flags_in_help_and_bad_values(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["-h"])
    assert "stays full fine-tuning" in " ".join(capsys.readouterr().out.split())
    cfg = train.parse_args(["--lora", "8"])
    assert (cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets) == (16.0, 0.0, ALL_TARGETS)
    with pytest.raises(SystemExit):
        train.parse_args(["--lora", "8", "--lora-targets", "wq,gate"])
    assert "--lora-targets 'wq,gate'" in capsys.readouterr().err
