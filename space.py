"""Self-play fine-tuning losses in plain PyTorch: SPACE, SPIN (and its self-play IPO / SimPO
baselines), plus the SFT losses cross-entropy and GEM. This file needs only torch: copy it.

Notation (the papers'). x is a prompt, y its real (human) response, y'_1 .. y'_K responses
sampled from the opponent p_θt, the model frozen at the start of self-play iteration t.

    s_θ(y|x) = Σ_{t ∈ response} log p_θ(y_t | x, y_<t)      a sum over response tokens only
    r(y)     = s_θ(y|x) − s_θt(y|x)                        the implicit reward, a log-ratio

SPIN (Chen et al., ICML 2024, Eq. 4.7 with the logistic loss) trains on the *gap* of two rewards:

    L_SPIN  = −log σ(β [r(y) − r(y')])            hinge variant: max(0, 1 − β [r(y) − r(y')])

SPACE (Wang et al., NeurIPS 2025) treats y' as noise in noise contrastive estimation, with μ
noise samples per real one and σ_μ(u) = 1 / (1 + μ e^{−u}) = σ(u − log μ):

    L_SPACE = −log σ_μ(β r(y)) − (μ/K) Σ_k log(1 − σ_μ(β r(y'_k)))
            = −log σ(β r(y) − log μ) − (μ/K) Σ_k log σ(log μ − β r(y'_k))

With K = μ = β = 1 it is −log σ(r(y)) − log σ(−r(y')): the real reward is pushed up and the
generated one down, each on its own (absolute values). SPIN only sees r(y) − r(y'), whose
objective goes flat once y' ≈ y; that instability is what SPACE fixes.

The SPACE paper's other self-play baselines, with s̄ = s / |y| the per-token mean log-prob:

    S-IPO   (Azar et al., 2024):  (Δ − 1/(2β))²,  Δ = [s̄_θ(y) − s̄_θt(y)] − [s̄_θ(y') − s̄_θt(y')]
    S-SimPO (Meng et al., 2024):  −log σ(β s̄_θ(y) − β s̄_θ(y') − γ)      (no reference model)

For SFT, per response token with logits z = W h and target token y_t:

    cross-entropy:  lse(z) − z_{y_t}                         ∂/∂z = softmax(z) − onehot(y_t)
    GEM (Li et al., ICLR 2025):
                    Σ_v q_v w_v (z_v − z_{y_t}),  q = stopgrad(softmax(z / β)), w = stopgrad(weights)
                                                             ∂/∂z = q ⊙ w − (Σ_v q_v w_v) onehot(y_t)
                    linear h:      w = 1                     ∂/∂z = q − onehot(y_t)
                    logsigmoid h:  w_v = σ(0.01 (z_v − z_{y_t}))

GEM's gradient is cross-entropy's with the model's distribution sharpened (β < 1): a target
that is already the top token stops being pushed sooner, and unlikely alternatives are pushed
down less, which is how GEM keeps generations diverse. β = 1 with linear h gives exactly the CE
gradient; logsigmoid h also pushes an alternative the less, the further it lies below the target.

All of these need s, i.e. log-softmax over the vocabulary at every response token. The naive
path builds the [B·T, V] logits (4 GB in fp32 for 8 x 4096 tokens and V = 32000) and keeps
them for backward. `sequence_logprobs` never does: it walks tiles of (scored tokens x vocab
entries), keeps one fp32 log-sum-exp per token, and recomputes each tile's logits in backward.

Usage (hidden is the final-norm output, hidden[b, t] predicts targets[b, t] = tokens[b, t+1]):

    s = sequence_logprobs(hidden, model.output.weight, targets, loss_mask)     # [B]
    loss = space_loss(s[:B], s[B:].view(B, K), ref_real, ref_generated)        # scalar
"""

import math

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Log-probs through the LM head, tile by tile, so the [N, V] logits never exist at once

# Tile shape per device type: (scored tokens, vocabulary entries) = (chunk_size, vocab_block), a
# tile being that many fp32 logits. CPU: 1024 x 512 (2 MiB), tuned on a 2-core CPU with
# bench/logprob.py: cache-sized, and peak memory within torch's own chunked cross-entropy. CUDA:
# 4096 x 4096 (64 MiB): matmuls that size run near a GPU's peak, and a V = 32000 head is 8 vocab
# blocks, so a step launches hundreds of kernels where CPU tiles would launch tens of thousands.
# The CUDA shape is chosen from those sizes, not tuned; bench/logprob.py --device cuda measures it.
# Other accelerators get CUDA's. chunk_size= and vocab_block= override it per call.
TILE = {"cpu": (1024, 512), "cuda": (4096, 4096)}


def _mm_fp32(a, b, out=None):
    """a @ b as fp32 ([n, m], into out when given), whatever the input dtype.

    A bf16 matmul accumulates in fp32 inside the kernel, and then PyTorch rounds its result to
    bf16. On CUDA, torch.mm(..., out_dtype=torch.float32) keeps the fp32 result (fp16/bf16 inputs;
    aten/src/ATen/native/cuda/Blas.cpp, _mm_dtype_out_cuda), which the softmax wants anyway. torch
    2.13 has no such kernel on CPU (NotImplementedError), so there the product is rounded to the
    input dtype and copied up.
    """
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.device.type == "cuda":
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    low = torch.mm(a, b)
    return low.float() if out is None else out.copy_(low)


def _tiles(h, weight, chunk_size, vocab_block):
    """Yield (s, e, v0, z): z [n, nv] fp32 are the logits of scored tokens s:e (rows s:e of h
    [N, d]) over the vocabulary entries v0:v0+nv. Every z is a view of one reused buffer (callers
    may overwrite it).

    Vocabulary blocks are the outer loop, so each block of the weight gradient is complete before
    the next begins: no [V, d] fp32 accumulator, which for a bf16 head would be twice its gradient.
    Each token chunk is then visited once per vocabulary block, so the caller gathers the scored
    tokens into h once ([N, d], at most the size of hidden), and a chunk is a view of it.
    """
    N, V = h.shape[0], weight.shape[0]
    c, vb = max(1, min(chunk_size, N)), min(vocab_block, V)
    z32 = torch.empty(c, vb, dtype=torch.float32, device=h.device)                      # [c, Vb]
    for v0 in range(0, V, vb):
        w_v = weight[v0:v0 + vb]                                                         # [nv, d]
        for s in range(0, N, c):
            z = _mm_fp32(h[s:s + c], w_v.t(), out=z32[:min(c, N - s), :w_v.shape[0]])    # [n, nv]
            yield s, s + z.shape[0], v0, z


def _target_logits(h, weight, y, chunk_size):
    """z_y = h · W[y] for every scored token: [N] fp32, computed before any tile so that each tile
    can already use it (GEM's weights need z_v − z_y). Products of bf16 numbers are exact in fp32,
    so where tiles are fp32 (fp32 inputs; bf16 on CUDA) this is their own z_y to fp32 rounding;
    CPU bf16 tiles are rounded to bf16, and this is the more accurate z_y. By chunks, so the
    gathered rows of W are [chunk, d], never [N, d]."""
    z_y = torch.empty(y.shape, dtype=torch.float32, device=h.device)                     # [N]
    for s in range(0, y.shape[0], chunk_size):
        z_y[s:s + chunk_size] = (h[s:s + chunk_size].float() * weight[y[s:s + chunk_size]].float()).sum(1)
    return z_y


def _in_block(y, v0, nv):
    """Each target's column in the vocab block v0:v0+nv ([n, 1], clamped to stay a valid
    index) and whether it lies in that block at all ([n, 1] bool; true in exactly one block)."""
    col = y[:, None] - v0
    return col.clamp(0, nv - 1), (col >= 0) & (col < nv)


def _logsumexp_(z):
    """Row-wise logsumexp of z [n, nv] -> [n]. Overwrites z, to need no [n, nv] temporary."""
    m = z.amax(dim=1, keepdim=True)                         # [n, 1]; subtracted so exp can't overflow
    return (m + z.sub_(m).exp_().sum(dim=1, keepdim=True).log()).squeeze(1)


class _TokenValues(torch.autograd.Function):
    """Per-token value of a softmax loss on the logits z = W h, computed tile by tile.

    kind "logprob":  value = z_y − lse(z)                  ∂value/∂z = −(softmax(z) − onehot(y))
    kind "gem":      value = Σ_v q_v w_v (z_v − z_y)        ∂value/∂z = q ⊙ w − S · onehot(y)
                     q = softmax(z/β) and w held constant, S = Σ_v q_v w_v;
                     h "linear": w = 1 (so S = 1), h "logsigmoid": w_v = σ(0.01 (z_v − z_y))

    Every gradient is ±(softmax(z/τ) ⊙ w − S · onehot(y)) with τ = 1 or β, so one backward
    serves all, and all it needs from forward is z_y, lse(z/τ) and S per token. The upstream
    gradient (dL/ds, a different number for every sequence) arrives only in backward, so the
    tiles' logits are recomputed there: that costs a fourth matmul over the naive path's three,
    and saves the [N, V] logits. Returns [B, T] fp32, zero at unscored positions.
    """

    # Autocast is switched off inside both passes: the tiles compute in the inputs' own dtype (fp32
    # softmax either way), as documented, whatever region the caller is in. This matters most in
    # backward, which runs under the autocast state of the code that calls backward(): a training
    # loop that calls it inside its autocast block would otherwise get bf16 matmul results to add
    # into fp32 buffers (index_add_ refuses mixed dtypes), and gradients in another precision than
    # a backward() called after the block.

    @staticmethod
    def forward(ctx, hidden, weight, targets, mask, kind, beta, h_kind, chunk_size, vocab_block):
        with torch.autocast(hidden.device.type, enabled=False):
            return _TokenValues._forward(ctx, hidden, weight, targets, mask, kind, beta, h_kind, chunk_size,
                                         vocab_block)

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _TokenValues._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, mask, kind, beta, h_kind, chunk_size, vocab_block):
        # hidden [B, T, d], weight [V, d], targets [B, T] long, mask [B, T] bool
        if hidden.dtype != weight.dtype:
            raise TypeError(f"hidden is {hidden.dtype} but the LM head weight is {weight.dtype}")
        tile = TILE.get(hidden.device.type, TILE["cuda"])
        chunk_size, vocab_block = chunk_size or tile[0], vocab_block or tile[1]
        tau = beta if kind == "gem" else 1.0
        weighted = kind == "gem" and h_kind == "logsigmoid"
        b_idx, t_idx = mask.nonzero(as_tuple=True)                                       # [N], [N]
        y = targets[b_idx, t_idx]                                                        # [N]
        h = hidden[b_idx, t_idx]                                                         # [N, d]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        z_y = _target_logits(h, weight, y, chunk_size)                                   # [N]
        lse = torch.full(y.shape, -math.inf, **f32)                                      # [N] lse(z/τ) so far
        e_w = torch.zeros(y.shape, **f32)                                                # [N] GEM value so far
        s_w = torch.zeros(y.shape, **f32) if weighted else torch.ones(y.shape, **f32)    # [N] S so far
        for s, e, v0, z in _tiles(h, weight, chunk_size, vocab_block):
            if kind == "logprob":
                lse[s:e] = torch.logaddexp(lse[s:e], _logsumexp_(z))
                continue
            # GEM. Within a block, q ∝ p = exp(z/τ − max); the block's expectations under q are
            # then rescaled by its share of the softmax, exp(lse_block − lse), as blocks merge.
            p = z / tau                                                                  # [n, nv]
            lse_blk = _logsumexp_(p)                                                     # p <- exp(z/τ − max)
            p_sum = p.sum(dim=1)                                                         # [n]
            gap = z.sub_(z_y[s:e, None])                                                 # [n, nv] z_v − z_y
            if weighted:
                p.mul_(gap.mul(0.01).sigmoid_())                                         # p <- p ⊙ w
                s_blk = p.sum(dim=1) / p_sum                                             # Σ q w in the block
            e_blk = p.mul_(gap).sum(dim=1) / p_sum                                       # Σ q w (z − z_y) in it
            lse_new = torch.logaddexp(lse[s:e], lse_blk)
            keep, add = (lse[s:e] - lse_new).exp(), (lse_blk - lse_new).exp()            # [n] shares
            e_w[s:e] = e_w[s:e] * keep + e_blk * add
            if weighted:
                s_w[s:e] = s_w[s:e] * keep + s_blk * add
            lse[s:e] = lse_new
        ctx.save_for_backward(hidden, weight, b_idx, t_idx, y, z_y, lse, s_w)
        ctx.tau, ctx.weighted, ctx.sign = tau, weighted, (-1.0 if kind == "logprob" else 1.0)
        ctx.chunk_size, ctx.vocab_block = chunk_size, vocab_block
        out = torch.zeros(mask.shape, **f32)                                             # [B, T]
        out[b_idx, t_idx] = z_y - lse if kind == "logprob" else e_w
        return out

    @staticmethod
    def _backward(ctx, grad_out):
        hidden, weight, b_idx, t_idx, y, z_y, lse, s_w = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        B, T, d = hidden.shape
        N = y.shape[0]
        # gathered again, not saved by forward: kept only while this backward runs, not through
        # the rest of the model's forward and backward
        h = hidden[b_idx, t_idx]                                                         # [N, d]
        coef = ctx.sign * grad_out[b_idx, t_idx].float()                                # [N]
        # The hidden gradient sums over vocab blocks, so it accumulates in fp32 (for fp32
        # hidden this is the result itself); rows are positions b*T + t, unscored ones stay 0.
        grad_h = torch.zeros(B * T, d, dtype=torch.float32, device=hidden.device) if need_h else None
        rows = b_idx * T + t_idx                                                         # [N]
        grad_w = torch.zeros_like(weight) if need_w else None                            # [V, d]
        dz_low = None                                                                    # bf16 copy of a tile
        for s, e, v0, z in _tiles(h, weight, ctx.chunk_size, ctx.vocab_block):
            n, nv = z.shape
            # coef · (softmax(z/τ) ⊙ w − S · onehot(y)), built in place in the tile buffer
            w = (z - z_y[s:e, None]).mul_(0.01).sigmoid_() if ctx.weighted else None     # [n, nv]
            if ctx.tau != 1.0:
                z.div_(ctx.tau)
            z.sub_(lse[s:e, None]).exp_()
            if w is not None:
                z.mul_(w)
            col, inside = _in_block(y[s:e], v0, nv)
            z.scatter_add_(1, col, torch.where(inside, -s_w[s:e, None], 0.0))
            if hidden.dtype == torch.float32:
                dz = z.mul_(coef[s:e, None])                                             # [n, nv]
            else:  # scale and round to bf16 in one pass, for bf16 matmuls
                if dz_low is None:  # the first tile is the largest
                    dz_low = torch.empty(z.shape, dtype=hidden.dtype, device=z.device)
                dz = torch.mul(z, coef[s:e, None], out=dz_low[:n, :nv])
            if need_h:
                grad_h.index_add_(0, rows[s:e], _mm_fp32(dz, weight[v0:v0 + nv]))
            if need_w:
                # This block's rows sum over every token chunk: in fp32, straight into the
                # result when it is fp32, else into a block accumulator cast once complete.
                if s == 0:
                    acc = grad_w[v0:v0 + nv] if grad_w.dtype == torch.float32 else torch.zeros(
                        nv, d, dtype=torch.float32, device=weight.device)                # [nv, d]
                if dz.dtype == torch.float32:
                    acc.addmm_(dz.t(), h[s:e])
                else:  # bf16 matmul (fp32 inside the kernel), fp32 sum across chunks
                    acc.add_(_mm_fp32(dz.t(), h[s:e]))
                if e == N and grad_w.dtype != torch.float32:
                    grad_w[v0:v0 + nv] = acc
        if need_h:
            grad_h = grad_h.view(B, T, d).to(hidden.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None


def sequence_logprobs(hidden, weight, targets, mask, chunk_size=None, vocab_block=None):
    """s(y) = Σ_t mask[b, t] · log softmax(W hidden[b, t])[targets[b, t]], per row. [B] fp32.

    hidden [B, T, d] (fp32 or bf16), weight [V, d] the LM head, targets [B, T] long, mask [B, T]
    bool or 0/1 (1 on response tokens). A fully masked row gives 0 and no gradient. Memory is
    O(chunk_size · vocab_block) instead of O(B · T · V), tiles of TILE[device type] unless given;
    matmuls run in the input dtype, the softmax in fp32.
    """
    values = _TokenValues.apply(hidden, weight, targets, mask.bool(), "logprob", 1.0, None, chunk_size, vocab_block)
    return values.sum(dim=1)


# -----------------------------------------------------------------------------
# SFT losses, normalised per token


def sft_loss(hidden, weight, targets, mask, num_tokens=None, chunk_size=None, vocab_block=None):
    """Cross-entropy: −Σ_t log p(y_t | ·) over response tokens, / num_tokens.

    num_tokens defaults to this batch's count; with gradient accumulation or data parallelism
    pass the global count over micro-batches and ranks, so every token weighs the same.
    """
    if num_tokens is None:
        num_tokens = mask.sum().clamp(min=1)
    return -sequence_logprobs(hidden, weight, targets, mask, chunk_size, vocab_block).sum() / num_tokens


def gem_loss(hidden, weight, targets, mask, beta=0.7, h="linear", num_tokens=None, chunk_size=None,
             vocab_block=None):
    """GEM (Li et al., ICLR 2025): Σ_t Σ_v q_v w_v (z_v − z_{y_t}) / num_tokens, z = W hidden_t.

    q = stopgrad(softmax(z / β)) and the weights w are held constant too, so ∂/∂z = q ⊙ w − S ·
    onehot(y_t) with S = Σ_v q_v w_v. h names the weights, as the GEM repository's `gem_loss` does
    (github.com/liziniu/GEM, sft_trainer.py, commit e5b1430): "linear" is w = 1, the CE gradient
    with the model's own distribution sharpened by β < 1; "logsigmoid" is w_v = σ(0.01 (z_v − z_y)),
    the derivative of h(u) = log σ(u) at u = 0.01 (z_y − z_v): 1/2 at a tie with the target, less
    for an alternative already further below it. GEM's scripts train with "logsigmoid"; its
    train.py calls the difference from "linear" usually negligible. Same tiled path as
    `sequence_logprobs`: no [N, V] logits.
    """
    if h not in ("linear", "logsigmoid"):
        raise ValueError(f"gem_loss: h must be 'linear' or 'logsigmoid', got {h!r}")
    if num_tokens is None:
        num_tokens = mask.sum().clamp(min=1)
    per_token = _TokenValues.apply(hidden, weight, targets, mask.bool(), "gem", beta, h, chunk_size, vocab_block)
    return per_token.sum() / num_tokens


# -----------------------------------------------------------------------------
# Self-play losses. Inputs are sequence log-probs s (from `sequence_logprobs`): the policy's
# for y [B] and y' [B] or [B, K], and the opponent's, scored once with θ_t frozen.
# Each returns the batch mean; the trainer rescales for micro-batches and ranks.


def _per_pair(generated):
    """[B] (K = 1) or [B, K] -> [B, K]."""
    return generated if generated.dim() == 2 else generated[:, None]


def spin_loss(policy_real, policy_gen, ref_real, ref_gen, beta=0.1, kind="sigmoid"):
    """SPIN (Chen et al., ICML 2024, Eq. 4.7): ℓ(β [r(y) − r(y')]), mean over the K pairs.

    kind "sigmoid": ℓ(u) = −log σ(u), the paper's logistic loss; "hinge": max(0, 1 − u).
    """
    r_real = (policy_real - ref_real)[:, None]                                     # [B, 1]
    r_gen = _per_pair(policy_gen - ref_gen)                                        # [B, K]
    u = beta * (r_real - r_gen)                                                    # [B, K]
    if kind == "sigmoid":
        return -F.logsigmoid(u).mean()
    if kind == "hinge":
        return torch.relu(1 - u).mean()
    raise ValueError(f"spin_loss: kind must be 'sigmoid' or 'hinge', got {kind!r}")


def space_loss(policy_real, policy_gen, ref_real, ref_gen, mu=None, beta=1.0):
    """SPACE (Wang et al., NeurIPS 2025), noise contrastive estimation with μ noise per real:

        −log σ(β r(y) − log μ) − (μ/K) Σ_k log σ(log μ − β r(y'_k)),    μ = K when mu is None.

    The real and generated terms are separate functions of their own rewards: the pushes are
    absolute, not on the gap. F.logsigmoid keeps large |r| finite.
    """
    r_real = policy_real - ref_real                                                # [B]
    r_gen = _per_pair(policy_gen - ref_gen)                                        # [B, K]
    K = r_gen.shape[1]
    mu = K if mu is None else mu
    log_mu = math.log(mu)
    real_term = -F.logsigmoid(beta * r_real - log_mu)                              # [B]
    gen_term = -(mu / K) * F.logsigmoid(log_mu - beta * r_gen).sum(dim=1)          # [B]
    return (real_term + gen_term).mean()


def ipo_loss(policy_real, policy_gen, ref_real, ref_gen, len_real, len_gen, beta=0.1):
    """Self-play IPO (Azar et al., 2024, the IPO objective with y' as the rejected response):
    (Δ − 1/(2β))², Δ = per-token-mean log-ratio of y minus that of y'. Mean over pairs and batch."""
    ratio_real = ((policy_real - ref_real) / len_real)[:, None]                    # [B, 1]
    ratio_gen = _per_pair((policy_gen - ref_gen) / len_gen)                        # [B, K]
    return ((ratio_real - ratio_gen) - 1 / (2 * beta)).pow(2).mean()


def simpo_loss(policy_real, policy_gen, len_real, len_gen, beta=2.0, gamma=0.5):
    """Self-play SimPO (Meng et al., 2024): −log σ(β s̄(y) − β s̄(y') − γ), s̄ = s / |y|.

    No reference model: the per-token mean log-prob is the reward, γ a target margin.
    """
    mean_real = (policy_real / len_real)[:, None]                                  # [B, 1]
    mean_gen = _per_pair(policy_gen / len_gen)                                     # [B, K]
    return -F.logsigmoid(beta * (mean_real - mean_gen) - gamma).mean()


@torch.no_grad()
def reward_metrics(policy_real, policy_gen, ref_real, ref_gen):
    """Logged numbers: mean rewards r(y), r(y'), their margin, and the fraction of prompts whose
    real response out-scores every generated one (1.0 means the player tells them apart).
    0-d tensors, so a trainer can read them back once per step rather than once per call."""
    r_real = (policy_real - ref_real).float()                                      # [B]
    r_gen = _per_pair(policy_gen - ref_gen).float()                                # [B, K]
    return {
        "rewards/real": r_real.mean(),
        "rewards/generated": r_gen.mean(),
        "rewards/margin": (r_real[:, None] - r_gen).mean(),
        "accuracy": (r_real[:, None] > r_gen).all(dim=1).float().mean(),
    }
