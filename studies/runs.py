"""
What the study scripts share (studies/study.py, plateau.py, mu.py, gem.py): run `train.py` commands
two at a time on one thread each, reuse a finished run, cache the SFT models θ_0, and write mean ± sd
tables and per-iteration plots into studies/results/. Not a command of its own.

Every run is one `python train.py ...` process with OMP_NUM_THREADS=1, so its numbers depend only on
the seed and on the CPU: the same command on the same machine gives the same digits; another CPU
(another instruction set, another bf16 path) may differ in the last ones.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
RESULTS = os.path.join(ROOT, "studies", "results")
sys.path.insert(0, ROOT)  # the project's modules (data.py), imported where they are needed

from bench.common import cpu_line as cpu  # noqa: E402,F401  the machine, in the words the results quote (runs.cpu())


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def run(cmd, log):
    """One train.py process on one thread; its output goes to log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(cmd)}\nsee {log}")


def train(out, flags):
    """`python train.py FLAGS --out OUT`, unless OUT already holds a finished run (summary.json).
    Returns (summary rows, seconds this call spent: 0 for a reused run)."""
    if not os.path.exists(os.path.join(out, "summary.json")):
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        start = time.time()
        run([sys.executable, TRAIN, *map(str, flags), "--out", out], out + ".log")
        spent = time.time() - start
    else:
        spent = 0.0
    with open(os.path.join(out, "summary.json")) as f:
        rows = json.load(f)
    for t, row in enumerate(rows[1:], 1):  # the pairs that made θ_t: OUT/iter_{t-1}/selfplay.jsonl
        path = os.path.join(out, f"iter_{t - 1}", "selfplay.jsonl")
        if os.path.exists(path):
            row["samples/identical"] = identical(path)
    return rows, spent


def identical(path):
    """The share of generated responses in a selfplay.jsonl that are the real response, character for
    character. Such a pair gives every self-play loss no net gradient: its real and generated terms
    are the same sequence's score."""
    import data  # the project's reader, which checks every record; imported here to keep this module light
    records = data.load_selfplay(path)
    same = sum(g == r["real"] for r in records for g in r["generated"])
    return same / max(sum(len(r["generated"]) for r in records), 1)


def parallel(jobs, n=2):
    """jobs: (key, out, flags). Runs them n at a time; returns {key: summary rows}, printing each
    run's wall time as it ends (a reused run prints nothing)."""
    def work(job):
        key, out, flags = job
        rows, spent = train(out, flags)
        if spent:
            print(f"  {os.path.basename(out)}: {spent:.0f} s ({load()})", flush=True)
        return key, rows
    with ThreadPoolExecutor(n) as pool:
        return dict(pool.map(work, jobs))


def theta0_job(cache, train_size, epochs, seed, sft_flags=()):
    """The job that trains θ_0: SFT from scratch on the first train_size chats of the demo's SFT split
    (set A), for `epochs` epochs; run folder cache/NAME, model in cache/NAME/iter_0."""
    tag = "-".join(str(f).lstrip("-") for f in sft_flags) or "ce"
    out = os.path.join(cache, f"{tag}_n{train_size}_e{epochs}_seed{seed}")
    flags = ["--method", "sft", "--iterations", 0, "--train-size", train_size, "--selfplay-size", train_size,
             "--selfplay-from", "sft", "--sft-epochs", epochs, "--seed", seed, *sft_flags]
    return out, flags


def at(rows, t, key):
    return rows[t][key] if t < len(rows) and key in rows[t] else None


def fmt(values, digits):
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:  # one seed: no spread to show
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(title, header, rows, digits, note="", corner=""):
    """rows: {name: [values over seeds, one list per column]} -> a markdown table, mean ± sd (the value
    alone where one seed ran). note follows the bold title; corner heads the column of names."""
    lines = [f"**{title}**" + (f" {note}" if note else ""), "",
             f"|{' ' + corner if corner else ''} | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for name, cols in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(v, digits) for v in cols) + " |")
    return "\n".join(lines + [""])


def curves(runs, key, iterations):
    """runs: {name: [summary rows of each seed]} -> {name: per iteration, the values over seeds}."""
    return {name: [[at(r, t, key) for r in seeds] for t in range(iterations + 1)] for name, seeds in runs.items()}


def plot(panels, path, xlabel="iteration t (θ_t)", title="", width=None, legend="every"):
    """panels: [(title, ylabel, {name: [values over seeds per x]}, xs[, xlabel[, "log"]])] -> one PNG,
    mean with a min-max band over seeds; "log" draws x on a base-2 log scale. width: the figure's
    inches (4.6 per panel by default); legend: on "every" panel or the "first" only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(width or 4.6 * len(panels), 3.8), dpi=90, squeeze=False)
    for i, (ax, (name, ylabel, series, xs, *own)) in enumerate(zip(axes[0], panels)):
        for label, cols in series.items():
            pts = [(x, [v for v in c if v is not None]) for x, c in zip(xs, cols)]
            pts = [(x, v) for x, v in pts if v]
            if not pts:
                continue
            x = [p[0] for p in pts]
            line, = ax.plot(x, [statistics.fmean(v) for _, v in pts], marker="o", ms=3, label=label)
            ax.fill_between(x, [min(v) for _, v in pts], [max(v) for _, v in pts], color=line.get_color(), alpha=0.15)
        ax.set(title=name, xlabel=own[0] if own else xlabel, ylabel=ylabel)
        if own[1:] == ["log"]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
        if legend == "every" or i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(title or "mean over seeds (band: min to max)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(out, default_out, name, text, figures=()):
    """OUT/name (and the figures) and, when OUT is the script's default, copies in studies/results/."""
    with open(os.path.join(out, name), "w") as f:
        f.write(text)
    if os.path.abspath(out) == os.path.abspath(default_out):
        os.makedirs(RESULTS, exist_ok=True)
        for file in (name, *figures):
            shutil.copy(os.path.join(out, file), os.path.join(RESULTS, file))
