"""space.py against independent references: a float64 recomputation of the naive path for the
chunked log-probs and GEM, and numbers worked out by hand (math.log / math.exp) for each loss."""

import math

import pytest
import torch

import space


pytestmark = pytest.mark.usefixtures("one_thread")


def sig(u):
    return 1 / (1 + math.exp(-u))


def rel_err(a, b):
    """Norm-wise relative error of a against the reference b (both cast to float64)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def make_batch(dtype, B=5, T=23, d=16, V=300, seed=0):
    """Random LM-head inputs with a realistic mask: a prompt part (0) then a response (1) of
    different lengths per row, trailing padding (0), and one row fully masked."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=g).to(dtype)
    weight = (torch.randn(V, d, generator=g) * 0.5).to(dtype)
    targets = torch.randint(V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B - 1):
        prompt = int(torch.randint(1, T // 2, (1,), generator=g))
        length = int(torch.randint(1, T - prompt + 1, (1,), generator=g))
        mask[b, prompt:prompt + length] = True
    # row B-1 stays fully masked
    upstream = torch.randn(B, generator=g)   # dL/ds per row: random, never all ones
    return hidden, weight, targets, mask, upstream


def naive_logprobs(hidden, weight, targets, mask):
    logp = torch.log_softmax((hidden @ weight.t()).float() if hidden.dtype != torch.float64
                             else hidden @ weight.t(), dim=-1)                     # [B, T, V]
    return (logp.gather(-1, targets[..., None]).squeeze(-1) * mask).sum(-1)        # [B]


def value_and_grads(fn, hidden, weight, upstream, *args, **kwargs):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    out = fn(hidden, weight, *args, **kwargs)
    (out * upstream.to(out.dtype)).sum().backward()
    return out.detach(), hidden.grad, weight.grad


# -----------------------------------------------------------------------------
# sequence_logprobs


@pytest.fixture(params=[64, 1024], ids=["vocab_block64", "vocab_block1024"])
def vocab_block(request, monkeypatch):
    """Tiles of 64 vocab entries: several blocks and a ragged last one (V = 300 or 2000). Set as
    the CPU's default tile width, so the tests below also cover the per-device default."""
    monkeypatch.setitem(space.TILE, "cpu", (space.TILE["cpu"][0], request.param))
    return request.param


@pytest.mark.parametrize("chunk_size", [1, 7, 10, 1024])   # N = 30 here: 10 divides it, 7 doesn't
def test_sequence_logprobs_fp32_matches_float64(chunk_size, vocab_block):
    hidden, weight, targets, mask, upstream = make_batch(torch.float32)
    assert mask.sum() == 30 and mask[-1].sum() == 0
    ref = value_and_grads(naive_logprobs, hidden.double(), weight.double(), upstream.double(), targets, mask)
    out = value_and_grads(space.sequence_logprobs, hidden, weight, upstream, targets, mask, chunk_size=chunk_size)
    assert out[0].dtype == torch.float32 and out[0].shape == (5,)
    for got, want in zip(out, ref):
        assert rel_err(got, want) < 1e-5
    # the fully masked row: s = 0 and no gradient reaches it; nor any prompt position
    assert out[0][-1] == 0
    assert (out[1][~mask] == 0).all()


@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_sequence_logprobs_bf16_no_worse_than_naive_bf16(chunk_size, vocab_block):
    hidden, weight, targets, mask, upstream = make_batch(torch.bfloat16, T=64, d=64, V=2000)
    ref = value_and_grads(naive_logprobs, hidden.double(), weight.double(), upstream.double(), targets, mask)
    naive = value_and_grads(naive_logprobs, hidden, weight, upstream, targets, mask)
    out = value_and_grads(space.sequence_logprobs, hidden, weight, upstream, targets, mask, chunk_size=chunk_size)
    assert out[0].dtype == torch.float32
    assert out[1].dtype == out[2].dtype == torch.bfloat16
    for got, base, want in zip(out, naive, ref):
        assert rel_err(got, want) <= rel_err(base, want) + 1e-2


def test_sequence_logprobs_frozen_weight_and_constant_hidden(vocab_block):
    hidden, weight, targets, mask, upstream = make_batch(torch.float32)
    ref = value_and_grads(naive_logprobs, hidden.double(), weight.double(), upstream.double(), targets, mask)
    # frozen LM head: only hidden gets a gradient
    h = hidden.clone().requires_grad_()
    (space.sequence_logprobs(h, weight, targets, mask, chunk_size=7) * upstream).sum().backward()
    assert rel_err(h.grad, ref[1]) < 1e-5
    # hidden as a constant (e.g. a detached trunk): only the weight gets a gradient
    w = weight.clone().requires_grad_()
    (space.sequence_logprobs(hidden, w, targets, mask, chunk_size=7) * upstream).sum().backward()
    assert rel_err(w.grad, ref[2]) < 1e-5
    # neither: plain inference, as when scoring with the frozen opponent
    with torch.no_grad():
        assert rel_err(space.sequence_logprobs(hidden, weight, targets, mask), ref[0]) < 1e-5


def test_sequence_logprobs_strided_hidden_as_a_model_gives_it(vocab_block):
    # hidden[:, :-1] predicts tokens[:, 1:]: a non-contiguous view, and no copy of it is needed
    hidden, weight, targets, mask, upstream = make_batch(torch.float32, T=24)
    hidden, targets, mask = hidden[:, :-1].detach(), targets[:, 1:], mask[:, 1:]
    assert not hidden.is_contiguous()
    ref = value_and_grads(naive_logprobs, hidden.double(), weight.double(), upstream.double(), targets, mask)
    out = value_and_grads(space.sequence_logprobs, hidden, weight, upstream, targets, mask, chunk_size=7)
    for got, want in zip(out, ref):
        assert rel_err(got, want) < 1e-5


def test_sequence_logprobs_tile_arguments_override_the_device_default():
    # chunk_size and vocab_block given per call (as bench/logprob.py does), ragged or not
    hidden, weight, targets, mask, upstream = make_batch(torch.float32)
    ref = value_and_grads(naive_logprobs, hidden.double(), weight.double(), upstream.double(), targets, mask)
    for chunk_size, vocab_block in [(7, 64), (30, 300), (4, 1000)]:
        out = value_and_grads(space.sequence_logprobs, hidden, weight, upstream, targets, mask,
                              chunk_size=chunk_size, vocab_block=vocab_block)
        for got, want in zip(out, ref):
            assert rel_err(got, want) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_logprobs_on_cuda_with_its_default_tiles(dtype):
    # N = 6073 scored tokens and V = 9000: several of CUDA's 4096 x 4096 tiles, ragged ones too;
    # bf16 goes through torch.mm(..., out_dtype=torch.float32)
    batch = make_batch(dtype, B=9, T=2000, d=64, V=9000)
    hidden, weight, targets, mask, upstream = (x.cuda() for x in batch)
    assert mask.sum() > space.TILE["cuda"][0] and weight.shape[0] > space.TILE["cuda"][1]
    ref = value_and_grads(naive_logprobs, hidden.double(), weight.double(), upstream.double(), targets, mask)
    naive = value_and_grads(naive_logprobs, hidden, weight, upstream, targets, mask)
    out = value_and_grads(space.sequence_logprobs, hidden, weight, upstream, targets, mask)
    for got, base, want in zip(out, naive, ref):
        assert rel_err(got, want) <= (1e-5 if dtype == torch.float32 else rel_err(base, want) + 1e-2)


@pytest.mark.parametrize("backward_inside", [True, False], ids=["backward_inside_autocast", "backward_after_it"])
def test_sequence_logprobs_under_autocast_either_placement_of_backward(backward_inside, vocab_block):
    """A training loop under bf16 autocast: fp32 master weights, the model's fp32 final norm output,
    the loss inside the autocast block, and backward() either inside it (as some loops do) or after
    it. Either way the LM head's tiles compute in the inputs' fp32, so the value and the gradients of
    hidden and of the head are the naive log-softmax's, recomputed in float64 outside any autocast."""
    hidden, weight, targets, mask, upstream = make_batch(torch.float32, T=31, V=700)
    ref = value_and_grads(naive_logprobs, hidden.double(), weight.double(), upstream.double(), targets, mask)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = space.sequence_logprobs(h, w, targets, mask, chunk_size=7)
        loss = (s * upstream).sum()
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    assert s.dtype == h.grad.dtype == w.grad.dtype == torch.float32
    for got, want in zip((s.detach(), h.grad, w.grad), ref):
        assert rel_err(got, want) < 1e-5
    # GEM shares the tiles' backward: its gradient is the same either way too
    grads = []
    for inside in (True, False):
        h2 = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = space.gem_loss(h2, weight, targets, mask, beta=0.7, h="logsigmoid", chunk_size=7)
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append(h2.grad)
    assert torch.equal(grads[0], grads[1])


def test_a_model_under_autocast_gets_the_same_gradients_whichever_side_backward_is_on():
    """The whole model, as train.py runs it with --bf16 in one process: the trunk's matmuls in bf16
    under autocast, the head through sequence_logprobs. Calling backward() inside the block must not
    fail (it did: index_add_ of a bf16 tile product into an fp32 buffer) and must give the gradients
    of a backward() after it."""
    from model import ModelArgs, Transformer
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, vocab_size=97,
                     max_seq_len=64, sliding_window=None, model_type="llama")
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(97, (3, 20), generator=g)
    mask = torch.zeros(3, 19, dtype=torch.bool)
    for b, (p, n) in enumerate([(4, 10), (9, 6), (2, 17)]):
        mask[b, p:p + n] = True
    upstream = torch.randn(3, generator=g)
    grads = []
    for inside in (True, False):
        model = Transformer(args).init_weights(0, std=0.2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model(tokens[:, :-1], return_hidden=True)                      # [3, 19, 32] fp32
            loss = (space.sequence_logprobs(hidden, model.output.weight, tokens[:, 1:], mask) * upstream).sum()
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        assert rel_err(grads[0][name], grads[1][name]) < 1e-6, name


def test_sequence_logprobs_rejects_mixed_dtypes():
    hidden, weight, targets, mask, _ = make_batch(torch.float32)
    with pytest.raises(TypeError):
        space.sequence_logprobs(hidden.bfloat16(), weight, targets, mask)


def test_sequence_logprobs_accepts_int_mask_and_all_masked_batch():
    hidden, weight, targets, mask, upstream = make_batch(torch.float32)
    a = space.sequence_logprobs(hidden, weight, targets, mask)
    b = space.sequence_logprobs(hidden, weight, targets, mask.long())
    assert torch.equal(a, b)
    h = hidden.clone().requires_grad_()
    out = space.sequence_logprobs(h, weight, targets, torch.zeros_like(mask))
    out.sum().backward()
    assert (out == 0).all() and (h.grad == 0).all()


# -----------------------------------------------------------------------------
# SFT and GEM


def naive_gem_per_token(hidden, weight, targets, mask, beta, h="linear"):
    """GEM as its own repository writes it (github.com/liziniu/GEM, sft_trainer.py `gem_loss`):
    full logits, −Σ_v q_v w_v (log p_y − log p_v) with q and w computed without gradient. [B, T]"""
    z = hidden @ weight.t()                                                        # [B, T, V]
    logp = torch.log_softmax(z if z.dtype == torch.float64 else z.float(), dim=-1)
    with torch.no_grad():
        gap = z - z.gather(-1, targets[..., None])                                 # z_v − z_y
        w = torch.sigmoid(0.01 * gap) if h == "logsigmoid" else torch.ones_like(gap)
        q = torch.exp(torch.log_softmax(z / beta, dim=-1))
    per_token = -(q * w * (logp.gather(-1, targets[..., None]) - logp)).sum(-1)    # [B, T]
    return per_token * mask


def naive_gem(hidden, weight, targets, mask, beta, h="linear"):
    return naive_gem_per_token(hidden, weight, targets, mask, beta, h).sum() / mask.sum()


@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
@pytest.mark.parametrize("beta", [0.7, 0.3])
@pytest.mark.parametrize("scale", [1.0, 30.0])   # logit gaps of a few units, and of ~100 where σ(0.01·gap) bends
def test_gem_loss_matches_float64(beta, h, scale, vocab_block):
    hidden, weight, targets, mask, _ = make_batch(torch.float32)
    hidden = hidden * scale
    one = torch.ones(())
    ref = value_and_grads(naive_gem, hidden.double(), weight.double(), one.double(), targets, mask, beta, h)
    out = value_and_grads(space.gem_loss, hidden, weight, one, targets, mask, beta=beta, h=h, chunk_size=7)
    for got, want in zip(out, ref):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
def test_gem_per_token_values_with_a_different_upstream_gradient_per_token(h, vocab_block):
    # gem_loss is a plain sum, so its upstream gradient is one number; the per-token values under
    # it must also be right when every token's dL/dvalue differs, as the backward is written for
    hidden, weight, targets, mask, _ = make_batch(torch.float32, seed=1)
    upstream = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2))   # [B, T]
    ref = value_and_grads(naive_gem_per_token, hidden.double() * 10, weight.double(), upstream.double(),
                          targets, mask, 0.5, h)
    per_token = lambda hd, w, y, m: space._TokenValues.apply(hd, w, y, m, "gem", 0.5, h, 7, None)   # noqa: E731
    out = value_and_grads(per_token, hidden * 10, weight, upstream, targets, mask)
    for got, want in zip(out, ref):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
def test_gem_bf16_no_worse_than_naive_bf16(h, vocab_block):
    hidden, weight, targets, mask, _ = make_batch(torch.bfloat16, T=64, d=64, V=2000)
    one = torch.ones(())
    ref = value_and_grads(naive_gem, hidden.double(), weight.double(), one.double(), targets, mask, 0.7, h)
    naive = value_and_grads(naive_gem, hidden, weight, one, targets, mask, 0.7, h)
    out = value_and_grads(space.gem_loss, hidden, weight, one, targets, mask, h=h, chunk_size=7)
    assert out[1].dtype == out[2].dtype == torch.bfloat16
    for got, base, want in zip(out, naive, ref):
        assert rel_err(got, want) <= rel_err(base, want) + 1e-2


def test_gem_logsigmoid_weights_are_half_at_a_tie_and_bend_with_the_gap():
    hidden, weight, targets, mask, _ = make_batch(torch.float32)
    one = torch.ones(())

    def gem(h, scale):
        return value_and_grads(space.gem_loss, hidden * scale, weight, one, targets, mask, h=h)

    # logit gaps near 0: w = σ(0.01 · gap) ≈ 1/2 everywhere, so the gradients are half of linear's
    # (the value is a near-cancelling sum of gaps; its second-order term shows at 1e-2)
    got, lin = gem("logsigmoid", 0.01), gem("linear", 0.01)
    assert rel_err(got[1], lin[1] / 2) < 1e-3 and rel_err(got[2], lin[2] / 2) < 1e-3
    # gaps of ~100: the weights differ per entry, no longer a constant multiple of linear's
    for got, lin in zip(gem("logsigmoid", 30.0), gem("linear", 30.0)):
        assert rel_err(got, lin / 2) > 0.3


def test_gem_rejects_an_unknown_h():
    hidden, weight, targets, mask, _ = make_batch(torch.float32)
    with pytest.raises(ValueError, match="logsigmoid"):
        space.gem_loss(hidden, weight, targets, mask, h="sigmoid")


def test_gem_with_beta_one_has_the_cross_entropy_gradient(vocab_block):
    hidden, weight, targets, mask, _ = make_batch(torch.float32)
    one = torch.ones(())
    gem = value_and_grads(space.gem_loss, hidden, weight, one, targets, mask, beta=1.0, chunk_size=7)
    sft = value_and_grads(space.sft_loss, hidden, weight, one, targets, mask, chunk_size=7)
    assert rel_err(gem[1], sft[1]) < 1e-5 and rel_err(gem[2], sft[2]) < 1e-5
    # but it is a different number: Σ q z − z_y, not lse(z) − z_y
    assert not torch.allclose(gem[0], sft[0])


def test_sft_loss_is_mean_nll_and_honours_num_tokens():
    hidden, weight, targets, mask, _ = make_batch(torch.float32)
    logp = torch.log_softmax(hidden.double() @ weight.double().t(), -1).gather(-1, targets[..., None]).squeeze(-1)
    nll = -(logp * mask).sum()
    assert rel_err(space.sft_loss(hidden, weight, targets, mask), nll / mask.sum()) < 1e-6
    assert rel_err(space.sft_loss(hidden, weight, targets, mask, num_tokens=1000), nll / 1000) < 1e-6


# -----------------------------------------------------------------------------
# Self-play losses on hand-checkable numbers


def t(*xs):
    """t(1.0, 2.0) -> [2]; t([[1.0, 2.0]]) -> [1, 2] (one prompt, K = 2)."""
    data = xs[0] if len(xs) == 1 and isinstance(xs[0], list) else xs
    return torch.tensor(data, dtype=torch.float64)


def test_spin_sigmoid_and_hinge_by_hand():
    # r(y) = 5 − 2 = 3, r(y') = 1 − 3 = −2: gap 5, β = 0.1 -> u = 0.5
    args = t(5.0), t(1.0), t(2.0), t(3.0)
    assert space.spin_loss(*args).item() == pytest.approx(-math.log(sig(0.5)))
    assert space.spin_loss(*args, kind="hinge").item() == pytest.approx(0.5)
    assert space.spin_loss(*args, beta=1.0, kind="hinge").item() == 0.0   # margin beyond 1: no loss
    with pytest.raises(ValueError):
        space.spin_loss(*args, kind="ipo")


def test_spin_with_k_generated_averages_the_pairs():
    # one prompt, r(y) = 1, r(y'_k) = 0 and 2: pairs with gaps 1 and −1
    loss = space.spin_loss(t(1.0), t([[0.0, 2.0]]), t(0.0), t([[0.0, 0.0]]), beta=1.0)
    assert loss.item() == pytest.approx((-math.log(sig(1)) - math.log(sig(-1))) / 2)


def test_space_with_k_mu_beta_one_is_two_independent_logistic_terms():
    pr, pg, rr, rg = t(0.5, -1.0), t(-0.3, 2.0), t(0.1, 0.0), t(0.2, 1.0)   # r = [0.4, −1], r' = [−0.5, 1]
    want = [-math.log(sig(0.4)) - math.log(sig(0.5)), -math.log(sig(-1.0)) - math.log(sig(-1.0))]
    assert space.space_loss(pr, pg, rr, rg).item() == pytest.approx(sum(want) / 2)
    assert space.space_loss(pr, pg[:, None], rr, rg[:, None], mu=1).item() == pytest.approx(sum(want) / 2)


def test_space_k2_with_default_mu_and_mu_not_k():
    # r(y) = 1, r(y') = [0.5, −1], β = 0.5
    pr, pg, rr, rg = t(1.0), t([[0.5, -1.0]]), t(0.0), t([[0.0, 0.0]])
    for mu in (2.0, 1.0, 3.0):
        want = -math.log(sig(0.5 - math.log(mu))) - (mu / 2) * (
            math.log(sig(math.log(mu) - 0.25)) + math.log(sig(math.log(mu) + 0.5)))
        got = space.space_loss(pr, pg, rr, rg, mu=None if mu == 2.0 else mu, beta=0.5)
        assert got.item() == pytest.approx(want)


def test_space_is_finite_for_huge_rewards():
    loss = space.space_loss(t(-1e4), t(1e4), t(0.0), t(0.0))
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(2e4)


def grads(loss_fn, r_real, r_gen, **kw):
    """d loss / d policy_real and d policy_gen at rewards r_real, r_gen (reference at 0)."""
    pr, pg = t(r_real).requires_grad_(), t(r_gen).requires_grad_()
    loss = loss_fn(pr, pg, t(0.0), t(0.0), **kw)
    loss.backward()
    return loss.item(), pr.grad.item(), pg.grad.item()


def test_space_pushes_rewards_independently_spin_only_the_gap():
    _, g_real, g_gen = grads(space.space_loss, 0.3, -0.2)
    assert g_real < 0 < g_gen            # loss falls as r(y) rises and as r(y') falls
    # SPACE: the real push is the same whatever the generated reward is: absolute, not relative
    assert grads(space.space_loss, 0.3, 5.0)[1] == pytest.approx(g_real, rel=1e-12)
    assert grads(space.space_loss, 0.3, -5.0)[1] == pytest.approx(g_real, rel=1e-12)
    # ... and shifting both rewards by the same constant changes every gradient (by far more than rounding)
    shifted, base = grads(space.space_loss, 0.3 + 2, -0.2 + 2), grads(space.space_loss, 0.3, -0.2)
    assert all(abs(a - b) > 0.05 for a, b in zip(shifted, base)), (shifted, base)
    # SPIN: shift both rewards by the same constant and nothing changes; only the gap matters
    base = grads(space.spin_loss, 0.3, -0.2)
    shifted = grads(space.spin_loss, 0.3 + 2, -0.2 + 2)
    assert shifted == pytest.approx(base)
    assert base[1] < 0 < base[2] and base[1] == pytest.approx(-base[2])
    # and when y' ≈ y (equal rewards) SPIN's gradient no longer depends on where they are
    assert grads(space.spin_loss, 4.0, 4.0) == pytest.approx(grads(space.spin_loss, -4.0, -4.0))


def test_ipo_by_hand():
    # log-ratios 3 over 3 tokens = 1/token; −2 over 4 tokens = −0.5/token: Δ = 1.5; 1/(2β) = 5
    loss = space.ipo_loss(t(5.0), t(1.0), t(2.0), t(3.0), t(3.0), t(4.0), beta=0.1)
    assert loss.item() == pytest.approx((1.5 - 5) ** 2)
    # K = 2: the mean over the two pairs
    loss = space.ipo_loss(t(5.0), t([[1.0, 3.0]]), t(2.0), t([[3.0, 3.0]]), t(3.0), t([[4.0, 1.0]]), beta=0.5)
    assert loss.item() == pytest.approx(((1.5 - 1) ** 2 + (1 - 1) ** 2) / 2)


def test_simpo_by_hand():
    # s̄(y) = −6/3 = −2, s̄(y') = −12/4 = −3: β(−2 + 3) − γ = 2 − 0.5
    loss = space.simpo_loss(t(-6.0), t(-12.0), t(3.0), t(4.0))
    assert loss.item() == pytest.approx(-math.log(sig(1.5)))
    loss = space.simpo_loss(t(-6.0), t([[-12.0, -2.0]]), t(3.0), t([[4.0, 1.0]]), beta=1.0, gamma=0.0)
    assert loss.item() == pytest.approx((-math.log(sig(1.0)) - math.log(sig(0.0))) / 2)


def test_reward_metrics():
    # rewards: real [2, 0, 1]; generated [[1, 0], [1, −1], [0.5, 1]]
    r_real, r_gen = t(2.0, 0.0, 1.0), t([1.0, 0.0], [1.0, -1.0], [0.5, 1.0])
    m = space.reward_metrics(r_real + 1, r_gen + 1, t(1.0, 1.0, 1.0), torch.ones(3, 2, dtype=torch.float64))
    assert set(m) == {"rewards/real", "rewards/generated", "rewards/margin", "accuracy"}
    assert m["rewards/real"] == pytest.approx(1.0)
    assert m["rewards/generated"] == pytest.approx(2.5 / 6)
    assert m["rewards/margin"] == pytest.approx(1.0 - 2.5 / 6)
    assert m["accuracy"] == pytest.approx(1 / 3)   # only row 0 beats both; row 2 ties one
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in m.values())  # read back by the caller
    # K = 1 given as [B]
    assert space.reward_metrics(t(1.0, 0.0), t(0.0, 1.0), t(0.0, 0.0), t(0.0, 0.0))["accuracy"] == pytest.approx(0.5)
