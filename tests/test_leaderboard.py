"""leaderboard.py against lm-eval itself and against transformers, offline, on the smoke run's exports.

The tasks are local ones written here (YAML over JSONL): a multiple-choice task whose choices differ
in length (so acc and acc_norm differ), and a generate_until task scored by exact match. The command
is run in-process once (lm-eval is slow to import) and its results are checked three ways: equal to
lm-eval's own simple_evaluate on each folder, equal to accuracies recomputed with transformers alone,
and not recomputed on a second call."""
import json
import os
import random
import re
import shutil
import sys

import pytest
import torch

from conftest import ROOT

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
import leaderboard  # noqa: E402

TASKS = ["toy_mc", "toy_gen"]
UNTIL = ["\n", "."]
MAX_GEN = 10
BATCH = "3"  # batches with padding: prompts differ in length


def load(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder)


@torch.no_grad()
def greedy(model, tok, prompt):
    """transformers' greedy generate, cut at the task's stop strings as lm-eval cuts (EOS is one of them)."""
    ids = torch.tensor([tok(prompt).input_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_GEN, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    for stop in UNTIL + [tok.eos_token]:
        text = text.split(stop)[0]
    return text


@torch.no_grad()
def choice_logprob(model, tok, context, choice):
    """Σ log p(choice tokens | context) in float64, the continuation being " " + choice (target_delimiter),
    split from the context by token count as lm-eval splits it."""
    ctx = tok(context).input_ids
    whole = tok(context + " " + choice).input_ids
    logits = model(torch.tensor([whole])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], -1)
    cont = torch.tensor(whole[len(ctx):])
    return logp[len(ctx) - 1:].gather(-1, cont[:, None]).sum().item()


@pytest.fixture(scope="module", autouse=True)
def no_environment_report():
    """simple_evaluate reports the machine (torch's collect_env, git) with each result: 2 s of
    subprocesses per call on a busy CPU, and nothing a score depends on. Skipped here."""
    from lm_eval import evaluator
    mp = pytest.MonkeyPatch()
    mp.setattr(evaluator, "add_env_info", lambda results: None)
    mp.setattr(evaluator, "get_git_commit_hash", lambda: None)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The smoke preset, one self-play iteration: iter_0 and iter_1 (tiny Mistral, sentencepiece + tokenizer.json)."""
    import train
    out = str(tmp_path_factory.mktemp("lb") / "smoke")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(["--preset", "smoke", "--iterations", "1", "--out", out])  # in-process: torch is imported once
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, run_dir):
    """toy_mc and toy_gen: YAML under an include path, over JSONL made here from a seeded RNG.

    A tiny model's generations rarely equal a real answer, so half of toy_gen's targets are θ_0's
    own greedy reply (by transformers): exact match is then ≥ 0.5 at iteration 0 and whatever it is
    at the others, and an lm-eval generation that differs from transformers' shows in the score."""
    d = tmp_path_factory.mktemp("tasks")
    rng = random.Random(7)
    letters = "abcdefghijklmnopqrstuvwxyzé"
    mc = []
    while len(mc) < 16:
        s = rng.sample(letters, rng.randint(2, 6))
        extra = rng.choice([c for c in letters if c not in s])
        answers = {"Reverse the letters: ": s[::-1], "Repeat the letters: ": s, "Drop the last letter: ": s[:-1],
                   "Add one letter: ": s + [extra], "Répète ces lettres : ": s, "Inverse ces lettres : ": s[::-1]}
        choices = list(dict.fromkeys(" ".join(a) for a in answers.values()))
        rng.shuffle(choices)
        if len(choices) < 4:
            continue  # identical choices tie, and a tie's argmax depends on float noise
        q = rng.choice(sorted(answers))  # lengths differ, so acc and acc_norm differ
        mc.append({"question": q + " ".join(s), "choices": choices, "label": choices.index(" ".join(answers[q]))})
    model, tok = load(os.path.join(run_dir, "iter_0"))
    gen = []
    for i in range(10):
        a, b = rng.randint(1, 999), rng.randint(1, 99)
        prompt = rng.choice([f"Add {a} and {b}.", f"Please calculate {a} plus {b}.", f"Somme de {a} et {b} ?"])
        gen.append({"prompt": prompt, "answer": greedy(model, tok, prompt) if i % 2 == 0 else f"{a} + {b} = {a + b}"})
    for name, rows in (("mc", mc), ("gen", gen)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (d / "toy_mc.yaml").write_text(f"""task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'mc.jsonl'}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (d / "toy_gen.yaml").write_text(f"""task: toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'gen.jsonl'}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: {json.dumps(UNTIL)}
  max_gen_toks: {MAX_GEN}
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return str(d), mc, gen


class Counter:
    """Counts lm-eval's simple_evaluate calls made by leaderboard.py; can stop after n of them."""
    def __init__(self, monkeypatch, stop_after=None):
        from lm_eval import evaluator
        current = evaluator.simple_evaluate
        self.calls, self.real, self.stop_after = [], getattr(current, "real", current), stop_after
        monkeypatch.setattr(evaluator, "simple_evaluate", self)

    def __call__(self, *a, **kw):
        if self.stop_after is not None and len(self.calls) == self.stop_after:
            raise KeyboardInterrupt("killed mid-run")
        self.calls.append(kw["tasks"])
        return self.real(*a, **kw)


def command(runs, task_dir, *extra):
    runs = [runs] if isinstance(runs, str) else runs
    return [*runs, "--tasks", ",".join(TASKS), "--include-path", task_dir, "--device", "cpu", "--batch-size", BATCH, *extra]


@pytest.fixture(scope="module")
def evaluated(run_dir, task_dir):
    """The command, killed during its third task, then run again, then a third time: (results.json, calls per call)."""
    mp = pytest.MonkeyPatch()
    try:
        killed = Counter(mp, stop_after=2)
        with pytest.raises(KeyboardInterrupt):
            leaderboard.main(command(run_dir, task_dir[0]))
        resumed = Counter(mp)
        leaderboard.main(command(run_dir, task_dir[0]))
        with open(os.path.join(run_dir, "eval", "results.json")) as f:
            results = json.load(f)
        again = Counter(mp)
        leaderboard.main(command(run_dir, task_dir[0]))
    finally:
        mp.undo()
    return results, [killed.calls, resumed.calls, again.calls]


def folders(run_dir):
    return [os.path.join(run_dir, f"iter_{t}") for t in range(2)]


def value(results, folder, task, metric):
    [row] = [r for r in results["rows"] if r["folder"] == folder and r["task"] == task and r["metric"] == metric]
    return row


def test_killed_run_loses_only_the_task_in_progress_and_a_second_call_reruns_nothing(evaluated):
    _, (killed, resumed, again) = evaluated
    assert killed == [["toy_mc"], ["toy_gen"]]    # iter_0 finished both tasks before the kill
    assert resumed == [["toy_mc"], ["toy_gen"]]   # iter_1 only
    assert again == []


def test_values_equal_lm_evals_own_simple_evaluate(evaluated, run_dir, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager
    results, _ = evaluated
    tm = TaskManager(include_path=task_dir[0], include_defaults=False)  # the local tasks alone: no 14,000-file scan
    for folder in folders(run_dir):
        ref = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": folder, "dtype": "auto"}, tasks=TASKS,
                                      device="cpu", batch_size=int(BATCH), task_manager=tm, log_samples=False)
        for task, metrics in ((t, ref["results"][t]) for t in TASKS):
            keys = [k for k in metrics if "," in k and "_stderr" not in k]
            assert keys == (["acc,none", "acc_norm,none"] if task == "toy_mc" else ["exact_match,none"])
            for k in keys:
                row = value(results, folder, task, k)
                assert row["value"] == metrics[k], (folder, task, k)
                assert row["stderr"] == metrics[k.replace(",", "_stderr,")], (folder, task, k)
    # the file records what decides comparability
    assert results["lm_eval_version"] == lm_eval.__version__
    assert set(results["folders"]) == set(folders(run_dir))
    assert len({f["weights_hash"] for f in results["folders"].values()}) == 2
    assert {t: v["n_shot"] for t, v in results["tasks"].items()} == {"toy_mc": {"toy_mc": 0}, "toy_gen": {"toy_gen": 0}}
    assert all(len(v["config_hash"]) == 64 for v in results["tasks"].values())


def test_values_equal_transformers_recomputation(evaluated, run_dir, task_dir):
    """acc and acc_norm from log-likelihoods, exact match from greedy generate: transformers only."""
    results, _ = evaluated
    _, mc, gen = task_dir
    seen, differ = set(), 0
    for folder in folders(run_dir):
        model, tok = load(folder)
        acc = acc_norm = 0
        for doc in mc:
            lls = [choice_logprob(model, tok, doc["question"], c) for c in doc["choices"]]
            norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]  # lm-eval normalises by characters
            pred, pred_norm = max(range(4), key=lls.__getitem__), max(range(4), key=norm.__getitem__)
            acc += pred == doc["label"]
            acc_norm += pred_norm == doc["label"]
            differ += pred != pred_norm
        em = sum(greedy(model, tok, doc["prompt"]) == doc["answer"] for doc in gen)
        assert value(results, folder, "toy_mc", "acc,none")["value"] == pytest.approx(acc / len(mc), abs=1e-12)
        assert value(results, folder, "toy_mc", "acc_norm,none")["value"] == pytest.approx(acc_norm / len(mc), abs=1e-12)
        assert value(results, folder, "toy_gen", "exact_match,none")["value"] == pytest.approx(em / len(gen), abs=1e-12)
        seen.add((acc, acc_norm, em))
    assert em < len(gen) and value(results, folders(run_dir)[0], "toy_gen", "exact_match,none")["value"] >= 0.5
    assert len(seen) > 1  # the iterations score differently: the comparison is not of constants
    assert all(0 < acc < len(mc) for acc, _, _ in seen) and differ > 0, (seen, differ)  # acc_norm is its own check


def test_table_and_plot(evaluated, run_dir):
    results, _ = evaluated
    table = open(os.path.join(run_dir, "eval", "table.md")).read()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0] == "| iteration | toy_mc (0-shot, acc,none) | toy_gen (0-shot, exact_match,none) | average |"
    for t, line in enumerate(lines[1:]):
        folder = folders(run_dir)[t]
        mc, em = (value(results, folder, *k)["value"] for k in (("toy_mc", "acc,none"), ("toy_gen", "exact_match,none")))
        assert line == f"| {t} | {100 * mc:.2f} | {100 * em:.2f} | {100 * (mc + em) / 2:.2f} |"
    assert len(lines) == 3
    with open(os.path.join(run_dir, "eval", "average.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_two_runs_give_one_table_and_one_plot(evaluated, run_dir, task_dir, tmp_path, monkeypatch):
    """A second run holding copies of two exports: its results come from its own cache, keyed by
    content, so a copied cache serves a copied export (nothing runs), and the report puts both side by side."""
    other = tmp_path / "other"
    for t in (0, 1):
        shutil.copytree(os.path.join(run_dir, f"iter_{t}"), other / f"iter_{t}", ignore=shutil.ignore_patterns("eval"))
    shutil.copytree(os.path.join(run_dir, "eval", "cache"), other / "eval" / "cache")
    calls = Counter(monkeypatch)
    report = tmp_path / "report"
    leaderboard.main(command([run_dir, str(other)], task_dir[0], "--report", str(report)))
    assert calls.calls == []
    both = json.load(open(report / "results.json"))
    assert {r["run"] for r in both["rows"]} == {os.path.normpath(run_dir), str(other)}
    table = [line for line in open(report / "table.md").read().splitlines() if line.startswith("| ")]
    assert table[0].startswith("| run | iteration |") and len(table) == 1 + 2 + 2
    assert table[1].startswith(f"| {os.path.normpath(run_dir)} | 0 |") and table[3].startswith(f"| {other} | 0 |")
    assert table[1].split("|")[3:] == table[3].split("|")[3:]  # same weights, same scores
    assert (report / "average.png").read_bytes()[:4] == b"\x89PNG"


def test_limit_results_are_never_taken_for_full_ones(evaluated, run_dir, task_dir, monkeypatch):
    results, _ = evaluated
    calls = Counter(monkeypatch)
    leaderboard.main([run_dir, "--tasks", "toy_mc", "--include-path", task_dir[0], "--device", "cpu", "--limit", "1"])
    assert calls.calls == [["toy_mc"]] * 2
    limited = json.load(open(os.path.join(run_dir, "eval", "results.json")))
    assert limited["settings"]["limit"] == 1
    assert all(r["stderr"] is None for r in limited["rows"])  # lm-eval gives no stderr for one example
    assert "--limit 1" in open(os.path.join(run_dir, "eval", "table.md")).read()
    calls.calls.clear()
    leaderboard.main(command(run_dir, task_dir[0]))  # the full results are still kept, apart
    assert calls.calls == []
    assert json.load(open(os.path.join(run_dir, "eval", "results.json")))["rows"] == results["rows"]


def test_a_model_folder_alone_with_the_chat_template(evaluated, run_dir, task_dir, tmp_path, monkeypatch):
    """A plain model folder in place of a run, prompts rendered with its chat template (zephyr's, in
    the export): the values are lm-eval's with apply_chat_template, and the template is in the key."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    folder = str(tmp_path / "theta_1")
    shutil.copytree(os.path.join(run_dir, "iter_1"), folder, ignore=shutil.ignore_patterns("eval"))
    calls = Counter(monkeypatch)
    leaderboard.main(command(folder, task_dir[0], "--apply-chat-template"))
    assert calls.calls == [["toy_mc"], ["toy_gen"]]
    results = json.load(open(os.path.join(folder, "eval", "results.json")))
    assert {r["iteration"] for r in results["rows"]} == {None} and results["settings"]["apply_chat_template"]
    ref = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": folder, "dtype": "auto"}, tasks=TASKS,
                                  device="cpu", batch_size=int(BATCH), apply_chat_template=True, log_samples=False,
                                  task_manager=TaskManager(include_path=task_dir[0], include_defaults=False))
    for r in results["rows"]:
        assert r["value"] == ref["results"][r["task"]][r["metric"]], r
    plain = {(r["task"], r["metric"]): r["value"] for r in evaluated[0]["rows"] if r["iteration"] == 1}
    assert {(r["task"], r["metric"]): r["value"] for r in results["rows"]} != plain  # the template was applied
    table = open(os.path.join(folder, "eval", "table.md")).read()
    assert "| theta_1 |" in table and "chat template on" in table


def test_without_matplotlib_the_tables_are_written_and_the_plot_skipped(evaluated, run_dir, task_dir, monkeypatch, capsys):
    png, table = (os.path.join(run_dir, "eval", f) for f in ("average.png", "table.md"))
    os.remove(png)
    os.remove(table)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    leaderboard.main(command(run_dir, task_dir[0]))
    assert os.path.exists(table) and not os.path.exists(png)
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_config_hash_follows_the_data_and_the_yaml(task_dir, tmp_path):
    """A changed data file or task setting is a different task: a new key, so no stale result is reused."""
    entry = leaderboard.task_manager_for((task_dir[0],), include_defaults=False).task_index["toy_mc"]
    data = tmp_path / "mc.jsonl"
    shutil.copy(os.path.join(task_dir[0], "mc.jsonl"), data)
    cfg = {**entry.cfg, "dataset_kwargs": {"data_files": {"test": str(data)}}}
    first = leaderboard.config_hash({"tasks": {"toy_mc": cfg}})
    assert leaderboard.config_hash({"tasks": {"toy_mc": dict(cfg)}}) == first
    with open(data, "a") as f:
        f.write(json.dumps({"question": "Reverse the letters: a b", "choices": ["b a", "a b"], "label": 0}) + "\n")
    second = leaderboard.config_hash({"tasks": {"toy_mc": cfg}})
    assert second != first
    assert leaderboard.config_hash({"tasks": {"toy_mc": {**cfg, "num_fewshot": 2}}}) not in (first, second)


# -----------------------------------------------------------------------------
# The suites, resolved without running anything

def test_suites_resolve_to_the_papers_tasks_shots_and_metrics(task_dir):
    args = leaderboard.parse_args(["x", "--suite", "spin", "--include-path", task_dir[0]])
    tm = leaderboard.find_task_manager(args)
    assert "arc_easy" in tm.all_tasks and "lambada" not in tm.all_tasks  # the suites' folders of lm-eval, read alone
    spin = leaderboard.resolve_tasks(args, tm)
    # the same as from all of lm-eval's tasks (a full index, kept for the unknown-task test below)
    assert spin == leaderboard.resolve_tasks(args, leaderboard.task_manager_for((task_dir[0],)))
    got = {t["name"]: (t["shots"], t["metric"]) for t in spin}
    assert got == {"arc_challenge": (25, "acc_norm,none"), "hellaswag": (10, "acc_norm,none"),
                   "truthfulqa_mc2": (0, "acc,none"), "mmlu": (5, "subtask_mean(acc,none)"),
                   "winogrande": (5, "acc,none"), "gsm8k": (5, "exact_match,strict-match")}
    mmlu = next(t for t in spin if t["name"] == "mmlu")
    assert len(mmlu["subtasks"]) == 57 and set(mmlu["n_shot"].values()) == {5}
    assert "acc,none" in mmlu["keys"]  # lm-eval's size-weighted group value, kept in the rows
    assert "exact_match,flexible-extract" in next(t for t in spin if t["name"] == "gsm8k")["keys"]
    assert len({t["config_hash"] for t in spin}) == 6
    space = leaderboard.resolve_tasks(leaderboard.parse_args(["x", "--suite", "space"]), tm)
    assert [t["name"] for t in space] == [t["name"] for t in spin] + ["ifeval"]
    assert (space[-1]["shots"], space[-1]["metric"]) == (0, "prompt_level_strict_acc,none")
    # --num-fewshot overrides every task but one whose config says 0, as lm-eval does
    three = leaderboard.resolve_tasks(leaderboard.parse_args(["x", "--suite", "spin", "--num-fewshot", "3"]), tm)
    assert {t["name"]: set(t["n_shot"].values()) for t in three}["truthfulqa_mc2"] == {0}
    assert {t["name"]: set(t["n_shot"].values()) for t in three}["arc_challenge"] == {3}


def test_readme_shows_the_suite_commands_and_they_parse():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    cmds = re.findall(r"^python leaderboard\.py .*$", text, re.M)
    assert any("--suite spin" in c for c in cmds) and any("--suite space" in c for c in cmds)
    import shlex
    for c in cmds:
        leaderboard.parse_args(shlex.split(c.split("#")[0])[2:])


# -----------------------------------------------------------------------------
# Bad input, refused before any evaluation

def refused(argv, monkeypatch):
    calls = Counter(monkeypatch)
    with pytest.raises(SystemExit) as e:
        leaderboard.main(argv)
    assert calls.calls == []
    return str(e.value)


def test_a_missing_or_empty_run_is_refused(tmp_path, task_dir, monkeypatch):
    msg = refused([str(tmp_path / "nowhere"), "--tasks", "toy_mc", "--include-path", task_dir[0]], monkeypatch)
    assert str(tmp_path / "nowhere") in msg and "no such folder" in msg
    (tmp_path / "empty" / "iter_0").mkdir(parents=True)
    msg = refused([str(tmp_path / "empty"), "--tasks", "toy_mc", "--include-path", task_dir[0]], monkeypatch)
    assert str(tmp_path / "empty") in msg and "no export" in msg


def test_an_unknown_task_is_refused(run_dir, task_dir, monkeypatch):
    msg = refused([run_dir, "--tasks", "toy_mc,toy_mcq", "--include-path", task_dir[0]], monkeypatch)
    assert "unknown task 'toy_mcq'" in msg and "toy_mc" in msg.split("did you mean")[1]
    msg = refused([run_dir, "--tasks", "toy_mc", "--metric", "toy_mc=f1,none", "--include-path", task_dir[0]], monkeypatch)
    assert "toy_mc=f1,none" in msg and "acc,none, acc_norm,none" in msg


def test_a_folder_transformers_cannot_load_is_refused(run_dir, task_dir, tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad, ignore=shutil.ignore_patterns("eval", "ckpt"))
    config = json.loads((bad / "iter_1" / "config.json").read_text())
    (bad / "iter_1" / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    msg = refused([str(bad), "--tasks", "toy_mc", "--include-path", task_dir[0]], monkeypatch)
    assert f"{bad / 'iter_1' / 'config.json'}" in msg and "no-such-model" in msg
    (bad / "iter_1" / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    msg = refused([str(bad), "--tasks", "toy_mc", "--include-path", task_dir[0]], monkeypatch)
    assert f"{bad / 'iter_1' / 'model.safetensors'}" in msg and "mlp" in msg and "[96, 64]" in msg
    assert not (bad / "eval" / "cache").exists()


def test_a_real_pretrained_folder_passes_the_check(smollm2_dir):
    """SmolLM2-135M-Instruct: Llama architecture, tied embeddings (no lm_head tensor), tokenizer.json."""
    leaderboard.check_folder(smollm2_dir)


def test_without_lm_eval_the_command_names_the_pip_command(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(SystemExit) as e:
        leaderboard.main([run_dir, "--suite", "spin"])
    assert "pip install lm-eval==0.4.13" in str(e.value)
