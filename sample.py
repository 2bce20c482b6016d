"""
Sampling from the Mistral transformer of model.py: a KV cache, batched prefill and decode, and
temperature / top-k / top-p sampling. Self-play spends most of its time here (K responses for
every prompt, every iteration), so the loop is written to stay on the device.

    from sample import generate
    replies = generate(model, [ids_a, ids_b], max_new_tokens=256, temperature=0.7, top_p=0.9,
                       eos_id=model.args.eos_id, seed=0)   # new tokens only, eos kept
    samples = generate(model, prompts, 256, num_samples=4, seed=0)  # 4 replies a prompt, prompt-major; one prefill each

Chat with a checkpoint from the command line (the prompt is rendered with its own chat template, or
zephyr's where it has none, and the reply stops at any of its end-of-turn tokens):

    python sample.py --model path/to/zephyr-7b-sft-full --prompt "What is a KV cache?"
    python sample.py --model path/to/SmolLM2-135M-Instruct --prompt "Capital of France?" --temperature 0
    python sample.py --model path/to/Qwen3-0.6B --prompt "Hi" --chat-template-arg enable_thinking=false
    python sample.py --model out/ckpt --prompt "Once upon a time" --raw --temperature 0 --max-new-tokens 64
    python sample.py --model out/ckpt --prompt "Hi" --device cuda --dtype bfloat16 --seed 0

How a batch of prompts of different lengths is laid out: prompts are left-padded to the longest,
so every row's next token sits in the same cache slot and one decode step serves the whole
batch. Positions are per row (a row's first real token is position 0, as if it were alone), and
a padding mask keeps real tokens from ever seeing the pads. The cache holds every slot; the
sliding window is applied by the mask during prefill and by handing attention only the last W
slots while decoding, so a step costs O(min(S, W)) and not O(max length).

This file needs torch, tqdm and model.py; the command line also imports tokenizer.py.
"""
import argparse
import sys

import torch
import torch.nn as nn
from tqdm import tqdm

from model import ModelArgs, Transformer, causal_mask, load_model


# -----------------------------------------------------------------------------
# KV cache

class KVCache(nn.Module):
    """Keys and values of every layer in two preallocated buffers [L, B, n_kv, max_len, hd].

    `length` counts the slots filled by earlier steps. A model forward over T new tokens calls
    update() once per layer, each writing slots [length, length + T); the caller then advances
    `length` (prefill and decode_one below do). Slot indices are host-side ints, so slicing the
    buffers never waits for the device.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        super().__init__()
        shape = (args.n_layers, batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.args = args
        self.window = args.sliding_window
        self.length = 0

    def span(self, T: int) -> tuple[int, int]:
        """The slots [start, end) that the queries of the next T tokens may need.

        With left padding every row's newest token shares one slot, so the sliding window is the
        same slot range for all rows: a query in slot s sees at most slots s-W+1 .. s. Handing
        attention only that range is exact, and keeps a decode step O(W) once S > W."""
        end = self.length + T
        start = 0 if self.window is None else max(0, self.length - self.window + 1)
        return start, end

    def update(self, layer_id: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k, v [B, n_kv, T, hd]; return the cached ones of span(T): [B, n_kv, S', hd]."""
        start, end = self.span(k.shape[2])
        self.k[layer_id, :, :, self.length:end] = k
        self.v[layer_id, :, :, self.length:end] = v
        # views, not copies: a slice along the slot dimension keeps hd contiguous, which SDPA needs
        return self.k[layer_id, :, :, start:end], self.v[layer_id, :, :, start:end]

    def repeat_rows(self, K: int, max_len: int) -> "KVCache":
        """A new cache of K copies of every row (row b -> rows bK .. bK+K-1), with room for max_len slots.

        K samples of one prompt share its keys and values up to the prompt's end, so the prompt is
        run through the model once and its cache rows copied, instead of K identical prefills. The
        copy is written through a [L, B, K, ...] view of the new buffers: no repeat_interleave
        temporary of the full size."""
        L, B, n_kv, S, hd = self.k.shape
        new = KVCache(self.args, B * K, max_len, dtype=self.k.dtype, device=self.k.device)
        for mine, theirs in ((self.k, new.k), (self.v, new.v)):
            theirs.view(L, B, K, n_kv, max_len, hd)[..., :self.length, :] = mine[:, :, None, :, :self.length]
        new.length = self.length
        return new


# -----------------------------------------------------------------------------
# Prefill and decode

def lm_head(model: Transformer) -> torch.Tensor:
    """The output projection as a contiguous [d, V] matrix, copied once per generate call.

    At small batch a decode step is a matrix-vector product with every weight, and the LM head is
    the biggest (32000 x d). nn.Linear stores it [V, d], which makes the product 32000 short dot
    products; CPU BLAS streams the [d, V] layout about twice as fast (32000 x 256 fp32 at batch 1 on
    a 2-core EPYC: 0.9 ms against 1.9 ms; from batch 16 on the two are within 15% either way, and
    GPUs do not care). The copy costs V*d memory (262 MB for Mistral-7B in bf16) during one call."""
    return model.output.weight.t().contiguous()


def prefill(model: Transformer, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
            mask: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Run the left-padded prompts tokens [B, P] through the model, filling cache slots 0..P-1.
    Returns the logits of the next token [B, V]; head is lm_head(model) [d, V]."""
    h = model(tokens, positions=positions, mask=mask, cache=cache, return_hidden=True)  # [B, P, d]
    cache.length += tokens.shape[1]
    # only the last slot's logits are needed: skips a [B, P, V] product with the LM head
    return h[:, -1] @ head


def decode_one(model: Transformer, cache: KVCache, token: torch.Tensor, positions: torch.Tensor,
               key_valid: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """One step: token [B] at per-row positions [B] -> logits of the token after it [B, V].

    key_valid [B, max_len] marks the cache slots that hold real tokens (not left padding). Causality
    and the window are already enforced by which slots the cache hands back (KVCache.span), so the
    step's mask [B, 1, 1, S'] is a slice of key_valid: no mask is built inside the loop."""
    start, end = cache.span(1)
    mask = key_valid[:, None, None, start:end]
    h = model(token[:, None], positions=positions[:, None], mask=mask, cache=cache, return_hidden=True)
    cache.length += 1
    return h[:, -1] @ head  # [B, d] @ [d, V]


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row from logits [B, V] -> [B]; temperature 0 is greedy.

    Inverse-CDF sampling: one uniform u per row, and the token is the first whose cumulative
    probability exceeds u. That needs B random numbers a step; the exponential (Gumbel-max) trick
    needs B x V, and on a CPU drawing them costs more than the LM head itself (at batch 32 and
    V = 32000, torch's exponential_ took twice as long as the 32 x 256 x 32000 product). Like that
    trick, and unlike torch.multinomial, nothing is read back to the host: searchsorted runs on the
    device. The running sum is fp64: in fp32 each token's share of it would be rounded to an ulp of
    the total (6e-8), coarser than the tail probabilities of a 32k vocabulary at temperature 1."""
    logits = logits.float()  # fp32 island: a bf16 softmax over 32k tokens loses the tail
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [B, V]
    if top_p < 1.0:
        # nucleus: keep the most likely tokens until their mass reaches top_p; the mass *before*
        # a token decides, so the most likely token always stays
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    cdf = probs.double().cumsum_(-1)                                                   # [B, V]
    u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device, generator=generator)
    # u < 1, so u * total stays below the total: the first cdf entry above it is a token of nonzero
    # probability (a filtered token adds nothing, so its entry equals the one before it)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)


def decode(model: Transformer, cache: KVCache, logits: torch.Tensor, positions: torch.Tensor,
           key_valid: torch.Tensor, head: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int,
           top_p: float, stop: torch.Tensor | None, generator: torch.Generator | None, progress: bool = False,
           check_every: int = 8) -> torch.Tensor:
    """Sample up to max_new_tokens after the prefill's logits [B, V]; positions [B] is each row's
    position for its first new token. stop [S]: the end-of-turn ids. Returns the new tokens [B, n];
    rows that finished emit stop[0] from then on (generate trims them). Whether every row is done is read back only every
    `check_every` steps, the loop's one host synchronisation."""
    B = logits.shape[0]
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=logits.device)  # [B, N]
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    positions = positions.clone()
    with tqdm(total=max_new_tokens, disable=not progress, unit="tok", leave=False) as bar:
        for i in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, generator)  # [B]
            if stop is not None:
                token = token.masked_fill(done, stop[0])
                done |= torch.isin(token, stop)
            out[:, i] = token
            bar.update(1)
            if i + 1 == max_new_tokens:
                break
            if stop is not None and (i + 1) % check_every == 0 and done.all():
                break
            logits = decode_one(model, cache, token, positions, key_valid, head)
            positions += 1
    return out[:, :i + 1]


# -----------------------------------------------------------------------------
# generate: the entry point

def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, eos_id: int | set[int] | None = None, seed: int | None = None,
             num_samples: int = 1, progress: bool = False) -> list[list[int]]:
    """Continue every prompt (a list of token ids) by up to max_new_tokens sampled tokens.

    Returns the new tokens only, one list per prompt. A row stops after it emits eos_id, or any id of
    a set of them (a chat model's end-of-turn tokens; the one it emitted is kept); the others go on, and the loop ends early once every row has stopped. temperature 0 is
    greedy; top_k 0 and top_p 1 switch those filters off. With a seed the draws come from a private
    torch.Generator on the model's device, so the same seed gives the same samples and the global
    RNG is left untouched; with seed None they come from the global RNG.

    num_samples K > 1 draws K replies per prompt, returned flat and prompt-major (prompt 0's K
    replies, then prompt 1's, ...): the layout, and with a seed the very samples, of a call with
    each prompt repeated K times. The difference is the cost: each prompt is prefilled once and its
    cache rows copied K times (self-play draws K samples of every prompt, every iteration).
    """
    args = model.args
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token (e.g. BOS)")
        if len(p) + max_new_tokens > args.max_seq_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                             f"{len(p) + max_new_tokens} > the model's max_seq_len {args.max_seq_len}")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got temperature={temperature}, "
                         f"top_k={top_k}, top_p={top_p}")
    if num_samples < 1:
        raise ValueError(f"need num_samples >= 1, got {num_samples}")
    K = num_samples
    if not prompts or max_new_tokens <= 0:
        return [[] for _ in range(len(prompts) * K)]

    weight = model.output.weight
    device, dtype = weight.device, weight.dtype
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop_ids = sorted({eos_id} if isinstance(eos_id, int) else eos_id or ())
    stop = torch.tensor(stop_ids, device=device) if stop_ids else None                     # [S]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            # left padding: row b's real tokens fill slots pad[b] .. P-1, its new tokens slots P, P+1, ...
            B, P = len(prompts), max(len(p) for p in prompts)
            lengths = torch.tensor([len(p) for p in prompts], device=device)                   # [B]
            tokens = torch.zeros(B, P, dtype=torch.long)
            for b, p in enumerate(prompts):
                tokens[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
            tokens = tokens.to(device)                                                         # [B, P]
            max_len = P + max_new_tokens
            slots = torch.arange(max_len, device=device)                                       # [S]
            key_valid = slots[None, :] >= (P - lengths)[:, None]                               # [B, S]

            # prefill mask [B, 1, P, P]: causal + window on the rows' own positions, no real token
            # sees a pad, and each pad sees itself. A query that sees no key at all has no defined
            # softmax (NaN in some SDPA backends and torch versions; 0 in torch 2.13 on CPU), and a
            # NaN in a pad's values would reach real queries through 0 * NaN in the weighted sum.
            positions = slots[None, :P] - (P - lengths)[:, None]                               # [B, P]; pads < 0
            mask = causal_mask(positions, positions, args.sliding_window)
            mask &= key_valid[:, None, :P] | torch.eye(P, dtype=torch.bool, device=device)
            head = lm_head(model)                                                              # [d, V]

            # K > 1: prefill the B prompts into a cache of just their P slots, then give every
            # sample its own copy of its prompt's rows (and logits) to decode into. Row b*K + k is
            # prompt b's k-th sample, the row a call with each prompt repeated K times would use,
            # so the same seed draws the same noise for it.
            cache = KVCache(args, B, P if K > 1 else max_len, dtype=dtype, device=device)
            logits = prefill(model, cache, tokens, positions, mask[:, None], head)             # [B, V]
            if K > 1:
                cache = cache.repeat_rows(K, max_len)                                          # [.., B*K, ..]
                logits, lengths, key_valid = (x.repeat_interleave(K, dim=0) for x in (logits, lengths, key_valid))
            out = decode(model, cache, logits, lengths, key_valid, head, max_new_tokens, temperature, top_k,
                         top_p, stop, generator, progress)                                     # [B*K, n]
    finally:
        model.train(was_training)

    rows = out.tolist()
    ends = [next((i for i, t in enumerate(r) if t in stop_ids), len(r) - 1) for r in rows]
    return [r[:end + 1] for r, end in zip(rows, ends)]


# -----------------------------------------------------------------------------
# Command line: chat with a checkpoint

def main(argv=None):
    from tokenizer import Tokenizer, add_template_flags, parse_template_args  # only the command line needs it
    parser = argparse.ArgumentParser(description="Sample a reply from a checkpoint (Hugging Face or Mistral folder).")
    parser.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors, or params.json)")
    parser.add_argument("--prompt", required=True, help="the user message (or, with --raw, the text to continue)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model, tokenizer.json or a folder; default MODEL's")
    add_template_flags(parser)
    parser.add_argument("--raw", action="store_true", help="continue the plain text instead of a chat turn")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass; 1 = off")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = off")
    parser.add_argument("--seed", type=int, default=None, help="fix the draws (default: the global RNG)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the model runs")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights and KV cache dtype (sampling is fp32 regardless)")
    cli = parser.parse_args(argv)

    try:
        tok = Tokenizer(cli.tokenizer or cli.model, cli.chat_template, parse_template_args(cli.chat_template_arg))
    except (ValueError, OSError, ImportError) as e:
        parser.error(str(e))
    model = load_model(cli.model, dtype=getattr(torch, cli.dtype), device=cli.device)
    # the prompt as training makes it (data.encode_prompt): the template, then the tokenizer's special tokens
    text = cli.prompt if cli.raw else tok.render([{"role": "user", "content": cli.prompt}], add_generation_prompt=True)
    ids = tok.encode(text, bos=True)
    # generate refuses a request that does not fit, since a silent cut inside training would be a
    # bug; here a person asked for "a reply", so give them as much of one as the model can hold.
    # A prompt with no room for one new token is still refused, by generate's own message.
    room = model.args.max_seq_len - len(ids)
    n = cli.max_new_tokens if room < 1 else min(cli.max_new_tokens, room)
    if n < cli.max_new_tokens:
        print(f"sample.py: the prompt has {len(ids)} tokens and the model holds {model.args.max_seq_len} "
              f"(max_seq_len), so at most {n} new tokens instead of {cli.max_new_tokens}", file=sys.stderr)
    try:
        # the bar only on a terminal: piped or redirected, the output is the reply and nothing else
        [reply] = generate(model, [ids], n, temperature=cli.temperature, top_p=cli.top_p, top_k=cli.top_k,
                           eos_id=tok.end_of_turn_ids, seed=cli.seed, progress=sys.stderr.isatty())
    except ValueError as e:  # a prompt too long for the model, or a bad sampling setting
        parser.error(str(e))
    if reply and reply[-1] in tok.end_of_turn_ids:  # where it stopped (data.decode_response's rule)
        reply = reply[:-1]
    print(tok.decode(reply, continuation=True))  # decoded as a continuation of the prompt


if __name__ == "__main__":
    main()
