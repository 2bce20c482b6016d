"""
GEM against cross-entropy (Li et al., ICLR 2025): does the diversity-preserving SFT loss give a more
diverse θ_0, does that diversity pay off under sampling, and does it help self-play afterwards?

    python studies/gem.py --sft-epochs 128          # θ_0 as studies/plateau.py's (set A = 1,000 chats, 128 epochs)
    python studies/gem.py --sft-epochs 2 --train-size 256 --seeds 0 --iterations 1 --prompts 20 --out out/gem_quick  # smoke test

1. θ_0 from scratch on set A (the first --train-size chats of the demo's SFT split), the same data,
   epochs and steps for every loss: --sft-loss ce (studies/plateau.py's cached θ_0), --sft-loss gem with
   h linear (GEM's default, β = 0.7) and, with --variants linear logsigmoid, h logsigmoid too.
2. Each θ_0 answers the first --prompts held-out prompts 16 times at temperature 1 (sample.generate,
   seeded with the run's seed) and once greedily. Per prompt: the number of distinct answers (answers
   compared as exact_match compares them), distinct-1 and distinct-2 (distinct word n-grams over all
   n-grams of its 16 answers), pass@k for k = 1, 4, 16 (the unbiased estimator of Chen et al. 2021,
   1 − C(n−c, k) / C(n, k), n = 16, c correct by data.exact_match), majority-vote accuracy (the most
   frequent answer; ties go to the one drawn first) and greedy accuracy; all averaged over prompts.
   Over all sampled tokens: the mean entropy (nats) of the model's next-token distribution at the
   position that drew the token.
3. SPACE from each θ_0 on set A (--selfplay-from sft), --iterations iterations of 1 epoch, K = 1:
   greedy exact match and held-out per-token log-likelihood per iteration. The CE row is
   studies/plateau.py's SPACE run, reused when its folder is there.

Sized for 2 CPU cores: 100 prompts x 16 samples per θ_0, runs (and the sampling of each θ_0, as a
subprocess: `python studies/gem.py --diversity DIR --seed S`) two at a time on one thread each; the
CE θ_0 and its SPACE runs are studies/plateau.py's when they are cached. It writes OUT/gem.md and OUT/gem.png, without timings, so a rerun on the same machine regenerates them
byte for byte (copied to studies/results/ when --out is the default); another CPU may differ in the
last digits.
"""
import argparse
import collections
import json
import math
import os
import sys
import time

import runs

SAMPLES = 16


def pass_at_k(n, c, k):
    """Chen et al. 2021, eq. 1: the chance that k of the n samples, drawn without replacement, hold a
    correct one."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def distinct_n(answers, n):
    grams = [tuple(w[i:i + n]) for w in (a.split() for a in answers) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def diversity(folder, seed, n_prompts, train_size):
    """Sample folder/iter_0 on the held-out prompts and write folder/diversity_pN.json (one thread)."""
    import torch
    import data
    from model import load_model
    from sample import generate
    from tokenizer import Tokenizer
    torch.set_num_threads(1)
    model = load_model(os.path.join(folder, "iter_0")).eval()
    tok = Tokenizer(os.path.join(folder, "iter_0", "tokenizer.model"))
    # the held-out split is drawn first, so it is the same whatever the other splits' sizes
    chats = data.demo_splits(0, train_size, train_size, 300)["test"][:n_prompts]
    prompts = [data.split_chat(c["messages"]) for c in chats]
    ids = [data.encode_prompt(tok, p, 48)[0] for p, _ in prompts]
    greedy = generate(model, ids, 24, temperature=0.0, eos_id=tok.eos_id)
    rows = [p for p in ids for _ in range(SAMPLES)]
    drawn, entropy, n_tokens = [], 0.0, 0
    for i in range(0, len(rows), 256):  # chunks of 256 rows, each from its own seed
        chunk = rows[i:i + 256]
        out = generate(model, chunk, 24, temperature=1.0, eos_id=tok.eos_id, seed=seed * 1_000_003 + i)
        drawn += out
        with torch.no_grad():  # the entropy of p(. | x, y_<t) at every sampled token y_t
            for p, y in zip(chunk, out):
                logits = model(torch.tensor([p + y[:-1]]))[0, len(p) - 1:]                 # [len(y), V]
                logp = torch.log_softmax(logits.float(), -1)
                entropy += float(-(logp.exp() * logp).sum())
                n_tokens += len(y)
    metrics = collections.defaultdict(float)
    for j, (_, real) in enumerate(prompts):
        answers = [" ".join(data.decode_response(tok, y).split()) for y in drawn[j * SAMPLES:(j + 1) * SAMPLES]]
        c = sum(data.exact_match(a, real) for a in answers)
        vote = collections.Counter(answers).most_common(1)[0][0]
        for name, v in (("distinct answers", len(set(answers))), ("distinct-1", distinct_n(answers, 1)),
                        ("distinct-2", distinct_n(answers, 2)), ("pass@1", pass_at_k(SAMPLES, c, 1)),
                        ("pass@4", pass_at_k(SAMPLES, c, 4)), ("pass@16", pass_at_k(SAMPLES, c, 16)),
                        ("majority vote", float(data.exact_match(vote, real))),
                        ("greedy", float(data.exact_match(data.decode_response(tok, greedy[j]), real)))):
            metrics[name] += v / len(prompts)
    metrics["entropy (nats/token)"] = entropy / n_tokens
    with open(os.path.join(folder, f"diversity_p{n_prompts}.json"), "w") as f:
        json.dump(metrics, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = os.path.join(runs.ROOT, "out", "gem")
    p.add_argument("--out", default=default_out)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-size", type=int, default=1000, help="set A: SFT and self-play chats")
    p.add_argument("--sft-epochs", type=int, help="θ_0's SFT epochs (studies/plateau.py's plateau)")
    p.add_argument("--variants", nargs="+", default=["linear"], choices=["linear", "logsigmoid"], help="GEM's h")
    p.add_argument("--prompts", type=int, default=100, help="held-out prompts sampled 16 times each")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--cache", default=os.path.join(runs.ROOT, "out", "theta0"),
                   help="θ_0 run folders (the default is shared with plateau.py and mu.py, whose SPACE run is reused)")
    p.add_argument("--note", help="a caveat printed under the command line in OUT/gem.md")
    p.add_argument("--selfplay-seeds", type=int, nargs="+", help="seeds of the SPACE runs (default: --seeds)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--diversity", help=argparse.SUPPRESS)  # the subprocess: sample one θ_0 run folder
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.diversity:
        return diversity(args.diversity, args.seed, args.prompts, args.train_size)
    if args.sft_epochs is None:
        p.error("--sft-epochs is required")
    os.makedirs(args.out, exist_ok=True)
    print(runs.cpu(), "|", runs.load(), flush=True)
    t0 = time.time()
    cache = args.cache
    losses = {"CE": ()} | {f"GEM (h {h})": ("--sft-loss", "gem", "--gem-h", h) for h in args.variants}
    folder = {(name, s): runs.theta0_job(cache, args.train_size, args.sft_epochs, s, flags)[0]
              for name, flags in losses.items() for s in args.seeds}
    runs.parallel([(key, *runs.theta0_job(cache, args.train_size, args.sft_epochs, key[1], losses[key[0]]))
                   for key in folder], args.jobs)

    # the sampling of every θ_0, as subprocesses two at a time; one file per prompt count
    def sample(key):
        path = os.path.join(folder[key], f"diversity_p{args.prompts}.json")
        if not os.path.exists(path):
            runs.run([sys.executable, os.path.abspath(__file__), "--diversity", folder[key], "--seed", str(key[1]),
                      "--prompts", str(args.prompts), "--train-size", str(args.train_size)], folder[key] + ".diversity.log")
        with open(path) as f:
            return key, json.load(f)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(args.jobs) as pool:
        div = dict(pool.map(sample, list(folder)))

    jobs, sp_seeds = [], args.selfplay_seeds or args.seeds
    for name, flags in losses.items() if args.iterations else ():  # --iterations 0: θ_0's sampling only
        for s in sp_seeds:
            out = os.path.join(args.out, f"e{args.sft_epochs}",
                               f"space_{name.split()[0].lower()}{'_' + flags[-1] if flags else ''}_seed{s}")
            if not flags and args.cache == p.get_default("cache"):  # the CE row is studies/plateau.py's SPACE run
                plateau = os.path.join(runs.ROOT, "out", "plateau", f"e{args.sft_epochs}", f"space_seed{s}")
                out = plateau if os.path.exists(os.path.join(plateau, "summary.json")) else out
            jobs.append(((name, s), out, ["--model", os.path.join(folder[name, s], "iter_0"), "--method", "space",
                                          "--selfplay-from", "sft", "--train-size", args.train_size, "--selfplay-size",
                                          args.train_size, "--iterations", args.iterations, "--epochs", 1, "--seed", s]))
    done = runs.parallel(jobs, args.jobs)
    results = {name: [done[name, s] for s in sp_seeds] for name in losses} if args.iterations else {}
    elapsed = time.time() - t0

    cmd = f"python studies/gem.py --sft-epochs {args.sft_epochs}" + \
        (" --variants " + " ".join(args.variants) if args.variants != ["linear"] else "") + \
        (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != p.get_default("seeds") else "") + \
        (f" --selfplay-seeds {' '.join(map(str, sp_seeds))}" if args.selfplay_seeds else "") + \
        (f" --iterations {args.iterations}" if args.iterations != p.get_default("iterations") else "") + \
        (f" --train-size {args.train_size}" if args.train_size != p.get_default("train_size") else "") + \
        (f" --prompts {args.prompts}" if args.prompts != p.get_default("prompts") else "") + \
        (f" --cache {os.path.relpath(args.cache, runs.ROOT)}" if args.cache != p.get_default("cache") else "") + \
        ("" if args.out == default_out else " --out " + args.out)
    text = [f"Measured by `{cmd}` (sampling: seeds {args.seeds}; SPACE: seeds {sp_seeds}; set A = the first "
            f"{args.train_size} chats of the demo's SFT split, θ_0 = SFT {args.sft_epochs} epochs on A with each loss; "
            f"{args.prompts} held-out prompts x {SAMPLES} samples at temperature 1; mean ± sd over seeds). CPU: {runs.cpu()}.", ""]
    if args.note:
        text.append(f"Note: {args.note}\n")
    keys = ["distinct answers", "distinct-1", "distinct-2", "entropy (nats/token)", "pass@1", "pass@4", "pass@16",
            "majority vote", "greedy"]
    text.append(runs.table(f"1. θ_0 sampled {SAMPLES} times per prompt (distinct answers: of {SAMPLES})", keys,
                           {name: [[div[name, s][k] for s in args.seeds] for k in keys] for name in losses}, 3))
    header = [f"θ_{t}" for t in range(args.iterations + 1)]
    for key, title, digits in (("eval/accuracy", "exact match on held-out prompts (greedy)", 3),
                               ("eval/heldout_logp_token", "log-likelihood per token of held-out real responses", 4),
                               ("samples/identical", "share of generated responses equal to the real one in the "
                                "iteration that made θ_t", 3)) if args.iterations else ():
        text.append(runs.table(f"2. SPACE from each θ_0, {title}", header, runs.curves(results, key, args.iterations),
                               digits))
    text = "\n".join(text)
    xs = list(range(args.iterations + 1))
    ks = [1, 4, 16]
    panels = [("θ_0: pass@k, held out", "pass@k", {name: [[div[name, s][f"pass@{k}"] for s in args.seeds] for k in ks]
                                                   for name in losses}, ks, "k", "log")]
    if args.iterations:
        panels.append(("SPACE from each θ_0: exact match", "accuracy", runs.curves(results, "eval/accuracy",
                                                                                  args.iterations), xs))
    runs.plot(panels,
              os.path.join(args.out, "gem.png"),
              title="GEM against cross-entropy for θ_0, and SPACE from each")
    runs.write(args.out, default_out, "gem.md", text + "\n", ["gem.png"])
    print(text)
    print(f"{elapsed:.0f} s wall ({elapsed / 60:.1f} min), including runs reused from an earlier call; {runs.load()}")


if __name__ == "__main__":
    main()
