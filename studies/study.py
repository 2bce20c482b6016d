"""
The papers' claims, measured on the built-in demo task: SFT vs SPIN vs SPACE (and S-IPO, S-SimPO).

    python studies/study.py                       # everything (wall time: README, Results)
    python studies/study.py --seeds 0 --iterations 2 --out out/study_quick   # a quick look
    python studies/study.py --seeds 0 --iterations 1 --train-size 256 --selfplay-size 64 --out out/study_tiny  # a smoke test

From one shared SFT checkpoint θ_0 (train.py's demo SFT), every self-play method runs 5 iterations
(0 to 4) on the same self-play prompts with the same budget and K, for each seed; two SFT baselines
run beside them: SFT continued on the self-play set's annotations, and SFT on 4x as many
annotations (the SPACE paper's claim: self-play on 50k annotations beats SFT on 200k). Each run is
one `python train.py ...` command; two run at a time, one thread each, so the numbers do not depend
on what else the machine is doing. Per iteration the study records exact-match accuracy on held-out
prompts, the mean log-likelihood of held-out real responses, rewards/real and rewards/generated.

It writes OUT/results.md (the table, mean ± standard deviation over seeds; the value alone where one
seed ran) and OUT/study.png, and copies both to studies/results/ when --out is the default, which the
README shows. The machine's CPU (and whether it has native bf16) is written with the table: the
digits are those of one machine, and another CPU may differ in the last ones. The runs, tables and
plots go through studies/runs.py, which the follow-up studies (plateau.py, mu.py, gem.py) share.
"""
import argparse
import os
import time

import runs

METHODS = {  # name in the table -> train.py flags
    "SPACE": ["--method", "space"],
    "SPIN": ["--method", "spin"],
    "S-IPO": ["--method", "ipo"],
    "S-SimPO": ["--method", "simpo"],
    "SFT (same data)": ["--method", "sft"],
    "SFT (4x data)": ["--method", "sft", "--selfplay-size", "SIZE4"],
}
METRICS = (("eval/accuracy", "Exact match on held-out prompts", 3),
           ("eval/heldout_logp", "Mean log-likelihood of held-out real responses", 2),
           ("rewards/real", "rewards/real during the iteration (r(y) = s_θ − s_θt)", 3),
           ("rewards/generated", "rewards/generated during the iteration", 3))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = os.path.join(runs.ROOT, "out", "study")
    p.add_argument("--out", default=default_out)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--selfplay-size", type=int, default=1500, help="prompts in the self-play set (x4 for the big SFT)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--train-size", type=int, default=6000, help="θ_0's SFT chats (the demo's default: 6000)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(runs.cpu(), "|", runs.load(), flush=True)
    t0 = time.time()

    # θ_0: SFT from scratch on the demo's train split, shared by every run below
    print("SFT θ_0 ...", flush=True)
    sft_dir = os.path.join(args.out, "sft")
    runs.train(sft_dir, ["--method", "sft", "--iterations", 0, "--train-size", args.train_size,
                         "--selfplay-size", args.selfplay_size])
    theta0 = os.path.join(sft_dir, "iter_0")

    jobs = []
    for name, flags in METHODS.items():
        for seed in args.seeds:
            run_flags = [4 * args.selfplay_size if f == "SIZE4" else f for f in flags]
            if "--selfplay-size" not in run_flags:
                run_flags += ["--selfplay-size", args.selfplay_size]
            out = os.path.join(args.out, f"{name.split()[0].lower()}{'4x' if '4x' in name else ''}_seed{seed}")
            jobs.append(((name, seed), out, ["--model", theta0, *run_flags, "--seed", seed,
                                             "--iterations", args.iterations]))
    done = runs.parallel(jobs, args.jobs)
    results = {name: [done[name, s] for s in args.seeds] for name in METHODS}
    elapsed = time.time() - t0

    # no timing in the file: the same command must regenerate it byte for byte
    cmd = "python studies/study.py" + ("" if args.out == default_out else " --out " + args.out)
    text = (f"Measured by `{cmd}` (seeds {args.seeds}, {args.iterations} iterations, self-play set "
            f"{args.selfplay_size} prompts). CPU: {runs.cpu()}.\n\n{tabulate(results, args.iterations)}\n")
    plot(results, args.iterations, os.path.join(args.out, "study.png"))
    runs.write(args.out, default_out, "results.md", text, ["study.png"])
    print(text)
    print(f"{elapsed:.0f} s wall ({elapsed / 60:.1f} min), including any runs reused from an earlier call; {runs.load()}")


def tabulate(results, iterations):
    """results: {method: [summary rows of each seed]} -> the four tables, one column per θ_t."""
    header = [f"θ_{t}" for t in range(iterations + 1)]
    return "\n".join(runs.table(title, header, runs.curves(results, key, iterations), digits, corner="method",
                                note="(θ_0 is the shared SFT model; θ_t after t iterations)")
                     for key, title, digits in METRICS)


def plot(results, iterations, path):
    xs = list(range(iterations + 1))
    runs.plot([("exact match, held-out prompts", "accuracy", runs.curves(results, "eval/accuracy", iterations), xs),
               ("log p(real response), held out", "mean log-likelihood",
                runs.curves(results, "eval/heldout_logp", iterations), xs)],
              path, title="Demo task, mean over seeds (band: min to max)", width=10, legend="first")


if __name__ == "__main__":
    main()
