"""
SPACE's noise ratio μ = K (the SPACE paper's ablation): K ∈ {1, 3, 7} generated responses per prompt,
μ = K, from an SFT model θ_0 on set A, self-playing on the same set A.

    python studies/mu.py --sft-epochs 16            # θ_0 = SFT 16 epochs: its samples still differ from A's answers
    python studies/mu.py --sft-epochs 128           # θ_0 = studies/plateau.py's (128 epochs: it reproduces A)
    python studies/mu.py --sft-epochs 2 --train-size 256 --seeds 0 --iterations 1 --out out/mu_quick  # smoke test

θ_0 is SFT on set A (the first --train-size chats of the demo's SFT split) for --sft-epochs epochs,
the same cached model as studies/plateau.py's (out/theta0/, trained here if missing). From it, SPACE
self-plays on set A for --iterations iterations, 1 epoch each, β = 1, with K samples per prompt and
μ = K; K = 1 is studies/plateau.py's SPACE run, reused when its folder is there. Per iteration: greedy
exact match and per-token log-likelihood on the 300 held-out prompts, rewards/real and
rewards/generated. μ can only matter where θ_0's samples differ from the annotations: from
studies/plateau.py's θ_0 (128 epochs, training loss 0.0000) every sample is the annotation and no K
moves the model, so the ablation proper runs from 16 epochs (training loss about 0.25).

Sized for 2 CPU cores: K = 7 makes an iteration draw 7 and train on 8 sequences per prompt, about 4x
the cost of a K = 1 iteration; 5 iterations, as studies/plateau.py's; runs go two at a time on one
thread each, the costly K = 7 first. The wall time of every iteration (between the
exports of θ_t and θ_t+1, so with the other run sharing the machine) and the load average are
printed, never written to OUT/mu_eE.md: a rerun on the same machine regenerates mu_eE.md and
mu_eE.png byte for byte (copied to studies/results/ when --out is the default); another CPU may differ
in the last digits.
"""
import argparse
import os
import statistics
import time

import runs

KS = (1, 3, 7)
METRICS = (("eval/accuracy", "Exact match on held-out prompts", 3),
           ("eval/heldout_logp_token", "Log-likelihood per token of held-out real responses", 4),
           ("rewards/real", "rewards/real during the iteration that made θ_t", 3),
           ("rewards/generated", "rewards/generated during the iteration that made θ_t (mean over K)", 3),
           ("samples/identical", "share of generated responses equal to the real one in the iteration that "
            "made θ_t", 3))


def iteration_times(out, iterations):
    """Seconds between the exports of θ_t and θ_t+1: one iteration's sampling, scoring and training."""
    stamps = [os.path.getmtime(os.path.join(out, f"iter_{t}", "config.json")) for t in range(iterations + 1)]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = os.path.join(runs.ROOT, "out", "mu")
    p.add_argument("--out", default=default_out)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-size", type=int, default=1000, help="set A: SFT and self-play chats")
    p.add_argument("--sft-epochs", type=int, required=True, help="θ_0's SFT epochs (studies/plateau.py's plateau)")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(runs.cpu(), "|", runs.load(), flush=True)
    t0 = time.time()
    cache = os.path.join(runs.ROOT, "out", "theta0")
    runs.parallel([(s, *runs.theta0_job(cache, args.train_size, args.sft_epochs, s)) for s in args.seeds], args.jobs)

    jobs = []
    for K in KS:
        for s in args.seeds:
            theta0 = os.path.join(runs.theta0_job(cache, args.train_size, args.sft_epochs, s)[0], "iter_0")
            flags = ["--model", theta0, "--method", "space", "--selfplay-from", "sft", "--train-size", args.train_size,
                     "--selfplay-size", args.train_size, "--iterations", args.iterations, "--epochs", 1, "--seed", s]
            out = os.path.join(args.out, f"e{args.sft_epochs}", f"k{K}_seed{s}")
            if K == 1:  # studies/plateau.py's SPACE run has exactly these flags
                plateau = os.path.join(runs.ROOT, "out", "plateau", f"e{args.sft_epochs}", f"space_seed{s}")
                out = plateau if os.path.exists(os.path.join(plateau, "summary.json")) else out
            else:
                flags += ["--samples-per-prompt", K, "--mu", K]
            jobs.append(((K, s), out, flags))
    # the costly K = 7 runs first, so the two workers finish together
    done = runs.parallel(sorted(jobs, key=lambda j: -j[0][0]), args.jobs)
    results = {f"K = μ = {K}": [done[K, s] for s in args.seeds] for K in KS}
    elapsed = time.time() - t0
    for (K, s), out, _ in jobs:
        secs = iteration_times(out, args.iterations)
        print(f"K = μ = {K}, seed {s}: " + ", ".join(f"{x:.0f}" for x in secs) +
              f" s per iteration (mean {statistics.fmean(secs):.0f} s)")

    cmd = f"python studies/mu.py --sft-epochs {args.sft_epochs}" + \
        (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != p.get_default("seeds") else "") + \
        (f" --iterations {args.iterations}" if args.iterations != p.get_default("iterations") else "") + \
        (f" --train-size {args.train_size}" if args.train_size != p.get_default("train_size") else "") + \
        ("" if args.out == default_out else " --out " + args.out)
    text = [f"Measured by `{cmd}` (seeds {args.seeds}, set A = the first {args.train_size} chats of the demo's SFT "
            f"split, θ_0 = SFT {args.sft_epochs} epochs on A; mean ± sd over seeds). CPU: {runs.cpu()}.", ""]
    header = [f"θ_{t}" for t in range(args.iterations + 1)]
    for key, title, digits in METRICS:
        text.append(runs.table(f"SPACE, {title}", header, runs.curves(results, key, args.iterations), digits))
    text = "\n".join(text)
    xs = list(range(args.iterations + 1))
    name = f"mu_e{args.sft_epochs}"  # one pair of files per θ_0
    runs.plot([("exact match, held out", "accuracy", runs.curves(results, "eval/accuracy", args.iterations), xs),
               ("log p(real) per token, held out", "log-likelihood per token",
                runs.curves(results, "eval/heldout_logp_token", args.iterations), xs)],
              os.path.join(args.out, name + ".png"),
              title=f"SPACE with K samples per prompt and μ = K, θ_0 = SFT {args.sft_epochs} epochs on A")
    runs.write(args.out, default_out, name + ".md", text + "\n", [name + ".png"])
    print(text)
    print(f"{elapsed:.0f} s wall ({elapsed / 60:.1f} min), including runs reused from an earlier call; {runs.load()}")


if __name__ == "__main__":
    main()
