"""train.py end to end on the smoke preset: 1 process vs 2 (FSDP2 over gloo), kill and resume,
the exported checkpoint in transformers, and a NaN that stops the run with its checkpoint intact."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import load_model  # noqa: E402

TRAIN = os.path.join(ROOT, "train.py")
SMOKE = ["--preset", "smoke"]


def run_train(out, *extra, nproc=1, check=True, popen=False):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        cmd = [sys.executable, TRAIN, *SMOKE, "--out", str(out), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", "29517", TRAIN, *SMOKE, "--out", str(out), *extra]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"train.py failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process smoke run, shared by the tests below."""
    out = tmp_path_factory.mktemp("reference")
    res = run_train(out)
    return out, res.stdout


def test_single_process_run_learns_and_writes_everything(reference):
    out, stdout = reference
    rows = metrics(out)
    sft = [r for r in rows if r.get("phase") == "sft"]
    assert sft[-1]["loss"] < 0.8 * sft[0]["loss"]  # SFT from scratch learns the task's format
    evals = [r for r in rows if "eval/heldout_logp" in r]
    assert [r["iteration"] for r in evals] == [0, 1, 2]
    # SPACE pushes the real responses' reward up and the generated ones' down
    last = [r for r in rows if r.get("phase") == "iter" and r["iteration"] == 1][-1]
    assert last["rewards/real"] > 0 > last["rewards/generated"]
    for t in range(3):
        assert os.path.exists(os.path.join(out, f"iter_{t}", "model.safetensors"))
    for t in range(2):
        lines = open(os.path.join(out, f"iter_{t}", "selfplay.jsonl")).read().splitlines()
        rec = json.loads(lines[0])
        assert len(lines) == 64 and len(rec["generated"]) == 1 and rec["ref_real"] < 0
    assert "| θ_2 |" in stdout  # the final table


def test_two_processes_log_the_same_losses(reference, tmp_path):
    out, _ = reference
    run_train(tmp_path, nproc=2)
    one = [r for r in metrics(out) if "loss" in r]
    two = [r for r in metrics(tmp_path) if "loss" in r]
    assert len(one) == len(two) > 20
    for a, b in zip(one, two):
        assert (a["phase"], a["iteration"], a["step"]) == (b["phase"], b["iteration"], b["step"])
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
    # the models end close too (not bitwise: gradients are summed in another order)
    w1, w2 = weights(os.path.join(out, "iter_2")), weights(os.path.join(tmp_path, "iter_2"))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4


def test_sigkill_mid_iteration_then_resume_ends_identical(reference, tmp_path):
    out, _ = reference
    # checkpoints every 2 steps; killed as soon as iteration 1 has one, while it trains on
    proc = run_train(tmp_path, "--ckpt-every", "2", popen=True)
    marker = os.path.join(tmp_path, "ckpt", "latest")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(marker) and open(marker).read().startswith("iter1_step"):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not os.path.exists(os.path.join(tmp_path, "iter_2"))
    res = run_train(tmp_path, "--resume", "--ckpt-every", "2")
    assert "resumed from" in res.stdout and "iter 1, step " in res.stdout
    w_ref, w = weights(os.path.join(out, "iter_2")), weights(os.path.join(tmp_path, "iter_2"))
    assert all(torch.equal(w_ref[k], w[k]) for k in w_ref)
    # and the metrics log reads as if nothing happened (lines logged after the checkpoint are dropped)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens/s"} for r in rows]
    assert strip(metrics(tmp_path)) == strip(metrics(out))


def test_exported_checkpoint_loads_in_transformers(reference):
    transformers = pytest.importorskip("transformers")
    out, _ = reference
    folder = os.path.join(out, "iter_2")
    assert os.path.exists(os.path.join(folder, "tokenizer.model"))
    hf = transformers.MistralForCausalLM.from_pretrained(folder).eval()
    ours = load_model(folder)
    x = torch.randint(0, ours.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() < 1e-4


def test_nan_loss_stops_and_keeps_the_last_checkpoint(reference, tmp_path):
    out, _ = reference
    nan_step = 50  # global step 50 is in iteration 0 (SFT is 48 steps); its checkpoint at step 48 is the boundary
    res = run_train(tmp_path, "--inject-nan-step", str(nan_step), check=False)
    assert res.returncode != 0
    assert "FloatingPointError: loss is nan" in res.stderr and "global step 50" in res.stderr
    assert "iter0_step0" in res.stderr  # it names the checkpoint it leaves behind
    with open(os.path.join(tmp_path, "ckpt", "latest")) as f:
        assert f.read() == "iter0_step0"
    # the checkpoint is whole: resuming from it finishes with the uninterrupted run's weights
    run_train(tmp_path, "--resume")
    w_ref, w = weights(os.path.join(out, "iter_2")), weights(os.path.join(tmp_path, "iter_2"))
    assert all(torch.equal(w_ref[k], w[k]) for k in w_ref)


def test_bad_data_file_names_path_and_line(tmp_path):
    bad = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user", "content": 3}]}) + "\n")
    res = run_train(tmp_path / "out", "--data", str(bad), check=False)
    assert res.returncode != 0 and f"{bad}:2" in res.stderr and "content" in res.stderr


def test_bf16_autocast_and_activation_checkpointing_run(tmp_path):
    """The GPU recipe's switches, on the CPU: bf16 autocast and recomputed block activations."""
    run_train(tmp_path, "--bf16", "--activation-checkpointing", "--iterations", "1")
    rows = [r for r in metrics(tmp_path) if r.get("phase") == "sft"]
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    assert os.path.exists(os.path.join(tmp_path, "iter_1", "model.safetensors"))
