"""
Self-play past the SFT plateau, the papers' own regime: θ_0 is SFT on set A until more epochs stop
helping, then every method self-plays on the same set A (SPIN and SPACE start from zephyr-7b-sft-full,
already fine-tuned on the UltraChat they self-play on).

    python studies/plateau.py                      # everything: seeds 0 1 2 (wall times: README, Results)
    python studies/plateau.py --sft-epochs 16      # the same self-play from θ_0 = SFT 16 epochs (A not yet memorised)
    python studies/plateau.py --seeds 0 --iterations 1 --train-size 256 --sweep 1 2 --out out/plateau_quick  # smoke test

1. The sweep: for each seed, SFT from scratch on set A (the first --train-size chats of the demo's SFT
   split) for E epochs, each E in --sweep, evaluated on the demo's 300 held-out prompts (greedy exact
   match, log-likelihood of the real responses per token). The plateau E is the smallest E after
   which the next E in the sweep raises neither the mean accuracy by more than 0.01 nor the mean
   per-token log-likelihood by more than 0.01 (or --sft-epochs, to fix it).
2. From each seed's plateau θ_0, --iterations self-play iterations on set A itself (--selfplay-from
   sft), 1 epoch per iteration, K = 1, each method at its paper's β: SPACE, SPIN, SPIN reusing the
   previous iteration's samples (--mix-previous 1, SPIN's configs), S-IPO, S-SimPO. The control is
   SFT continued on A (--method sft --selfplay-from sft): the same passes over A, 1 epoch per
   iteration, at the same learning rate. Per iteration: exact match and per-token log-likelihood on
   the held-out prompts, rewards/real and rewards/generated, and the share of generated responses
   that are the real one character for character (such a pair gives no self-play loss a gradient).

Sized for 2 CPU cores: set A is 1,000 chats (a sixth of the demo's SFT split: 16 steps of 64 per epoch,
so the sweep 4, 8, ..., 128 epochs is 4,032 SFT steps per seed) and runs go two at a time on one
thread each. On a loaded machine it takes as long as it gets CPU: the script prints each run's wall
time and the load average. It writes OUT/plateau.md and OUT/plateau.png (OUT/plateau_eE.* with --sft-epochs E),
copied to studies/results/ when --out is the default; they hold no timings, so a rerun on the same
machine regenerates them byte for byte (runs are deterministic for a given seed on one machine;
another CPU may differ in the last digits).
"""
import argparse
import os
import statistics
import time

import runs

METHODS = {  # name in the table -> train.py flags
    "SPACE": ["--method", "space"],
    "SPIN": ["--method", "spin"],
    "SPIN + previous samples": ["--method", "spin", "--mix-previous", 1],
    "S-IPO": ["--method", "ipo"],
    "S-SimPO": ["--method", "simpo"],
    "SFT continued on A": ["--method", "sft"],
}
METRICS = (("eval/accuracy", "Exact match on held-out prompts", 3),
           ("eval/heldout_logp_token", "Log-likelihood per token of held-out real responses", 4),
           ("rewards/real", "rewards/real during the iteration that made θ_t (r(y) = s_θ − s_θt)", 3),
           ("rewards/generated", "rewards/generated during the iteration that made θ_t", 3),
           ("samples/identical", "Share of generated responses equal to the real one (no gradient) in the "
            "iteration that made θ_t", 3))


def last_epoch_loss(folder):
    """The SFT training loss in θ_0's last epoch (mean of its logged steps): how much of set A is left to fit."""
    import json
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r.get("phase") == "sft" and "loss" in r]
    last = max(r["epoch"] for r in rows)
    return statistics.fmean(r["loss"] for r in rows if r["epoch"] == last)


def plateau(sweep, by_epochs):
    """The smallest E whose successor in the sweep improves neither metric by more than 0.01, or None."""
    mean = {e: {k: statistics.fmean(r[0][k] for r in by_epochs[e]) for k in ("eval/accuracy", "eval/heldout_logp_token")}
            for e in sweep}
    for e, nxt in zip(sweep, sweep[1:]):
        if all(mean[nxt][k] - mean[e][k] <= 0.01 for k in mean[e]):
            return e
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = os.path.join(runs.ROOT, "out", "plateau")
    p.add_argument("--out", default=default_out)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-size", type=int, default=1000, help="set A: SFT and self-play chats")
    p.add_argument("--sweep", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128], help="SFT epochs tried for θ_0")
    p.add_argument("--sweep-seeds", type=int, nargs="+", help="the sweep's seeds (default: --seeds)")
    p.add_argument("--sft-epochs", type=int, help="θ_0's epochs (default: the plateau the sweep finds)")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(runs.cpu(), "|", runs.load(), flush=True)
    t0 = time.time()
    cache = os.path.join(runs.ROOT, "out", "theta0")  # θ_0's are shared with mu.py and gem.py

    print("sweep: SFT epochs on set A ...", flush=True)
    sweep_seeds = args.sweep_seeds or args.seeds
    jobs = [((e, s), *runs.theta0_job(cache, args.train_size, e, s)) for e in args.sweep for s in sweep_seeds]
    sft = runs.parallel(jobs, args.jobs)
    by_epochs = {e: [sft[e, s] for s in sweep_seeds] for e in args.sweep}
    found = plateau(args.sweep, by_epochs)
    E = args.sft_epochs or found or args.sweep[-1]
    verdict = (f"plateau: E = {found}" if found else "no plateau within the sweep") + \
        (f"; θ_0 below: E = {E}" if E != found else "")
    print(f"{verdict} ({time.time() - t0:.0f} s so far)", flush=True)
    if E not in args.sweep or set(args.seeds) - set(sweep_seeds):
        sft.update(runs.parallel([((E, s), *runs.theta0_job(cache, args.train_size, E, s)) for s in args.seeds], args.jobs))

    print(f"self-play on set A from θ_0 = SFT {E} epochs ...", flush=True)
    jobs = []
    for name, flags in METHODS.items():
        for s in args.seeds:
            theta0 = os.path.join(runs.theta0_job(cache, args.train_size, E, s)[0], "iter_0")
            out = os.path.join(args.out, f"e{E}", f"{name.lower().replace(' ', '_').replace('+', 'mix')}_seed{s}")
            jobs.append(((name, s), out, ["--model", theta0, *flags, "--selfplay-from", "sft", "--train-size",
                                          args.train_size, "--selfplay-size", args.train_size, "--iterations",
                                          args.iterations, "--epochs", 1, "--seed", s]))
    done = runs.parallel(jobs, args.jobs)
    results = {name: [done[name, s] for s in args.seeds] for name in METHODS}
    elapsed = time.time() - t0

    # the report: no timings in it, so the same command regenerates it byte for byte
    cmd = "python studies/plateau.py" + (f" --sft-epochs {args.sft_epochs}" if args.sft_epochs else "") + \
        (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != p.get_default("seeds") else "") + \
        (f" --sweep-seeds {' '.join(map(str, sweep_seeds))}" if args.sweep_seeds else "") + \
        (f" --iterations {args.iterations}" if args.iterations != p.get_default("iterations") else "") + \
        (f" --train-size {args.train_size}" if args.train_size != p.get_default("train_size") else "") + \
        ("" if args.out == default_out else " --out " + args.out)
    text = [f"Measured by `{cmd}` (sweep: seeds {sweep_seeds}; self-play: seeds {args.seeds}; set A = the first {args.train_size} chats of the demo's "
            f"SFT split, 300 held-out prompts; mean ± sd over seeds). CPU: {runs.cpu()}.", ""]
    loss = {e: [last_epoch_loss(runs.theta0_job(cache, args.train_size, e, s)[0]) for s in sweep_seeds] for e in args.sweep}
    text.append(runs.table(f"1. SFT on set A for E epochs, from scratch, on the held-out prompts ({verdict})",
                           ["exact match", "log p per token", "log p per response", "training loss, last epoch"],
                           {f"E = {e}": [[r[0][k] for r in by_epochs[e]] for k in
                                         ("eval/accuracy", "eval/heldout_logp_token", "eval/heldout_logp")] + [loss[e]]
                            for e in args.sweep}, 4))
    header = [f"θ_{t}" for t in range(args.iterations + 1)]
    for key, title, digits in METRICS:
        text.append(runs.table(f"2. {title}, self-play on set A from θ_0 = SFT {E} epochs", header,
                               runs.curves(results, key, args.iterations), digits))
    text = "\n".join(text)
    xs = list(range(args.iterations + 1))
    name = f"plateau_e{E}" if args.sft_epochs else "plateau"  # a θ_0 chosen by hand gets files of its own
    runs.plot([("SFT on A: exact match", "accuracy", {"SFT": [[r[0]["eval/accuracy"] for r in by_epochs[e]]
                                                              for e in args.sweep]}, args.sweep, "SFT epochs E", "log"),
               ("SFT on A: held-out log p / token", "log-likelihood per token",
                {"SFT": [[r[0]["eval/heldout_logp_token"] for r in by_epochs[e]] for e in args.sweep]}, args.sweep,
                "SFT epochs E", "log"),
               ("self-play on A: exact match", "accuracy", runs.curves(results, "eval/accuracy", args.iterations), xs),
               ("self-play on A: held-out log p / token", "log-likelihood per token",
                runs.curves(results, "eval/heldout_logp_token", args.iterations), xs)],
              os.path.join(args.out, name + ".png"),
              title=f"first two: θ_0 against SFT epochs (x); last two: from θ_0 = SFT {E} epochs, per iteration")
    runs.write(args.out, default_out, name + ".md", text + "\n", [name + ".png"])
    print(text)
    print(f"{elapsed:.0f} s wall ({elapsed / 60:.1f} min), including runs reused from an earlier call; {runs.load()}")


if __name__ == "__main__":
    main()
