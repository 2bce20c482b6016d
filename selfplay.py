"""
The self-play round of iteration t: what the frozen opponent θ_t does before θ is trained on it
(step 1 of both papers' Algorithm 1), and the held-out evaluation that uses the same machinery.

    records, changed = self_play_round(policy, scorer, tok, chats, cfg, t, rank, world, stop)

At paper scale this round is the expensive and fragile part of an iteration: 50k prompts × K samples
of up to 256 tokens, then every response scored by θ_t. So:

- The prompts are cut into chunks of --gen-batch. Chunk c draws its samples from its own seed, so the
  samples do not depend on which rank drew them or on how many ranks there are. The chunks still to
  do are dealt out round robin, and each finished chunk is written at once, atomically, as
  OUT/iter_t/selfplay.part-0000c.jsonl. A run killed mid-round resumes with only the missing chunks;
  rank 0 then merges the parts, in chunk order, into selfplay.jsonl and removes them. The merged file
  is byte for byte the one an uninterrupted run writes, whatever the moment of the kill and the
  number of ranks.
- With --mix-previous N, iteration t also trains on the samples drawn in iterations t-N .. t-1 for the
  same prompts (SPIN's own configs do this). Their stored reference scores are an older opponent's;
  r(y) = s_θ(y) - s_θt(y) needs θ_t's, so they are re-scored in the chunk of their prompt, which makes
  the re-scoring resumable too. Every record says which iteration's model drew it ("drawn_by").
- Scoring sorts a chunk's 1 + K sequences per prompt by length and packs them into batches of at most
  --score-tokens padded tokens, instead of one prompt per forward pass.

Across nodes OUT must be a shared filesystem: the parts are written by the rank that drew them and
merged by rank 0.
"""
import glob
import os

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from parallel import from_rank0, to_device
from sample import generate
from space import sequence_logprobs


# -----------------------------------------------------------------------------
# Scoring: s(y|x) of many sequences, batched by length


@torch.no_grad()
def score(model, seqs, pad_id, max_tokens=16384) -> list[float]:
    """s(y|x) of each (ids, loss_mask) sequence: the summed log-prob of its response tokens.

    The sequences are sorted longest first and cut into batches of at most max_tokens padded tokens
    (B x T), so a short response never pays for a long one's padding and a forward pass is as large
    as the budget allows. The batches depend on seqs alone, so the scores do not depend on how the
    work is split across ranks. Runs under whatever autocast the caller has entered: θ_t must be
    scored in the precision that training computes s_θ in, so that r(y) = 0 at θ = θ_t."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))  # stable: ties keep their order
    weight = model.output.weight
    out = [0.0] * len(seqs)
    i = 0
    while i < len(order):
        T = len(seqs[order[i]][0]) - 1                 # the batch's longest (first) sequence sets its width
        idx = order[i:i + max(1, max_tokens // T)]
        tokens, targets, mask = (to_device(t, weight.device) for t in data.collate([seqs[j] for j in idx], pad_id))
        hidden = model(tokens, return_hidden=True)     # [b, T, d]
        for j, s in zip(idx, sequence_logprobs(hidden, weight, targets, mask).tolist()):
            out[j] = s
        i += len(idx)
    return out


# -----------------------------------------------------------------------------
# Chunks of work over the ranks


def chunked(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def rounds(todo, world) -> list[list]:
    """todo dealt round robin over the ranks, one round of `world` items at a time: round r gives rank
    i its item r·world + i. Every rank goes through the same rounds, so a collective can be asked at
    the start of each: stop(), whether any rank was told to stop (train.py), ends the rounds there on
    every rank alike, where a rank that left alone would leave the others waiting in their next one."""
    return [todo[r:r + world] for r in range(0, len(todo), world)]


def map_chunks(items, size, fn, rank, world, desc, stop=None):
    """fn(c, chunk c of items) for every chunk, chunk c on rank c % world; every rank gets all results,
    in order, or None on every rank where stop() said so between two rounds. Used where the results
    are small and need no saving (evaluation)."""
    chunks = chunked(items, size)
    mine = []
    for round_ in tqdm(rounds(list(range(len(chunks))), world), desc=desc, disable=rank != 0, leave=False):
        if stop is not None and stop():
            return None
        if rank < len(round_):
            c = round_[rank]
            mine.append((c, fn(c, chunks[c])))
    if dist.is_initialized():
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        mine = [x for r in everyone for x in r]
    return [y for _, ys in sorted(mine, key=lambda cy: cy[0]) for y in ys]


# -----------------------------------------------------------------------------
# The round


def part_path(folder, c):
    return os.path.join(folder, f"selfplay.part-{c:05d}.jsonl")


def _text_ids(ids, tok):
    return ids[:-1] if ids and ids[-1] in tok.end_of_turn_ids else ids


def reencoded_share(records, t) -> float | None:
    """The share of the responses iteration t drew whose stored text re-encodes to other ids than were
    sampled (each record's "reencoded_changed", one flag a generated response); None if it drew none.
    Read from the records, so a round resumed from its parts reports what an uninterrupted one does."""
    flags = [f for r in records if r["drawn_by"] == t for f in r.get("reencoded_changed", [])]
    return sum(flags) / len(flags) if flags else None


def previous_samples(cfg, t, n_prompts) -> list[list[dict]]:
    """For each prompt, the records drawn for it in iterations t-N .. t-1 (N = --mix-previous), oldest
    first. Iteration s's own draws are the records of iter_s/selfplay.jsonl with drawn_by == s, in
    prompt order."""
    reused = [[] for _ in range(n_prompts)]
    for s in range(max(0, t - cfg.mix_previous), t):
        path = os.path.join(cfg.out, f"iter_{s}", "selfplay.jsonl")
        drawn = [r for r in data.load_selfplay(path) if r["drawn_by"] == s]
        if len(drawn) != n_prompts:
            raise ValueError(f"{path}: {len(drawn)} records drawn by iteration {s}, but the self-play set has "
                             f"{n_prompts} prompts; --mix-previous reuses samples of the same prompts, so the "
                             "data and its flags must not change within a run")
        for i, r in enumerate(drawn):
            reused[i].append(r)
    return reused


def self_play_round(policy, scorer, tok, chats, cfg, t, rank, world, stop=None) -> tuple[list[dict] | None, float | None]:
    """Step 1 of the algorithm for iteration t: K samples per prompt from θ_t (policy), the reused
    samples of earlier iterations, and θ_t's reference scores of every response (scorer(seqs) -> s_θt
    of each (ids, loss_mask), computed as training computes s_θ; `score` above does the work).
    Returns every record iteration t trains on, on every rank (OUT/iter_t/selfplay.jsonl holds them),
    and the share of the responses drawn in iteration t whose stored text re-encodes to other ids than
    were sampled (reencoded_share). Byte-level BPE can do that: a split the tokenizer would not make,
    or a character cut at the length limit. Training uses the re-encoded ids.
    stop() is asked before each round of chunks (see rounds); where it says so the round ends there and
    (None, None) is returned: the chunks done are on disk, and a resumed run draws the others."""
    folder = os.path.join(cfg.out, f"iter_{t}")
    final = os.path.join(folder, "selfplay.jsonl")

    def merged_already():  # a resumed run: the round was merged (a kill may have left some parts behind)
        if not os.path.exists(final):
            return None
        for leftover in glob.glob(part_path(folder, 0).replace("00000", "*")):
            os.remove(leftover)
        return data.load_selfplay(final)
    records = from_rank0(merged_already)
    if records is not None:
        return records, reencoded_share(records, t)
    K = cfg.samples_per_prompt
    prompts = chunked([data.split_chat(ch["messages"]) for ch in chats], cfg.gen_batch)
    reused = chunked(from_rank0(lambda: previous_samples(cfg, t, len(chats))), cfg.gen_batch)
    os.makedirs(folder, exist_ok=True)
    todo = from_rank0(lambda: [c for c in range(len(prompts)) if not os.path.exists(part_path(folder, c))])
    if rank == 0:
        reuse = f"; reusing the samples of iterations {max(0, t - cfg.mix_previous)}..{t - 1}" if t and cfg.mix_previous else ""
        print(f"iteration {t}: generating {len(todo)} of {len(prompts)} chunks ({len(prompts) - len(todo)} already "
              f"on disk){reuse}", flush=True)
    for round_ in tqdm(rounds(todo, world), desc=f"generate iter {t}", disable=rank != 0, leave=False):
        if stop is not None and stop():
            return None, None
        if rank >= len(round_):
            continue
        c = round_[rank]
        ids = [data.encode_prompt(tok, p, cfg.max_prompt)[0] for p, _ in prompts[c]]
        # one seed per chunk of prompts: the same samples whatever the number of ranks; one prefill
        # per prompt, its cache rows copied K times, so the replies come prompt-major
        out = generate(policy, ids, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                       eos_id=tok.end_of_turn_ids, seed=cfg.seed * 1_000_003 + t * 10_007 + c, num_samples=K)
        texts = [data.decode_response(tok, o) for o in out]
        # does the stored text give back the sampled ids (its end-of-turn token aside)? kept with the record
        changed = [_text_ids(data.encode_response(tok, prompts[c][j // K][0], y), tok) != _text_ids(drawn, tok)
                   for j, (drawn, y) in enumerate(zip(out, texts))]
        new = [{"messages": p, "real": y, "generated": texts[j * K:(j + 1) * K], "drawn_by": t,
                "reencoded_changed": changed[j * K:(j + 1) * K]} for j, (p, y) in enumerate(prompts[c])]
        old = [{k: r[k] for k in ("messages", "real", "generated", "drawn_by")} for rs in reused[c] for r in rs]
        part = new + old
        seqs = [data.encode_example(tok, r["messages"], y, cfg.max_prompt, cfg.max_length)[:2]
                for r in part for y in [r["real"]] + r["generated"]]
        s = scorer(seqs)
        for i, r in enumerate(part):
            r["ref_real"], r["ref_generated"] = s[i * (K + 1)], s[i * (K + 1) + 1:(i + 1) * (K + 1)]
        data.save_jsonl(part_path(folder, c), part)
    if dist.is_initialized():
        dist.barrier()  # every part written before rank 0 merges them

    def merge():
        merged = [r for c in range(len(prompts)) for r in data.load_selfplay(part_path(folder, c))]
        data.save_jsonl(final, merged)  # atomic: a kill leaves the parts, or the merged file
        for c in range(len(prompts)):
            os.remove(part_path(folder, c))
        return merged
    records = from_rank0(merge)
    return records, reencoded_share(records, t)


# -----------------------------------------------------------------------------
# Evaluation and what the model says


def evaluate(policy, scorer, tok, chats, cfg, rank, world, exact: bool, stop=None) -> dict | None:
    """Greedy exact match (demo task only) and the log-likelihood of the held-out real responses, per
    response and per token (on real data response lengths differ by 100x, so the per-response mean is
    dominated by the long ones). None where stop() ended it between two rounds of chunks: nothing of it
    is kept, a resumed run evaluates again."""
    def work(c, part):
        prompts = [data.split_chat(ch["messages"]) for ch in part]
        seqs = [data.encode_example(tok, p, y, cfg.max_prompt, cfg.max_length)[:2] for p, y in prompts]
        logp = scorer(seqs)
        n = [sum(m) for _, m in seqs]
        if not exact:
            return [(0.0, s, k) for s, k in zip(logp, n)]
        ids = [data.encode_prompt(tok, p, cfg.max_prompt)[0] for p, _ in prompts]
        out = generate(policy, ids, cfg.max_new_tokens, temperature=0.0, eos_id=tok.end_of_turn_ids)
        hits = [float(data.exact_match(data.decode_response(tok, o), y)) for o, (_, y) in zip(out, prompts)]
        return list(zip(hits, logp, n))
    results = map_chunks(chats, cfg.gen_batch, work, rank, world, "evaluate", stop)
    if results is None:
        return None
    out = {"eval/heldout_logp": sum(s for _, s, _ in results) / len(results),
           "eval/heldout_logp_token": sum(s for _, s, _ in results) / max(1, sum(n for _, _, n in results))}
    if exact:  # exact match only means something on the demo task
        out["eval/accuracy"] = sum(h for h, _, _ in results) / len(results)
    return out


def greedy_samples(policy, tok, chats, cfg, n=8) -> list[dict]:
    """θ_t's greedy replies to the first n held-out prompts: what each iteration does to the model, in
    words. Written to OUT/iter_t/samples.jsonl."""
    prompts = [data.split_chat(ch["messages"]) for ch in chats[:n]]
    ids = [data.encode_prompt(tok, p, cfg.max_prompt)[0] for p, _ in prompts]
    room = policy.args.max_seq_len - max(len(x) for x in ids)
    out = generate(policy, ids, min(cfg.max_new_tokens, room), temperature=0.0, eos_id=tok.end_of_turn_ids)
    return [{"messages": p, "real": y, "reply": data.decode_response(tok, o)} for (p, y), o in zip(prompts, out)]
