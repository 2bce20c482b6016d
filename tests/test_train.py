"""train.py and selfplay.py end to end on the smoke preset: the papers' recipe switches (reuse of
earlier samples, per-iteration schedules, the SFT term), 1 vs 2 processes and a 2 x 2 HSDP mesh, kills
during generation and training resumed with the same or another number of ranks, loading from rank 0,
the bf16 generation copy, a NaN that stops the run with its checkpoint intact, and data that cannot
work failing before any work.

One uninterrupted single-process run from scratch is the reference. The other runs start from its
exported θ_0 (--model), which skips the SFT phase, and must end where it ends."""
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import ROOT
import data
import sample
import selfplay
import train
from model import ModelArgs, Transformer, load_model, save_model
from space import sequence_logprobs, space_loss
from tokenizer import ZEPHYR_TEMPLATE, Tokenizer, render_template

TRAIN = os.path.join(ROOT, "train.py")
# the recipe's switches on: reuse of the previous iteration's samples, β and lr per iteration, an SFT
# term; 8 generation chunks of 8 prompts, so a kill can land between two of them
RECIPE = ["--mix-previous", "1", "--beta", "1.0,0.5", "--lr", "5e-5,3e-5", "--sft-weight", "0.1", "--gen-batch", "8"]


def free_port():
    """A port no one listens on now: fixed ports collide with other test runs on the same machine."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(out, *extra, nproc=1, check=True, popen=False):
    """Run train.py on the smoke preset with RECIPE; popen: start it and return (its output goes to
    OUT.log, where no unread pipe can fill up and stall it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [TRAIN, "--preset", "smoke", *RECIPE, "--out", str(out), *extra]
    if nproc == 1:
        cmd = [sys.executable, *cmd]
    else:  # a fresh port each time: a killed run's port may linger
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), *cmd]
    if popen:
        return subprocess.Popen(cmd, stdout=open(f"{out}.log", "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"train.py failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def descendants(pid):
    """pid's child processes, their children, ... (torchrun's workers are not in its process group)."""
    children = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_when(proc, ready, what):
    """SIGKILL the run, every process of it at once, as soon as ready() holds."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ready():
            for pid in descendants(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            break
        time.sleep(0.002)
    assert proc.wait() == -signal.SIGKILL, f"the run ended before {what}"


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def iteration_losses(out):
    return [(r["iteration"], r["loss"]) for r in metrics(out) if r.get("phase") == "iter" and "loss" in r]


def weights(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return all(torch.equal(wa[k], wb[k]) for k in wa)


def assert_same_run(out, reference, iterations):
    """Bit for bit the reference's run up to θ_iterations (out ran --iterations of them, the reference
    may have run more): every metrics line (but the wall-clock tokens/s) and every iteration's weights,
    self-play data and greedy samples, byte for byte."""
    def lines(folder):
        return [{k: v for k, v in r.items() if k != "tokens/s"} for r in metrics(folder)]
    ours = lines(out)
    assert ours[-1].get("iteration") == iterations and "eval/heldout_logp" in ours[-1]
    assert ours == lines(reference)[:len(ours)]
    assert sorted(d for d in os.listdir(out) if d.startswith("iter_")) == [f"iter_{t}" for t in range(iterations + 1)]
    for t in range(iterations + 1):
        for name in ("model.safetensors", "samples.jsonl") + (("selfplay.jsonl",) if t < iterations else ()):
            path = os.path.join(f"iter_{t}", name)
            assert open(os.path.join(out, path), "rb").read() == open(os.path.join(reference, path), "rb").read(), path


def stopped(out):
    with open(os.path.join(out, "ckpt", "latest")) as f:
        latest = f.read()
    with open(os.path.join(out, train.STOPPED)) as f:
        return latest, json.load(f)


def assert_close_run(out, reference):
    """Another number of ranks: the same losses and weights within the 1-vs-2-process tolerance
    (gradients are summed in another order, so not bitwise)."""
    one, two = iteration_losses(reference), iteration_losses(out)
    assert len(one) == len(two) > 5
    for (ta, a), (tb, b) in zip(one, two):
        assert ta == tb and abs(a - b) <= 1e-5 * abs(a), (one, two)
    w1, w2 = weights(os.path.join(reference, "iter_2")), weights(os.path.join(out, "iter_2"))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process smoke run from scratch, shared by the tests below."""
    out = tmp_path_factory.mktemp("reference")
    res = run_train(out)
    return out, res.stdout


def theta0(reference):
    return ["--model", os.path.join(reference[0], "iter_0")]


def test_single_process_run_learns_and_writes_everything(reference):
    out, stdout = reference
    rows = metrics(out)
    sft = [r for r in rows if r.get("phase") == "sft"]
    assert sft[-1]["loss"] < 0.8 * sft[0]["loss"]  # SFT from scratch learns the task's format
    evals = [r for r in rows if "eval/heldout_logp" in r]
    assert [r["iteration"] for r in evals] == [0, 1, 2]
    assert all(r["eval/heldout_logp_token"] < 0 and r["eval/heldout_logp"] < r["eval/heldout_logp_token"] for r in evals)
    # SPACE pushes the real responses' reward up and the generated ones' down
    last = [r for r in rows if r.get("phase") == "iter" and r["iteration"] == 1][-1]
    assert last["rewards/real"] > 0 > last["rewards/generated"]
    for t in range(3):
        folder = os.path.join(out, f"iter_{t}")
        assert os.path.exists(os.path.join(folder, "model.safetensors"))
        samples = [json.loads(x) for x in open(os.path.join(folder, "samples.jsonl"))]
        assert len(samples) == 8 and all(set(s) == {"messages", "real", "reply"} for s in samples)
        assert f"θ_{t} on " in stdout  # the first reply is printed
    assert "| θ_0 (SFT) |" in stdout and "| θ_2 |" in stdout  # the final table
    assert not glob.glob(os.path.join(out, "iter_*", "selfplay.part-*"))  # merged and removed


def test_schedules_are_logged_per_iteration(reference):
    rows = [r for r in metrics(reference[0]) if r.get("phase") == "iter" and "loss" in r]
    assert {r["beta"] for r in rows if r["iteration"] == 0} == {1.0}
    assert {r["beta"] for r in rows if r["iteration"] == 1} == {0.5}
    assert max(r["lr"] for r in rows if r["iteration"] == 0) == pytest.approx(5e-5, rel=0.2)
    assert max(r["lr"] for r in rows if r["iteration"] == 1) == pytest.approx(3e-5, rel=0.2)
    assert all("sft_nll" in r and r["sft_nll"] > 0 for r in rows)


def test_reused_samples_are_rescored_by_the_current_opponent(reference):
    out, _ = reference
    it0 = data.load_selfplay(os.path.join(out, "iter_0", "selfplay.jsonl"))
    it1 = data.load_selfplay(os.path.join(out, "iter_1", "selfplay.jsonl"))
    assert len(it0) == 64 and {r["drawn_by"] for r in it0} == {0}
    assert len(it1) == 128 and sum(r["drawn_by"] == 0 for r in it1) == 64
    reused = [r for r in it1 if r["drawn_by"] == 0]
    assert [r["generated"] for r in reused] == [r["generated"] for r in it0]  # the same samples ...
    # ... with θ_1's scores, recomputed here from the export, not their iteration-0 values
    tok = Tokenizer(os.path.join(out, "iter_1", "tokenizer.model"))
    model = load_model(os.path.join(out, "iter_1")).eval()
    fresh, stale = [], []
    for r, old in zip(reused, it0):
        for y in [r["real"]] + r["generated"]:
            ids, mask, _ = data.encode_example(tok, r["messages"], y, 48, 80)
            tokens, targets, m = data.collate([(ids, mask)], tok.pad_id)
            with torch.no_grad():
                fresh.append(sequence_logprobs(model(tokens, return_hidden=True), model.output.weight, targets, m).item())
        stale += [old["ref_real"]] + old["ref_generated"]
    stored = [x for r in reused for x in [r["ref_real"]] + r["ref_generated"]]
    assert max(abs(a - b) for a, b in zip(stored, fresh)) < 1e-4
    assert max(abs(a - b) for a, b in zip(stored, stale)) > 1e-3


@pytest.fixture(scope="module")
def two_process(reference, tmp_path_factory):
    """One uninterrupted 2-process run from the reference's θ_0, shared by the tests below."""
    out = tmp_path_factory.mktemp("two_process")
    run_train(out, *theta0(reference), nproc=2)
    return out


def test_two_processes_from_theta0_match(reference, two_process):
    """2 ranks, θ_0 read by rank 0 and broadcast into the shards: the same run as 1 process."""
    assert_close_run(two_process, reference[0])
    # the self-play round does not depend on the number of ranks (from iteration 1 on, θ_t itself differs
    # in the last bits: its gradients were summed in another order)
    name = os.path.join("iter_0", "selfplay.jsonl")
    assert open(os.path.join(two_process, name), "rb").read() == open(os.path.join(reference[0], name), "rb").read()


def test_hsdp_2x2_logs_the_same_losses(reference, tmp_path):
    run_train(tmp_path, *theta0(reference), "--shard-size", "2", "--iterations", "1", nproc=4)
    one = [x for x in iteration_losses(reference[0]) if x[0] == 0]
    four = iteration_losses(tmp_path)
    assert len(one) == len(four) > 2
    for (_, a), (_, b) in zip(one, four):
        assert abs(a - b) <= 1e-5 * abs(a), (one, four)


def test_sigkill_during_generation_then_resume_ends_identical(reference, tmp_path):
    out, _ = reference
    folder = os.path.join(tmp_path, "iter_1")
    proc = run_train(tmp_path, *theta0(reference), popen=True)
    kill_when(proc, lambda: glob.glob(os.path.join(folder, "selfplay.part-*.jsonl"))
              and not os.path.exists(os.path.join(folder, "selfplay.jsonl")), "iteration 1's parts were written")
    on_disk = len(glob.glob(os.path.join(folder, "selfplay.part-*.jsonl")))
    assert 0 < on_disk <= 8
    res = run_train(tmp_path, *theta0(reference), "--resume")
    assert f"iteration 1: generating {8 - on_disk} of 8 chunks ({on_disk} already on disk)" in res.stdout
    name = os.path.join("iter_1", "selfplay.jsonl")
    assert open(os.path.join(tmp_path, name), "rb").read() == open(os.path.join(out, name), "rb").read()
    assert same_weights(os.path.join(out, "iter_2"), os.path.join(tmp_path, "iter_2"))
    assert iteration_losses(tmp_path) == iteration_losses(out)


@pytest.mark.parametrize("before,after", [(1, 2), (2, 1)])
def test_sigkill_mid_training_resumes_with_another_number_of_ranks(reference, tmp_path, before, after):
    marker = os.path.join(tmp_path, "ckpt", "latest")
    proc = run_train(tmp_path, *theta0(reference), "--ckpt-every", "2", nproc=before, popen=True)
    kill_when(proc, lambda: os.path.exists(marker) and open(marker).read().startswith("iter1_step"),
              "iteration 1 had a checkpoint")
    assert not os.path.exists(os.path.join(tmp_path, "iter_2"))
    res = run_train(tmp_path, *theta0(reference), "--ckpt-every", "2", "--resume", nproc=after)
    resumed = [line for line in res.stdout.splitlines() if line.startswith("resumed from")]
    assert len(resumed) == 1 and ": iter 1, step " in resumed[0], res.stdout[:2000]
    assert_close_run(tmp_path, reference[0])


def test_nan_loss_stops_and_keeps_the_last_checkpoint(reference, tmp_path):
    out, _ = reference
    nan_step = 10  # global step 10 is in iteration 1 (8 steps an iteration from --model); its checkpoint is iter1_step0
    res = run_train(tmp_path, *theta0(reference), "--inject-nan-step", str(nan_step), check=False)
    assert res.returncode != 0
    assert "FloatingPointError: loss is nan" in res.stderr and "global step 10" in res.stderr
    assert "iter1_step0" in res.stderr  # it names the checkpoint it leaves behind
    with open(os.path.join(tmp_path, "ckpt", "latest")) as f:
        assert f.read() == "iter1_step0"
    # the checkpoint is whole: resuming from it finishes with the uninterrupted run's weights
    run_train(tmp_path, *theta0(reference), "--resume")
    assert same_weights(os.path.join(out, "iter_2"), os.path.join(tmp_path, "iter_2"))


# -----------------------------------------------------------------------------
# Preemption: SIGTERM stops the run at the next safe point with a checkpoint there; --resume ends
# bit-identical to the uninterrupted run. The smoke phases last under a second, so the run signals
# itself (hidden flags, see checkpoint.Preemption); --ckpt-every 1000 is longer than any phase, so the
# only checkpoint mid-phase is the stop's own.


def test_sigterm_mid_sft_checkpoints_there_and_resumes_bit_identical(reference, tmp_path):
    """1 process, SIGTERM during SFT step 5 (of 48), then a second SIGTERM as the stop's checkpoint
    starts: the second is ignored, the checkpoint is whole, and resuming from it ends where the
    uninterrupted run ends (one iteration of it: the rest would add time, not coverage)."""
    flags = ["--ckpt-every", "1000", "--iterations", "1"]
    res = run_train(tmp_path, *flags, "--inject-signal-step", "5", "--inject-second-signal", check=False)
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-3000:]
    assert "rank 0: SIGTERM: stopping at the next safe point" in res.stdout
    assert "rank 0: SIGTERM again: ignored" in res.stdout
    assert "stopped by SIGTERM at sft 0, step 6 (global step 6)" in res.stdout
    latest, record = stopped(tmp_path)
    assert latest == "sft0_step6"  # after the signalled step's optimizer step, not at the phase's start
    assert {k: record[k] for k in ("signal", "phase", "iteration", "step")} == \
        {"signal": "SIGTERM", "phase": "sft", "iteration": 0, "step": 6}
    command = record["resume"]
    assert f"resume with: {command}" in res.stdout
    assert command.endswith("--resume") and "--inject" not in command and "--ckpt-every 1000" in command
    assert not os.path.exists(os.path.join(tmp_path, "iter_0"))
    res = run_train(tmp_path, *flags, "--resume")
    assert "resumed from" in res.stdout and ": sft 0, step 6" in res.stdout
    assert not os.path.exists(os.path.join(tmp_path, train.STOPPED))
    assert_same_run(tmp_path, reference[0], iterations=1)


def test_sigterm_two_processes_in_generation_and_training_resumes_bit_identical(reference, two_process, tmp_path):
    """2 processes under torchrun, one iteration. First rank 1 alone is signalled during the
    generation (8 chunks, 2 a round): both ranks stop after the same round, 4 parts on disk. Resumed,
    SIGTERM goes to the torchrun agent during the iteration's step 3 (of 8), and the agent forwards it
    to both workers: both stop after that optimizer step, with a checkpoint there. Resumed again, the
    run ends bit for bit where the uninterrupted 2-process run does."""
    folder = os.path.join(tmp_path, "iter_0")
    flags = [*theta0(reference), "--ckpt-every", "1000", "--iterations", "1"]
    # the checks outside training: 2 rounds of evaluation chunks (32 held-out chats), then generation's
    # rounds; the 5th is before generation's 3rd round
    res = run_train(tmp_path, *flags, "--inject-signal-check", "5", nproc=2, check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "rank 1: SIGTERM: stopping" in out and "rank 0: SIGTERM" not in out, out[-3000:]
    assert "stopped by SIGTERM at iter 0, step 0 (global step 0)" in out
    parts = sorted(glob.glob(os.path.join(folder, "selfplay.part-*.jsonl")))
    assert [os.path.basename(p) for p in parts] == [f"selfplay.part-{c:05d}.jsonl" for c in range(4)], parts
    assert stopped(tmp_path)[0] == "iter0_step0"
    res = run_train(tmp_path, *flags, "--resume", "--inject-signal-step", "3", nproc=2, check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "iteration 0: generating 4 of 8 chunks (4 already on disk)" in out
    assert "closing signal SIGTERM" in out  # the agent forwarded it
    assert "rank 0: SIGTERM: stopping" in out and "rank 1: SIGTERM: stopping" in out
    assert "stopped by SIGTERM at iter 0, step 4 (global step 4)" in out
    latest, record = stopped(tmp_path)
    assert latest == "iter0_step4" and record["step"] == 4 and record["iteration"] == 0
    assert record["resume"].startswith("torchrun --nproc_per_node 2 ")
    run_train(tmp_path, *flags, "--resume", nproc=2)
    assert not os.path.exists(os.path.join(tmp_path, train.STOPPED))
    assert_same_run(tmp_path, two_process, iterations=1)


def test_exported_checkpoint_loads_in_transformers(reference):
    transformers = pytest.importorskip("transformers")
    folder = os.path.join(reference[0], "iter_2")
    assert os.path.exists(os.path.join(folder, "tokenizer.model"))
    hf = transformers.MistralForCausalLM.from_pretrained(folder).eval()
    ours = load_model(folder)
    x = torch.randint(0, ours.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() < 1e-4


def test_bf16_generation_copy(reference):
    """--bf16 generates from a bf16 copy with a bf16 cache, outside autocast. Its greedy replies are
    the fp32 model's, except where fp32's two best tokens are closer than bf16 can tell apart."""
    out, _ = reference
    tok = Tokenizer(os.path.join(out, "iter_0", "tokenizer.model"))
    chats = data.demo_splits(0, 0, 0, 32)["test"]
    ids = [data.encode_prompt(tok, data.split_chat(c["messages"])[0], 48)[0] for c in chats]
    for t in (0, 2):
        model = load_model(os.path.join(out, f"iter_{t}"))
        policy, _ = train.opponent(model, train.parse_args(["--preset", "smoke", "--bf16"]), 1, torch.device("cpu"),
                                   tok.pad_id)
        assert {p.dtype for p in policy.parameters()} == {torch.bfloat16} and not torch.is_autocast_enabled()
        assert {p.dtype for p in model.parameters()} == {torch.float32}  # the master weights stay fp32
        cache_dtypes = []
        original = sample.KVCache.__init__

        def spy(self, *a, **k):
            original(self, *a, **k)
            cache_dtypes.append(self.k.dtype)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sample.KVCache, "__init__", spy)
            low = sample.generate(policy, ids, 24, temperature=0.0, eos_id=tok.eos_id)
        assert cache_dtypes == [torch.bfloat16]
        high = sample.generate(model, ids, 24, temperature=0.0, eos_id=tok.eos_id)
        differ = [(p, a, b) for p, a, b in zip(ids, low, high) if a != b]
        assert len(differ) <= len(ids) // 4
        for p, a, b in differ:  # the smoke model, barely trained, has near-ties: a bf16 rounding flips them
            i = next(i for i in range(min(len(a), len(b))) if a[i] != b[i])
            with torch.no_grad():
                z = model(torch.tensor([p + b[:i]]))[0, -1]
            assert z[b[i]] - z[a[i]] < 0.01 * z[b[i]].abs()


def test_activation_checkpointing_only_recomputes_and_bf16_stays_close(reference, tmp_path):
    """The GPU recipe's switches, on the CPU. In fp32, recomputing each block's activations in backward
    gives the reference's losses and weights (within 1e-6: it only recomputes). With bf16 autocast on
    top, the losses stay within 5% of fp32's (bf16 keeps 8 bits of mantissa; measured: 1.8%) and
    differ from them, so bf16 did happen."""
    ref = [x for x in iteration_losses(reference[0]) if x[0] == 0]
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        run_train(out, *theta0(reference), "--activation-checkpointing", "--iterations", "1",
                  *(["--bf16"] if precision == "bf16" else []))
        losses = iteration_losses(out)
        assert [t for t, _ in losses] == [t for t, _ in ref] and len(ref) >= 4
        if precision == "fp32":
            assert [x for _, x in losses] == pytest.approx([x for _, x in ref], rel=1e-6)
            w, w_ref = weights(out / "iter_1"), weights(os.path.join(reference[0], "iter_1"))
            assert all(torch.allclose(w[k], w_ref[k], rtol=1e-6, atol=1e-7) for k in w_ref)
        else:
            assert [x for _, x in losses] == pytest.approx([x for _, x in ref], rel=0.05)
            assert max(abs(a - b) for (_, a), (_, b) in zip(losses, ref)) > 1e-4


def test_sft_weight_adds_exactly_alpha_times_the_nll():
    """micro_loss with --sft-weight α against a hand computation on the same batch: the self-play loss
    plus α × (the real responses' summed NLL / their token count in the global batch)."""
    g = torch.Generator().manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, vocab_size=61,
                     max_seq_len=64, sliding_window=6)
    model = Transformer(args).init_weights(1)

    def seq(p, r):
        return torch.randint(3, 61, (p + r,), generator=g).tolist(), [0] * p + [1] * r
    examples = [{"seqs": [seq(5 + 3 * i, 4 + 2 * i), seq(7, 9 - i)], "ref": [-20.0 - i, -25.0 + i]} for i in range(3)]
    real_tokens = 37.0  # the global batch's (this micro-batch is part of it)
    batch = train.make_batch(examples, 0, torch.device("cpu"))
    counts = {"prompts": 8, "real_tokens": real_tokens}
    loss, metrics_ = train.micro_loss(model, "space", train.parse_args(["--sft-weight", "0.3"]), batch, counts,
                                      world=1, beta=0.7)
    base, _ = train.micro_loss(model, "space", train.parse_args([]), batch, counts, world=1, beta=0.7)
    # by hand, in float64 through the full logits
    m64 = Transformer(args).init_weights(1).double()
    s = []
    for ex in examples:
        for ids, mask in ex["seqs"]:
            logits = m64(torch.tensor([ids[:-1]]))[0]
            logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
            s.append((logp * torch.tensor(mask[1:], dtype=torch.float64)).sum())
    s = torch.stack(s).view(3, 2)
    ref = torch.tensor([ex["ref"] for ex in examples], dtype=torch.float64)
    expected_base = space_loss(s[:, 0], s[:, 1:], ref[:, 0], ref[:, 1:], beta=0.7) * 3 / 8
    nll = -s[:, 0].sum() / real_tokens
    assert base.item() == pytest.approx(expected_base.item(), rel=1e-5)
    assert (loss - base).item() == pytest.approx(0.3 * nll.item(), rel=1e-5)
    assert metrics_["sft_nll"].item() == pytest.approx(nll.item(), rel=1e-5)


def test_batched_scoring_matches_one_prompt_at_a_time():
    g = torch.Generator().manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, vocab_size=61,
                     max_seq_len=256, sliding_window=16)
    model = Transformer(args).init_weights(2).eval()
    seqs = []
    for p, r in [(3, 2), (150, 40), (7, 1), (60, 90), (12, 30), (5, 200), (90, 3)]:  # very different lengths
        seqs.append((torch.randint(3, 61, (p + r,), generator=g).tolist(), [0] * p + [1] * r))
    one = [selfplay.score(model, [s], pad_id=0)[0] for s in seqs]
    for budget in (64, 400, 100_000):  # one sequence a batch (a long one overruns the budget alone) .. all at once
        batched = selfplay.score(model, seqs, pad_id=0, max_tokens=budget)
        assert batched == pytest.approx(one, rel=1e-5, abs=1e-4)


def test_rank0_broadcast_loading_gives_the_same_shards(tmp_path):
    """build_model on 2 ranks (meta, shard, rank 0 reads and broadcasts) against loading the full
    model on every rank and sharding it."""
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, vocab_size=61, max_seq_len=64)
    save_model(Transformer(args).init_weights(3), str(tmp_path / "m"))
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {ROOT!r})
        import parallel, train
        from model import load_model
        cfg = train.parse_args(["--model", {str(tmp_path / "m")!r}, "--dist-timeout", "5"])
        rank, world, device, mesh = parallel.setup_distributed(cfg.shard_size, cfg.dist_timeout)
        ours = train.build_model(cfg, None, rank, world, device, mesh)
        today = parallel.parallelize(load_model({str(tmp_path / "m")!r}), world, mesh)
        a, b = ours.state_dict(), today.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k].to_local(), b[k].to_local()), k
        open(f"{tmp_path}/rank{{rank}}.ok", "w").write(str(len(a)))  # files: the ranks' prints interleave
    """))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(script)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert [open(tmp_path / f"rank{r}.ok").read() for r in (0, 1)] == ["21", "21"]  # 2 x 9 block tensors + 3


def test_bad_data_file_names_path_and_line(tmp_path):
    bad = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user", "content": 3}]}) + "\n")
    res = run_train(tmp_path / "out", "--data", str(bad), check=False)
    assert res.returncode != 0 and f"{bad}:2" in res.stderr and "content" in res.stderr


def test_data_too_small_for_its_split_fails_before_any_work(tmp_path):
    path = tmp_path / "chats.jsonl"
    chats = data.demo_splits(0, 160, 0, 0)["train"]
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    res = run_train(tmp_path / "out", "--data", str(path), "--n-test", "300", check=False)
    assert res.returncode != 0
    assert ("160 chats in --data, 300 held out (--n-test): none left for self-play; pass --eval-data or a "
            "smaller --n-test") in res.stderr
    assert os.listdir(tmp_path / "out") == ["metrics.jsonl"] and os.path.getsize(tmp_path / "out" / "metrics.jsonl") == 0


def test_tokenizer_that_exports_cannot_carry_fails_at_start(tmp_path):
    """A tokenizer with a dummy prefix and user-defined pieces (the demo's before it dropped the dummy
    prefix) cannot be written as transformers' tokenizer.json: refused before any work, not at the
    first export after θ_0's evaluation."""
    import io
    import sentencepiece as spm
    texts = [render_template(ZEPHYR_TEMPLATE, c["messages"], bos_token="", eos_token="")
             for c in data.demo_splits(1, 300, 0, 0)["train"]]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=200, hard_vocab_limit=False,
        character_coverage=1.0, byte_fallback=False, split_digits=True, add_dummy_prefix=True,
        user_defined_symbols=["<|system|>", "<|user|>", "<|assistant|>", "\n"], unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    res = run_train(tmp_path / "out", "--tokenizer", str(tmp_path / "tokenizer.model"), check=False)
    assert res.returncode != 0
    assert f"{tmp_path / 'tokenizer.model'}: its exports could not carry transformers' tokenizer files" in res.stderr
    assert not os.path.exists(tmp_path / "out" / "iter_0")


def test_tied_llama3_checkpoint_under_fsdp_matches_one_process(reference, tmp_path):
    """A tiny checkpoint of Llama 3.2's kind (model_type llama, tied head, Llama 3 RoPE scaling), with the
    demo's tokenizer files, started with --model: 2 gloo ranks under FSDP2 log the 1-process losses, and
    every export keeps the head tied (one tensor in the file, one in transformers)."""
    import shutil
    from safetensors import safe_open
    theta0_dir = os.path.join(reference[0], "iter_0")
    folder = tmp_path / "llama32"
    os.makedirs(folder)
    for name in os.listdir(theta0_dir):  # the tokenizer files, not θ_0's weights or its samples
        if name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(os.path.join(theta0_dir, name), folder / name)
    vocab = load_model(theta0_dir).args.vocab_size
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=160, vocab_size=vocab,
                     max_seq_len=128, sliding_window=None, tie_embeddings=True, model_type="llama", rope_theta=500000.0,
                     rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=64))
    start = Transformer(args).init_weights(5)
    save_model(start, str(folder))

    one, two = tmp_path / "one", tmp_path / "two"
    run_train(one, "--model", str(folder), "--iterations", "1")
    run_train(two, "--model", str(folder), "--iterations", "1", nproc=2)
    a, b = iteration_losses(one), iteration_losses(two)
    assert len(a) == len(b) >= 3
    for (_, x), (_, y) in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)

    transformers = pytest.importorskip("transformers")
    x = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    for out in (one, two):
        for t in (0, 1):
            export = os.path.join(out, f"iter_{t}")
            with open(os.path.join(export, "config.json")) as f:
                cfg = json.load(f)
            assert cfg["tie_word_embeddings"] is True and cfg["rope_parameters"]["rope_type"] == "llama3"
            with safe_open(os.path.join(export, "model.safetensors"), framework="pt") as st:
                assert "lm_head.weight" not in st.keys()
            ours = load_model(export)
            assert ours.output.weight is ours.tok_embeddings.weight and ours.args == args
        hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
        with torch.no_grad():
            assert (hf(x).logits - ours(x)).abs().max() < 1e-4
            # the tied matrix was trained (as both embedding and head), the same on 1 and 2 ranks
            assert (ours.tok_embeddings.weight - start.tok_embeddings.weight).abs().max() > 1e-4
    w1, w2 = weights(os.path.join(one, "iter_1")), weights(os.path.join(two, "iter_1"))
    assert w1.keys() == w2.keys() and max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4


@pytest.mark.parametrize("case", ["data", "model", "model-without-tokenizer"])
def test_missing_data_or_model_stops_before_any_work_naming_flag_and_path(tmp_path, case):
    """--data naming no file, --model naming no folder, or a --model folder with neither tokenizer.json
    nor tokenizer.model: one line naming the flag and the path, before the run folder is even made."""
    out = tmp_path / "out"
    if case == "data":
        flag, path, expected = "--data", tmp_path / "chäts.jsonl", "no such file"
    elif case == "model":
        flag, path, expected = "--model", tmp_path / "no-such-model", "no such folder"
    else:
        flag, path = "--model", tmp_path / "weights-only"
        save_model(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                                         vocab_size=61, max_seq_len=64)), str(path))
        expected = "the folder has neither a tokenizer.json nor a tokenizer.model"
    with pytest.raises(SystemExit) as stop:  # SystemExit(message): Python prints the message alone, status 1
        train.main(["--preset", "smoke", "--out", str(out), flag, str(path)])
    message = stop.value.code
    assert isinstance(message, str) and "\n" not in message and message.startswith(f"{flag} {path}: {expected}")
    assert not os.path.exists(out)


def test_readme_slurm_script_requeues_a_stopped_run_with_resume(tmp_path):
    """The README's SLURM job script, run by bash with srun, scontrol and torchrun stubbed: torchrun's
    own parser and train.py's read the command line, which must forward SIGUSR1 and give the workers
    time to checkpoint. First start: no --resume; the run stops on a signal (the stub leaves what
    train.py leaves: a checkpoint and OUT/stopped.json), so the job requeues itself. Requeued: --resume,
    the run ends, no requeue."""
    import re
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    scripts = [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if b.startswith("#!/bin/bash") and "#SBATCH" in b]
    assert len(scripts) == 1
    script = scripts[0]
    assert re.search(r"^#SBATCH .*--signal=USR1@\d+", script, re.M) and re.search(r"^#SBATCH .*--requeue", script, re.M)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "srun").write_text('#!/bin/bash\nexec "$@"\n')
    (bin_ / "scontrol").write_text('#!/bin/bash\nif [ "$1" = show ]; then echo node0; echo node1; '
                                   'else echo "$*" >> "$CALLS/scontrol"; fi\n')
    # the stub records its command line (parsed below by the real parsers) and leaves what train.py leaves
    (bin_ / "torchrun").write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        with open(os.path.join(os.environ["CALLS"], "torchrun"), "a") as f:
            f.write(json.dumps(sys.argv[1:]) + "\\n")
        out = sys.argv[sys.argv.index("--out") + 1]
        stopped = os.path.join(out, {train.STOPPED!r})
        if "--resume" in sys.argv:  # the run resumes and ends
            os.remove(stopped)
            sys.exit(0)
        os.makedirs(os.path.join(out, "ckpt"))
        open(os.path.join(out, "ckpt", "latest"), "w").write("iter1_step4")
        open(stopped, "w").write("{{}}")
        sys.exit(1)  # torchrun's status when it was signalled
    """))
    for f in bin_.iterdir():
        f.chmod(0o755)
    (tmp_path / "job.sh").write_text(script)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "CALLS": str(tmp_path), "SLURM_JOB_ID": "4242",
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[0-1]"}
    for start in range(2):
        res = subprocess.run(["bash", "job.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
    from torch.distributed.run import get_args_parser
    calls = [get_args_parser().parse_args(json.loads(line)) for line in open(tmp_path / "torchrun")]
    assert [c.training_script for c in calls] == ["train.py", "train.py"]
    assert [train.parse_args(c.training_script_args).resume for c in calls] == [False, True]
    for c in calls:
        assert {"SIGTERM", "SIGUSR1"} <= set(c.signals_to_handle.split(",")) and c.nnodes == "2"
        assert c.shutdown_timeout >= 300  # seconds for a 7B checkpoint, not torchrun's default 30
    assert open(tmp_path / "scontrol").read() == "requeue 4242\n"  # requeued once, after the stop only
