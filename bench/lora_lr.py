"""How far one self-play iteration moves the model, with LoRA and without, at several learning rates: the
smoke preset's SPACE iteration 0 from a θ_0 (its 8 steps, RMSProp as in the papers), one train.py run per row.

    python bench/lora_lr.py                        # θ_0 made here: the smoke preset's SFT (seconds)
    python bench/lora_lr.py --model out/demo/iter_0 --lr 5e-7 --lr 1e-4

For each run: the relative change of the adapted weights between OUT/iter_0 and OUT/iter_1 (Frobenius
norm of ΔW over that of W, all seven projections of every layer together), the last logged step's
rewards (r(y) of the real and the generated responses, the margin SPACE pushes apart) and the
held-out log-likelihood per token before and after. The papers' 5e-7 was chosen for updating every
weight of a 7B model; an adapter starts at B = 0 and moves only through B's gradient, so it needs a
much larger rate to move at all.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj")


def train(out, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--preset", "smoke", "--out", out, *args],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"train.py {' '.join(args)} failed:\n{res.stderr[-3000:]}")


def moved(out):
    """(|ΔW| / |W| over the adapted projections, last step's rewards, held-out logp per token before and after)."""
    w0, w1 = (load_file(os.path.join(out, f"iter_{t}", "model.safetensors")) for t in (0, 1))
    keys = [k for k in w0 if any(f".{p}." in k for p in PROJ)]
    delta = sum(((w1[k].double() - w0[k].double()) ** 2).sum() for k in keys).sqrt()
    norm = sum((w0[k].double() ** 2).sum() for k in keys).sqrt()
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    step = [r for r in rows if r.get("phase") == "iter" and "loss" in r][-1]
    evals = [r["eval/heldout_logp_token"] for r in rows if "eval/heldout_logp_token" in r]
    return (delta / norm).item(), step, evals


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="θ_0 (default: the smoke preset's SFT, made here)")
    ap.add_argument("--lr", action="append", type=float, help="LoRA learning rates (default 5e-7 1e-5 1e-4 1e-3)")
    ap.add_argument("--lora", type=int, default=4, help="rank R (α = 2R)")
    args = ap.parse_args()
    rates = args.lr or [5e-7, 1e-5, 1e-4, 1e-3]
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            train(os.path.join(scratch, "sft"), "--iterations", "0")
            model = os.path.join(scratch, "sft", "iter_0")
        common = ["--model", model, "--iterations", "1", "--optimizer", "rmsprop", "--epochs", "1"]
        runs = [("full fine-tuning", 5e-7, [])] + [(f"LoRA r = {args.lora}", lr, ["--lora", str(args.lora)]) for lr in rates]
        print(f"θ_0 = {model}; SPACE iteration 0 of the smoke preset, RMSProp, 1 epoch (4 steps of 16 prompts)\n")
        print("| training | lr | ‖ΔW‖ / ‖W‖ (projections) | last step: rewards/real | rewards/generated | margin "
              "| held-out log p per token, θ_0 → θ_1 |")
        print("|---|---|---|---|---|---|---|")
        for i, (name, lr, extra) in enumerate(runs):
            out = os.path.join(scratch, f"run{i}")
            train(out, *common, "--lr", str(lr), *extra)
            rel, step, evals = moved(out)
            print(f"| {name} | {lr:g} | {rel:.2e} | {step['rewards/real']:+.4f} | {step['rewards/generated']:+.4f} "
                  f"| {step['rewards/margin']:+.4f} | {evals[0]:.4f} → {evals[1]:.4f} |", flush=True)


if __name__ == "__main__":
    main()
