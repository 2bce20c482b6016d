"""
Score every iteration of a run the way the papers did: lm-evaluation-harness on each `RUN/iter_t/`
export, the papers' task suites, a table of iteration x task with the average (SPIN's Table 4) and a
plot of the average per iteration (SPACE's Figure 2).

    python leaderboard.py runs/spin --suite spin --device cuda --batch-size auto
    python leaderboard.py runs/spin runs/space --suite space --backend vllm --report leaderboard
    python leaderboard.py out/demo --tasks my_mc,my_gen --include-path my_tasks --limit 20

Each RUN gets RUN/eval/: results.json (one row per iteration, task and metric), table.md and
average.png. With several RUNs the side-by-side table and plot go to --report DIR. A plain model
folder (one holding config.json) is accepted in place of a RUN.

Nothing is run twice: each (folder, task) result is kept in RUN/eval/cache/ under a key made of
everything that changes it (the folder's weights hash, the task config's hash, shots, --limit,
chat template or not, backend, dtype, lm-eval's version), written when that task finishes. A killed
evaluation loses the task in progress and nothing else; a --limit result has its own key, so it is
never taken for a full one.

lm-eval is optional (pip install lm-eval==0.4.13) and slow to import, so it is imported inside the
functions that use it; matplotlib is optional too (without it the plot is skipped). This file does
not import the rest of the project: an export is a Hugging Face folder, and lm-eval opens it with
transformers (or vLLM) as anyone else would.
"""
import argparse
import difflib
import functools
import glob
import hashlib
import json
import math
import os
import re
import time

LM_EVAL_PIN = "lm-eval==0.4.13"

# -----------------------------------------------------------------------------
# The suites: (task, shots, the metric the table shows). SPIN's Table 4 is the Open LLM Leaderboard
# v1: its six tasks at these shot counts, with these metrics, averaged with equal weight. The v1
# leaderboard averaged MMLU as the plain mean of its 57 subjects; lm-eval's own group value weights
# subjects by size, so the table shows the plain mean and the group value is kept in the rows.
# SPACE evaluates 10 tasks but the text we could read names only four of them (GSM8K, IFEval,
# TruthfulQA, HellaSwag) and no settings: its suite here is SPIN's six plus IFEval, our choice.
SPIN = [
    ("arc_challenge", 25, "acc_norm,none"),
    ("hellaswag", 10, "acc_norm,none"),
    ("truthfulqa_mc2", 0, "acc,none"),
    ("mmlu", 5, "subtask_mean(acc,none)"),
    ("winogrande", 5, "acc,none"),
    ("gsm8k", 5, "exact_match,strict-match"),
]
SUITES = {"spin": SPIN, "space": SPIN + [("ifeval", 0, "prompt_level_strict_acc,none")]}
SUITE_DIRS = ["arc", "hellaswag", "truthfulqa", "mmlu/default", "winogrande", "gsm8k", "ifeval"]  # in lm_eval/tasks/

# the files of an export that decide what a model computes: weights, config, tokenizer, template.
# selfplay.jsonl, samples.jsonl and eval/ are not among them, so a run that writes them keeps its hash.
MODEL_FILES = re.compile(r".*\.(safetensors|bin|json|model|jinja|txt|tiktoken)$")


def count_or_fraction(text):
    """--limit as lm-eval reads it: 20 examples, or 0.1 of each task."""
    x = float(text)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be above 0")
    return int(x) if x >= 1 and x.is_integer() else x


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="a run folder (its iter_*/ exports) or a model folder")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--suite", choices=sorted(SUITES), help="a paper's tasks, shots and metrics")
    which.add_argument("--tasks", help="comma-separated lm-eval task (or group) names")
    p.add_argument("--include-path", help="a folder of task YAMLs (local tasks work offline)")
    p.add_argument("--metric", action="append", default=[], metavar="TASK=METRIC",
                   help="the metric the table shows for TASK, an lm-eval key such as acc_norm,none "
                        "(default: the first its config lists); repeatable")
    p.add_argument("--num-fewshot", type=int, help="shots for every task, as lm-eval's flag (default: the suite's, "
                                                   "else each task's own); a task whose config says 0 stays at 0")
    p.add_argument("--limit", type=count_or_fraction, help="at most this many examples per task (a fraction if < 1): a quick look, "
                                               "not comparable with full scores")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="render prompts with each export's chat template, few-shot examples as turns (lm-eval's flag)")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="transformers, or vLLM where it is installed")
    p.add_argument("--batch-size", default="1", help="an integer, or auto (lm-eval finds the largest that fits)")
    p.add_argument("--device", help="hf backend: cuda, cuda:1, cpu (default: cuda if there is one)")
    p.add_argument("--dtype", default="auto", help="auto (the export's own), bfloat16, float16, float32")
    p.add_argument("--report", default="leaderboard", help="with several RUNs: where their side-by-side table and plot go")
    args = p.parse_args(argv)
    if args.batch_size != "auto" and not args.batch_size.isdigit():
        p.error(f"--batch-size {args.batch_size!r}: an integer or auto")
    for m in args.metric:
        if "=" not in m:
            p.error(f"--metric {m!r}: expected TASK=METRIC, e.g. arc_challenge=acc_norm,none")
    return args


# -----------------------------------------------------------------------------
# Runs and their exports

def find_folders(run):
    """[(iteration or None, folder)]: a run's iter_t exports in order, or a model folder on its own."""
    if not os.path.isdir(run):
        raise SystemExit(f"leaderboard.py: RUN {run}: no such folder")
    if os.path.exists(os.path.join(run, "config.json")):
        return [(None, run)]
    found = []
    for d in glob.glob(os.path.join(run, "iter_*")):
        m = re.fullmatch(r"iter_(\d+)", os.path.basename(d))
        if m and os.path.exists(os.path.join(d, "config.json")):
            found.append((int(m.group(1)), d))
    if not found:
        raise SystemExit(f"leaderboard.py: RUN {run}: holds no export (no iter_*/config.json, and no config.json of its "
                         f"own); point it at train.py's --out folder or at a model folder")
    return sorted(found)


def check_folder(folder):
    """Refuse, before any evaluation, a folder transformers cannot open: its config, its tokenizer,
    and its weights against the architecture the config names (names and shapes, on the meta device,
    so a 7B export is checked in a second without reading its tensors)."""
    import torch
    import transformers
    from safetensors import safe_open
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise SystemExit(f"leaderboard.py: {folder}/config.json: transformers cannot load it: {e}")
    try:
        transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise SystemExit(f"leaderboard.py: {folder}: transformers cannot load its tokenizer: {e}")
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        if glob.glob(os.path.join(folder, "*.bin")):
            return  # pytorch_model.bin: its names would cost a full read, transformers checks them at load
        raise SystemExit(f"leaderboard.py: {folder}: no weights (*.safetensors or *.bin)")
    stored = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                stored.update({k: (f, tuple(st.get_slice(k).get_shape())) for k in st.keys()})
        except Exception as e:
            raise SystemExit(f"leaderboard.py: {f}: not a readable safetensors file: {e}")
    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise SystemExit(f"leaderboard.py: {folder}/config.json: transformers has no causal LM for it: {e}")
    tied = set(getattr(model, "_tied_weights_keys", None) or []) if config.get_text_config().tie_word_embeddings else set()
    for name, t in model.state_dict().items():
        if name not in stored:
            if name in tied or (name == "lm_head.weight" and config.get_text_config().tie_word_embeddings):
                continue
            raise SystemExit(f"leaderboard.py: {folder}: no tensor {name} in its weights, which {type(model).__name__} "
                             f"(model_type {config.model_type!r} in config.json) needs")
        if stored[name][1] != tuple(t.shape):
            raise SystemExit(f"leaderboard.py: {stored[name][0]}: {name} has shape {list(stored[name][1])}, config.json "
                             f"makes it {list(t.shape)}")


def sha256_file(path, cache):
    """A file's sha256, remembered by (size, mtime) so a 14 GB export is read once, not on every call."""
    st = os.stat(path)
    stamp = [st.st_size, st.st_mtime_ns]
    if path in cache and cache[path][0] == stamp:
        return cache[path][1]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    cache[path] = [stamp, h.hexdigest()]
    return cache[path][1]


def weights_hash(folder, cache):
    """One hash of everything in an export that decides its scores: weights, config, tokenizer, template."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and MODEL_FILES.fullmatch(name):
            h.update(f"{name}\0{sha256_file(os.path.abspath(path), cache)}\0".encode())
    return h.hexdigest()


# -----------------------------------------------------------------------------
# Tasks: resolved from lm-eval's index of YAML configs, without building them (building a task
# downloads its data set), so a misspelt name or metric stops the command before any model loads.

def effective_shots(config_shots, requested):
    """lm-eval's rule: a requested count overrides a task's own, except a task that says 0."""
    if requested is not None and config_shots != 0:
        return requested
    return config_shots or 0


def task_keys(cfg):
    """The `metric,filter` keys lm-eval reports for a task, in its config's order."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY
    metrics = [m["metric"] for m in cfg.get("metric_list") or []]
    metrics = metrics or DEFAULT_METRIC_REGISTRY.get(cfg.get("output_type", "generate_until"), [])
    filters = [f["name"] for f in cfg.get("filter_list") or []] or ["none"]
    return [f"{m},{f}" for f in filters for m in metrics]


def expand(index, name, leaves, groups):
    """Walk a group down to its tasks: leaves {task: cfg}, groups {group: cfg}, each in lm-eval's order."""
    from lm_eval.tasks._index import Kind
    entry = index[name]
    if entry.kind == Kind.GROUP:
        groups[name] = entry.cfg
        for child in entry.cfg["task"]:
            if isinstance(child, dict):  # a task written inline in the group's YAML
                leaves[child.get("task") or child.get("group")] = child
            else:
                expand(index, child, leaves, groups)
    elif entry.kind == Kind.TAG:
        for t in sorted(entry.tags):
            expand(index, t, leaves, groups)
    else:
        leaves[name] = entry.cfg


def config_hash(configs):
    """A hash of task configs and the files they point at (the Python of a !function, local data files)."""
    h = hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode())
    seen = set()

    def files(x):
        if isinstance(x, dict):
            for v in x.values():
                files(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                files(v)
        elif isinstance(x, str) and len(x) < 4096:
            for path in (x, x.rsplit(".", 1)[0] + ".py"):  # a data file, or the module of "dir/utils.fn"
                if path not in seen and os.path.isfile(path):
                    seen.add(path)
                    h.update(f"{path}\0{sha256_file(path, {})}\0".encode())
    files(configs)
    return h.hexdigest()


def resolve_tasks(args, task_manager):
    """[{name, shots, n_shot, metric, keys, config_hash}] for --suite or --tasks, checked against lm-eval's index."""
    from lm_eval.tasks._index import Kind
    index = task_manager.task_index
    if args.suite:
        wanted = [(name, shots if args.num_fewshot is None else args.num_fewshot, metric)
                  for name, shots, metric in SUITES[args.suite]]
    else:
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not names:
            raise SystemExit("leaderboard.py: --tasks names no task")
        wanted = []
        for name in names:
            if name not in index:
                close = difflib.get_close_matches(name, task_manager.all_tasks, n=3)
                where = f"lm-eval's tasks or {args.include_path}" if args.include_path else "lm-eval's tasks (local " \
                        "YAMLs need --include-path)"
                raise SystemExit(f"leaderboard.py: --tasks: unknown task {name!r}: not in {where}"
                                 + (f"; did you mean {', '.join(close)}?" if close else ""))
            if index[name].kind == Kind.TAG:  # a tag is a list of tasks with no score of its own: one column each
                wanted += [(t, args.num_fewshot, None) for t in sorted(index[name].tags)]
            else:
                wanted.append((name, args.num_fewshot, None))
    for name, _, _ in wanted:
        if name not in index:
            raise SystemExit(f"leaderboard.py: --suite {args.suite}: lm-eval {lm_eval_version()} has no task {name!r}; "
                             f"the suites are written for {LM_EVAL_PIN}")
    overrides = dict(m.split("=", 1) for m in args.metric)
    for task in overrides:
        if task not in [w[0] for w in wanted]:
            raise SystemExit(f"leaderboard.py: --metric {task}=...: {task} is not among the tasks evaluated")
    tasks = []
    for name, shots, metric in wanted:
        leaves, groups = {}, {}
        expand(index, name, leaves, groups)
        leaf_keys = task_keys(next(iter(leaves.values())))
        if groups:
            keys = [f"{m['metric']},{f}" for m in groups[name].get("aggregate_metric_list") or []
                    for f in m.get("filter_list", ["none"])]
            keys += [f"subtask_mean({k})" for k in leaf_keys]
        else:
            keys = leaf_keys
        metric = overrides.get(name, metric) or keys[0]
        if metric not in keys:
            raise SystemExit(f"leaderboard.py: --metric {name}={metric}: {name} reports {', '.join(keys)}")
        tasks.append(dict(name=name, shots=shots, metric=metric, keys=keys,
                          n_shot={t: effective_shots(c.get("num_fewshot"), shots) for t, c in leaves.items()},
                          subtasks=list(leaves) if groups else [],
                          config_hash=config_hash({"groups": groups, "tasks": leaves})))
    return tasks


@functools.lru_cache(maxsize=None)
def task_manager_for(paths, include_defaults=True):
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=list(paths) or None, include_defaults=include_defaults)


def find_task_manager(args):
    """lm-eval's index of task YAMLs. All of lm-eval's is about 14,000 files, 10-30 s to read; the
    suites' tasks live in seven of its folders and local tasks in --include-path, so those are read
    alone when they hold every task asked for (the same YAMLs, so the same tasks), else all of it."""
    import lm_eval.tasks
    local = (args.include_path,) if args.include_path else ()
    if args.suite:
        root = os.path.dirname(lm_eval.tasks.__file__)
        names = [name for name, _, _ in SUITES[args.suite]]
        narrow = tuple(os.path.join(root, d) for d in SUITE_DIRS) + local
    else:
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        narrow = local
    if narrow:
        tm = task_manager_for(narrow, include_defaults=False)
        try:
            for name in names:
                expand(tm.task_index, name, {}, {})
            return tm
        except KeyError:
            pass  # a name (or a group's member) lives elsewhere in lm-eval
    return task_manager_for(local)


def lm_eval_version():
    import importlib.metadata
    return importlib.metadata.version("lm_eval")


# -----------------------------------------------------------------------------
# Evaluation, one (folder, task) at a time, each kept on disk as it finishes

def load_lm(folder, args):
    import torch
    from lm_eval.api.registry import get_model
    model_args = {"pretrained": folder, "dtype": args.dtype}
    batch = {"batch_size": args.batch_size if args.batch_size == "auto" else int(args.batch_size)}
    if args.backend == "hf":
        batch["device"] = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return get_model(args.backend).create_from_arg_obj(model_args, batch)


def run_task(lm, task, args, task_manager):
    """lm-eval's simple_evaluate on one task, as its own command line would run it."""
    from lm_eval import evaluator
    return evaluator.simple_evaluate(model=lm, tasks=[task["name"]], num_fewshot=task["shots"], limit=args.limit,
                                     apply_chat_template=args.apply_chat_template, task_manager=task_manager,
                                     log_samples=False)


def jsonable(x):
    """lm-eval's results as plain JSON: numpy scalars as numbers, anything else (functions) as text."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def evaluate_run(run, folders, tasks, args, task_manager, hashes):
    """{(folder, task): kept result}, running only what the cache does not hold."""
    version = lm_eval_version()
    out = {}
    for iteration, folder in folders:
        lm = None
        wh = weights_hash(folder, hashes)
        for task in tasks:
            key = dict(weights=wh, task=task["name"], config=task["config_hash"], shots=task["shots"],
                       limit=args.limit, chat_template=args.apply_chat_template, backend=args.backend,
                       dtype=args.dtype, lm_eval=version)
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
            path = os.path.join(run, "eval", "cache", f"{os.path.basename(os.path.normpath(folder))}-{task['name']}-{digest}.json")
            label = f"{folder} {task['name']}"
            if os.path.exists(path):
                with open(path) as f:
                    kept = json.load(f)
                if kept["key"] == key:
                    out[folder, task["name"]] = kept
                    print(f"{label}: kept ({path})")
                    continue
            if lm is None:
                print(f"{folder}: loading ({args.backend}, {args.dtype})")
                lm = load_lm(folder, args)
            t0 = time.time()
            res = run_task(lm, task, args, task_manager)
            kept = jsonable(dict(key=key, seconds=round(time.time() - t0, 1), results=res["results"],
                                 n_shot=res.get("n-shot", {}), versions=res.get("versions", {}),
                                 configs=res.get("configs", {}), group_subtasks=res.get("group_subtasks", {})))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(kept, f, indent=1)
            os.replace(path + ".tmp", path)  # a kill mid-write leaves no half result behind
            out[folder, task["name"]] = kept
            print(f"{label}: ran in {kept['seconds']} s")
        if lm is not None:
            del lm
            import gc
            gc.collect()
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        hashes_path = os.path.join(run, "eval", "hashes.json")
        os.makedirs(os.path.dirname(hashes_path), exist_ok=True)
        with open(hashes_path, "w") as f:
            json.dump(hashes, f, indent=1)
    return out


def rows_of(run, iteration, folder, task, kept):
    """One row per (task or subtask, metric) lm-eval reported, then the plain means over a group's subtasks."""
    def number(x):
        return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None

    rows = []
    for name, metrics in kept["results"].items():
        for k, v in metrics.items():
            if "," not in k or "_stderr," in k or number(v) is None:
                continue
            m, f = k.split(",", 1)
            rows.append(dict(run=run, folder=folder, iteration=iteration, task=name, metric=k, value=number(v),
                             stderr=number(metrics.get(f"{m}_stderr,{f}"))))
    for k in task["keys"]:
        inner = re.fullmatch(r"subtask_mean\((.*)\)", k)
        if not inner:
            continue
        vals = [r for r in rows if r["task"] in task["subtasks"] and r["metric"] == inner.group(1)]
        if len(vals) == len(task["subtasks"]):
            errs = [r["stderr"] for r in vals]
            se = math.sqrt(sum(e * e for e in errs)) / len(errs) if None not in errs else None
            rows.append(dict(run=run, folder=folder, iteration=iteration, task=task["name"], metric=k,
                             value=sum(r["value"] for r in vals) / len(vals), stderr=se))
    return rows


# -----------------------------------------------------------------------------
# Tables and the plot

def table_values(rows, tasks):
    """{(run, folder): {task: value}} with the metric each task shows in the table."""
    shown = {t["name"]: t["metric"] for t in tasks}
    grid = {}
    for r in rows:
        if shown.get(r["task"]) == r["metric"]:
            grid.setdefault((r["run"], r["folder"], r["iteration"]), {})[r["task"]] = r["value"]
    return grid


def average(values, tasks):
    if all(t["name"] in values for t in tasks):
        return sum(values[t["name"]] for t in tasks) / len(tasks)
    return None


def markdown_table(rows, tasks, args, several):
    """SPIN's Table 4 layout: a row per iteration, a column per task, then the average; scores × 100."""
    grid = table_values(rows, tasks)
    head = ["run"] * several + ["iteration"] + [f"{t['name']} ({shots_label(t)}, {t['metric']})" for t in tasks] + ["average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (run, folder, iteration), values in grid.items():
        cells = [run] * several + [str(iteration) if iteration is not None else os.path.basename(os.path.normpath(folder))]
        cells += [fmt(values.get(t["name"])) for t in tasks] + [fmt(average(values, tasks))]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"lm-eval {lm_eval_version()}, backend {args.backend}, dtype {args.dtype}, "
             f"chat template {'on' if args.apply_chat_template else 'off'}; scores × 100."]
    if args.limit is not None:
        notes.append(f"--limit {args.limit}: a quick look on part of each task, not comparable with full scores.")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


def shots_label(task):
    n = sorted(set(task["n_shot"].values()))
    return f"{n[0]}-shot" if len(n) == 1 else f"{n[0]}-{n[-1]}-shot"


def fmt(v):
    return "" if v is None else f"{100 * v:.2f}"


def plot(rows, tasks, path, title):
    """The average per iteration, one line per run (SPACE's Figure 2)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: {path} skipped, the tables are written (pip install matplotlib)")
        return None
    by_run = {}
    for (run, folder, iteration), values in table_values(rows, tasks).items():
        avg = average(values, tasks)
        if avg is not None:
            by_run.setdefault(run, []).append((iteration if iteration is not None else len(by_run.get(run, [])), 100 * avg))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for run, points in by_run.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=run)
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"average of {len(tasks)} tasks (× 100)")
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out_dir, rows, tasks, args, folders_info, several):
    """results.json, table.md and average.png in out_dir; returns the table."""
    os.makedirs(out_dir, exist_ok=True)
    results = dict(rows=rows, lm_eval_version=lm_eval_version(),
                   tasks={t["name"]: dict(shots=t["shots"], n_shot=t["n_shot"], metric=t["metric"],
                                          config_hash=t["config_hash"]) for t in tasks},
                   folders=folders_info,
                   settings=dict(limit=args.limit, backend=args.backend, dtype=args.dtype,
                                 apply_chat_template=args.apply_chat_template, suite=args.suite))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = markdown_table(rows, tasks, args, several)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table)
    plot(rows, tasks, os.path.join(out_dir, "average.png"), args.suite or "tasks")
    return table


def main(argv=None):
    args = parse_args(argv)
    runs = {run: find_folders(run) for run in args.runs}
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise SystemExit(f"leaderboard.py needs lm-evaluation-harness: pip install {LM_EVAL_PIN}")
    if args.include_path and not os.path.isdir(args.include_path):
        raise SystemExit(f"leaderboard.py: --include-path {args.include_path}: no such folder")
    if args.backend == "vllm":
        import importlib.util
        if importlib.util.find_spec("vllm") is None:
            raise SystemExit("leaderboard.py: --backend vllm: vLLM is not installed (pip install vllm), or use --backend hf")
    task_manager = find_task_manager(args)
    tasks = resolve_tasks(args, task_manager)
    for folders in runs.values():
        for _, folder in folders:
            check_folder(folder)
    all_rows = []
    for run, folders in runs.items():
        hashes_path = os.path.join(run, "eval", "hashes.json")
        hashes = json.load(open(hashes_path)) if os.path.exists(hashes_path) else {}
        kept = evaluate_run(run, folders, tasks, args, task_manager, hashes)
        rows, info = [], {}
        for iteration, folder in folders:
            info[folder] = dict(iteration=iteration, weights_hash=weights_hash(folder, hashes))
            for task in tasks:
                rows += rows_of(os.path.normpath(run), iteration, folder, task, kept[folder, task["name"]])
        table = write_report(os.path.join(run, "eval"), rows, tasks, args, info, several=False)
        print(f"\n{run}: {os.path.join(run, 'eval', 'results.json')}\n\n{table}")
        all_rows += rows
    if len(runs) > 1:
        info = {}
        for run, folders in runs.items():
            with open(os.path.join(run, "eval", "results.json")) as f:
                info.update(json.load(f)["folders"])
        table = write_report(args.report, all_rows, tasks, args, info, several=True)
        print(f"\nall runs: {os.path.join(args.report, 'results.json')}\n\n{table}")


if __name__ == "__main__":
    main()
