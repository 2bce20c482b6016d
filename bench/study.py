"""
The papers' claims, measured on the built-in demo task: SFT vs SPIN vs SPACE (and S-IPO, S-SimPO).

    python bench/study.py                       # everything: 687 s (11.4 minutes) on 2 idle CPU cores
    python bench/study.py --seeds 0 --iterations 2 --out out/study_quick   # a quick look
    python bench/study.py --seeds 0 --iterations 1 --train-size 256 --selfplay-size 64 --out out/study_tiny  # a smoke test

From one shared SFT checkpoint θ_0 (train.py's demo SFT), every self-play method runs 5 iterations
(0 to 4) on the same self-play prompts with the same budget and K, for each seed; two SFT baselines
run beside them: SFT continued on the self-play set's annotations, and SFT on 4x as many
annotations (the SPACE paper's claim: self-play on 50k annotations beats SFT on 200k). Each run is
one `python train.py ...` command; two run at a time, one thread each, so the numbers do not depend
on what else the machine is doing. Per iteration the study records exact-match accuracy on held-out
prompts, the mean log-likelihood of held-out real responses, rewards/real and rewards/generated.

It writes OUT/results.md (the table, mean ± standard deviation over seeds) and OUT/study.png, and
copies both to bench/results/ when --out is the default, which the README shows. The machine's CPU
(and whether it has native bf16) is written with the table: the digits are those of one machine, and
another CPU may differ in the last ones. The follow-up studies (plateau.py, mu.py, gem.py) share
bench/runs.py.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
METHODS = {  # name in the table -> train.py flags
    "SPACE": ["--method", "space"],
    "SPIN": ["--method", "spin"],
    "S-IPO": ["--method", "ipo"],
    "S-SimPO": ["--method", "simpo"],
    "SFT (same data)": ["--method", "sft"],
    "SFT (4x data)": ["--method", "sft", "--selfplay-size", "SIZE4"],
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "out", "study"))
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
    sft_dir = os.path.join(args.out, "sft")
    if not os.path.exists(os.path.join(sft_dir, "summary.json")):
        shutil.rmtree(sft_dir, ignore_errors=True)
        print("SFT θ_0 ...", flush=True)
        runs.run([sys.executable, TRAIN, "--method", "sft", "--iterations", "0", "--train-size", str(args.train_size),
             "--selfplay-size", str(args.selfplay_size), "--out", sft_dir],
            os.path.join(args.out, "sft.log"))
    theta0 = os.path.join(sft_dir, "iter_0")

    jobs = []
    for name, flags in METHODS.items():
        for seed in args.seeds:
            run_flags = [str(4 * args.selfplay_size) if f == "SIZE4" else f for f in flags]
            out = os.path.join(args.out, f"{name.split()[0].lower()}{'4x' if '4x' in name else ''}_seed{seed}")
            cmd = [sys.executable, TRAIN, "--model", theta0, *run_flags, "--seed", str(seed), "--iterations",
                   str(args.iterations), "--out", out]
            if "--selfplay-size" not in run_flags:
                cmd += ["--selfplay-size", str(args.selfplay_size)]
            jobs.append((name, seed, out, cmd))

    def work(job):
        name, seed, out, cmd = job
        if not os.path.exists(os.path.join(out, "summary.json")):
            shutil.rmtree(out, ignore_errors=True)
            start = time.time()
            runs.run(cmd, out + ".log")
            print(f"{name} seed {seed}: {time.time() - start:.0f} s", flush=True)
        with open(os.path.join(out, "summary.json")) as f:
            return name, seed, json.load(f)

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(work, jobs))
    elapsed = time.time() - t0

    table = tabulate(results, args.iterations)
    cmd = "python bench/study.py" + ("" if args.out == p.get_default("out") else " --out " + args.out)
    # no timing in the file: the same command must regenerate it byte for byte
    text = (f"Measured by `{cmd}` (seeds {args.seeds}, {args.iterations} iterations, self-play set "
            f"{args.selfplay_size} prompts). CPU: {runs.cpu()}.\n\n{table}\n")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    plot(results, args.iterations, os.path.join(args.out, "study.png"))
    print(text)
    print(f"{elapsed:.0f} s wall ({elapsed / 60:.1f} min), including any runs reused from an earlier call; {runs.load()}")
    if args.out == p.get_default("out"):
        dest = os.path.join(ROOT, "bench", "results")
        os.makedirs(dest, exist_ok=True)
        for name in ("results.md", "study.png"):
            shutil.copy(os.path.join(args.out, name), os.path.join(dest, name))


def series(results, method, key, iterations):
    """Per iteration: the values over seeds of one metric of one method."""
    runs = [rows for name, _, rows in results if name == method]
    return [[r[t][key] for r in runs if t < len(r) and key in r[t]] for t in range(iterations + 1)]


def fmt(values, digits):
    if not values:
        return ""
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def tabulate(results, iterations):
    lines = []
    for key, title, digits in (("eval/accuracy", "Exact match on held-out prompts", 3),
                               ("eval/heldout_logp", "Mean log-likelihood of held-out real responses", 2),
                               ("rewards/real", "rewards/real during the iteration (r(y) = s_θ − s_θt)", 3),
                               ("rewards/generated", "rewards/generated during the iteration", 3)):
        lines += [f"**{title}** (θ_0 is the shared SFT model; θ_t after t iterations)", "",
                  "| method | " + " | ".join(f"θ_{t}" for t in range(iterations + 1)) + " |",
                  "|---|" + "---|" * (iterations + 1)]
        for method in METHODS:
            cells = [fmt(v, digits) for v in series(results, method, key, iterations)]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results, iterations, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90)
    xs = list(range(iterations + 1))
    for method in METHODS:
        for ax, key in zip(axes, ("eval/accuracy", "eval/heldout_logp")):
            vals = series(results, method, key, iterations)
            mean = [statistics.fmean(v) for v in vals]
            lo = [min(v) for v in vals]
            hi = [max(v) for v in vals]
            line, = ax.plot(xs, mean, marker="o", ms=3, label=method)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    axes[0].set(title="exact match, held-out prompts", xlabel="iteration t (θ_t)", ylabel="accuracy")
    axes[1].set(title="log p(real response), held out", xlabel="iteration t (θ_t)", ylabel="mean log-likelihood")
    axes[0].legend(fontsize=7)
    fig.suptitle("Demo task, mean over seeds (band: min to max)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
