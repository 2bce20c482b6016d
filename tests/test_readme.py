"""Every command in README.md works, as a newcomer would type it on a fresh clone.

The commands are read out of the README itself (its bash blocks, and `python ...` / `torchrun ...` /
`bash ...` spans in the text, with any leading VAR=value), so a command added to or changed in the
README is tested as it stands, and one this file does not know how to check fails, naming it.

What is run: the commands that are cheap and need nothing from outside, in order, in one scratch
folder, as a reader would run them: the demo (on the smoke preset, so it takes seconds), `--resume`,
sample.py on the demo's own export, data.py's demo, check and convert on files made here, and
bench/gpu.sh (which, without a GPU, must say so and exit 0).

What is checked without running (GPUs, downloads, real checkpoints, long runs): every other
`python SCRIPT ...` or `torchrun ... SCRIPT ...` is parsed by SCRIPT's own argparse parser (train.py's
through train.parse_args, which also checks the per-iteration schedules; torchrun's flags by
torchrun's parser), and every `--flag` must be a whole option of that parser: argparse itself would
accept `--seed` for `--seeds`, a prefix. `pip install -r FILE`: FILE exists. `python -m pytest PATH`:
PATH exists, and .ci/run runs exactly that command. `bash .ci/run`: the file exists and runs the
README's test command. `sbatch FILE`: FILE exists and each command in it is checked as above, parsed
and never run. `python -c CODE` is run in the repository's root and must succeed.

To add a new kind of command, add a branch to `check_command` below, keyed on its first words:
run it when it is cheap and self-contained (copy what it needs into `workdir`), else parse it with
`parse_with_own_parser` and check whatever else it names (files that must exist). A new python
script needs no branch: it is parsed by its own parser. A new launcher in front of a command (like
`srun` or `torchrun`) goes in `strip_launchers`.
"""
import argparse
import glob
import json
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT
import train

README = os.path.join(ROOT, "README.md")
CI = os.path.join(ROOT, ".ci", "run")


def readme_commands():
    """Each command as a list of words, in the order the README gives them."""
    text = open(README, encoding="utf-8").read()
    found = []  # (position in the README, command)
    for block in re.finditer(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        if block.group(1).startswith("#!"):  # a job script, run whole with its commands stubbed (tests/test_train.py)
            continue
        body = block.group(1).replace("\\\n", " ")
        for line in body.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()  # a comment, at the start or after a space
            for part in filter(None, (p.strip() for p in line.split("&&"))):
                found.append((block.start(), part))
    for span in re.finditer(r"`((?:[A-Z_]+=\S+ )*(?:python|torchrun|bash) [^`]+)`", text):
        found.append((span.start(), span.group(1)))
    commands = []
    for _, cmd in sorted(found, key=lambda x: x[0]):
        words = shlex.split(cmd)
        if words not in commands:  # named again in the text: it was run where it first stood
            commands.append(words)
    return commands


COMMANDS = readme_commands()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The scratch folder the commands run in, with the inputs the README's examples name."""
    d = tmp_path_factory.mktemp("readme")
    chats = [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"},
                           {"role": "assistant", "content": f"{i} + {i} = {2 * i}"},
                           {"role": "user", "content": "And twice that?"},
                           {"role": "assistant", "content": f"{4 * i}"}]} for i in range(20)]
    sharegpt = [{"conversations": [{"from": "system", "value": "Be brief."}] +
                 [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in c["messages"]]}
                for c in chats]
    alpaca = [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}"} for i in range(20)]
    (d / "sharegpt.json").write_text(json.dumps(sharegpt))
    (d / "alpaca.json").write_text(json.dumps(alpaca))
    (d / "ultrachat_50k.raw.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    # zephyr-7b-sft-full's tokenizer.model is Mistral-7B's, which mistral-common ships
    import mistral_common
    os.makedirs(d / "zephyr-7b-sft-full")
    src = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    with open(src, "rb") as f, open(d / "zephyr-7b-sft-full" / "tokenizer.model", "wb") as g:
        g.write(f.read())
    return d


def run(cmd, cwd, env=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def script_path(word):
    return os.path.join(ROOT, word) if not os.path.isabs(word) else word


# -----------------------------------------------------------------------------
# Parsing a command with its script's own parser


class _Parsed(Exception):
    pass


def own_parser(script):
    """The argparse parser SCRIPT's command line builds: the script runs as `python SCRIPT` would
    (its folder first on sys.path) until it calls parse_args, where it is stopped."""
    path = script_path(script)
    assert os.path.exists(path), f"{script}: no such file in the repository"
    original = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise _Parsed(self)
    sys.path.insert(0, os.path.dirname(path))
    argparse.ArgumentParser.parse_args = stop
    try:
        runpy.run_path(path, run_name="__main__")
    except _Parsed as e:
        return e.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.path.remove(os.path.dirname(path))
    raise AssertionError(f"{script} ran to its end without parsing a command line")


def option_strings(parser, args):
    """Every option the parser takes, and those of the subcommand args name, if any."""
    options = set()
    for action in parser._actions:
        options.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for name in (a for a in args if a in action.choices):
                options |= option_strings(action.choices[name], [])
                break
    return options


def assert_whole_options(parser, args, what):
    """Each --flag (or --flag=value) in args is an option of parser, whole: argparse's own parsing
    would accept a unique prefix (`--seed` for `--seeds`)."""
    known = option_strings(parser, args)
    for flag in (a.split("=", 1)[0] for a in args if a.startswith("--")):
        assert flag in known, f"{what}: {flag} is not an option of its parser (options: {sorted(known)})"


def parse_with_own_parser(script, args):
    """`python SCRIPT ARGS`, checked without running it: parsed by SCRIPT's own parser (types, choices,
    required arguments), every flag a whole option."""
    what = shlex.join(["python", script, *args])
    if script == "train.py":  # its own parse_args also checks the schedules (--lr, --beta per iteration)
        parser = own_parser(script)
        try:
            train.parse_args(args)
        except SystemExit as e:
            raise AssertionError(f"{what}: train.py refuses its arguments") from e
    else:
        parser = own_parser(script)
        try:
            parser.parse_args(args)
        except SystemExit as e:
            raise AssertionError(f"{what}: {script}'s parser refuses its arguments") from e
    assert_whole_options(parser, args, what)


def strip_launchers(cmd):
    """(environment assignments, the command without what launches it, "torchrun" or None): VAR=value
    words, `srun [options]` (SLURM's launcher: its options are SLURM's, not checked here), and torchrun
    with its flags, which are parsed (and checked as whole options) by torchrun's own parser."""
    env = {}
    while cmd and "=" in cmd[0] and cmd[0].split("=", 1)[0].isidentifier():
        key, value = cmd[0].split("=", 1)
        env[key], cmd = value, cmd[1:]
    if cmd and cmd[0] == "srun":
        i = next((i for i, w in enumerate(cmd) if w in ("torchrun", "python")), None)
        assert i is not None, f"srun runs neither torchrun nor python: {shlex.join(cmd)}"
        cmd = cmd[i:]
    if cmd and cmd[0] == "torchrun":
        from torch.distributed.run import get_args_parser
        i = next((i for i, a in enumerate(cmd) if a.endswith(".py")), None)
        assert i is not None, f"torchrun without a script: {shlex.join(cmd)}"
        parser = get_args_parser()
        try:
            parser.parse_args(cmd[1:i + 1])
        except SystemExit as e:
            raise AssertionError(f"torchrun refuses {shlex.join(cmd[1:i])}") from e
        assert_whole_options(parser, cmd[1:i], "torchrun")
        return env, ["python", *cmd[i:]], "torchrun"
    return env, cmd, None


# -----------------------------------------------------------------------------
# The commands


def readme_test_command():
    found = [c for c in COMMANDS if c[:3] == ["python", "-m", "pytest"]]
    assert len(found) == 1, f"the README should give one test command, found {found}"
    return shlex.join(found[0])


def is_long_train_run(args):
    """The paper's recipe and everything on real checkpoints and data: parsed, not run."""
    return "paper" in args or "--model" in args or "--data" in args


def job_script_commands(path):
    """The commands of a batch script (an sbatch file): its lines with backslash continuations joined,
    comments and #SBATCH directives dropped."""
    text = open(path).read().replace("\\\n", " ")
    return [shlex.split(line) for line in (re.sub(r"(^|\s)#.*$", "", ln).strip() for ln in text.splitlines()) if line]


def check_command(cmd, workdir, parse_only=False):
    env, cmd, launcher = strip_launchers(cmd)
    distributed = parse_only or launcher is not None  # a distributed run is parsed, never run here
    head = cmd[0]

    if head in ("export", "set"):  # shell set-up in a job script: nothing to check
        return
    if head == "sbatch":  # a SLURM job script: it exists, and every command in it is checked, none run
        script = next((a for a in cmd[1:] if not a.startswith("-")), None)
        assert script and os.path.exists(os.path.join(ROOT, script)), f"{shlex.join(cmd)}: no such job script"
        for line in job_script_commands(os.path.join(ROOT, script)):
            check_command(line, workdir, parse_only=True)
        return
    if cmd[:2] == ["python", "-c"]:  # a one-liner a reader types in the repository's root: it must succeed
        res = run(cmd, ROOT, env)
        assert res.returncode == 0, f"{shlex.join(cmd)}:\n{res.stderr[-2000:]}"
        return

    if head == "pip":  # CI installs these: the requirement files it names must exist
        assert cmd[1] == "install", shlex.join(cmd)
        files = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-r"]
        for f in files:
            assert os.path.exists(os.path.join(ROOT, f)), f"pip install -r {f}: no such file"
        return
    if cmd[:3] == ["python", "-m", "pytest"]:  # CI runs it: its paths exist, and .ci/run runs this very command
        for path in (a for a in cmd[3:] if not a.startswith("-")):
            assert os.path.exists(os.path.join(ROOT, path)), f"{shlex.join(cmd)}: {path} does not exist"
        assert shlex.join(cmd) in open(CI).read().splitlines(), f".ci/run does not run `{shlex.join(cmd)}`"
        return
    if cmd == ["bash", ".ci/run"]:
        assert os.access(CI, os.R_OK)
        assert readme_test_command() in open(CI).read().splitlines(), ".ci/run does not run the README's test command"
        return
    if cmd[:2] == ["bash", "bench/gpu.sh"]:
        import torch
        if torch.cuda.is_available():  # the GPU checks take minutes: only its syntax here
            assert run(["bash", "-n", script_path(cmd[1])], workdir).returncode == 0
            return
        res = run(["bash", script_path(cmd[1]), *cmd[2:]], workdir)  # without a GPU it says so and exits 0
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert "no GPU" in res.stdout, res.stdout
        return
    assert head == "python", f"README command not covered by tests/test_readme.py: {shlex.join(cmd)}"

    script, args = cmd[1], cmd[2:]
    if script == "train.py" and not distributed and not is_long_train_run(args):
        if args in (["-h"], ["--help"]):
            assert run([sys.executable, script_path(script), *args], workdir).returncode == 0
            return
        # the demo and its --resume, on the smoke preset: the same run in seconds
        res = run([sys.executable, script_path(script), "--preset", "smoke", *args], workdir, env)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        assert "| θ_" in res.stdout
        if "--resume" in args:
            assert "resumed from" in res.stdout
        return
    on_the_demo = "--model" in args and args[args.index("--model") + 1].startswith("out/")  # what the demo made
    if script == "sample.py" and not distributed and on_the_demo:
        # the README names the demo's last export; the smoke preset makes fewer iterations
        i = args.index("--model") + 1
        last = sorted(glob.glob(os.path.join(workdir, os.path.dirname(args[i]), "iter_*")))
        assert last, f"{args[i]}: run the demo first"
        args = args[:i] + [last[-1]] + args[i + 1:]
        res = run([sys.executable, script_path(script), *args], workdir, env)
        assert res.returncode == 0 and res.stdout.strip(), res.stderr[-3000:]
        return
    if script == "data.py" and not distributed:
        res = run([sys.executable, script_path(script), *args], workdir, env)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        if args[0] == "convert":
            out = args[2]
            rejected = os.path.join(workdir, out[:-len(".jsonl")] + ".rejected.jsonl")
            assert os.path.getsize(os.path.join(workdir, out)) > 0 and os.path.exists(rejected)
        return
    # anything else (train.py on real checkpoints, the paper's recipe, benchmarks, studies, a new script)
    parse_with_own_parser(script, args)


@pytest.mark.parametrize("cmd", COMMANDS, ids=[" ".join(c)[:80] for c in COMMANDS])
def test_readme_command(cmd, workdir):
    check_command(cmd, workdir)


def test_the_readme_has_the_commands_a_newcomer_needs():
    words = [" ".join(c) for c in COMMANDS]
    for needed in ("python train.py", "--resume", "python sample.py", "python data.py check", "python data.py demo",
                   "python data.py convert", "python -m pytest -q tests"):
        assert any(needed in w for w in words), needed


# -----------------------------------------------------------------------------
# The checker itself fails where it should


@pytest.mark.parametrize("cmd, message", [
    ("python studies/plateau.py --seed 0", "--seed is not an option"),          # a prefix of --seeds
    ("python train.py --model m --data d --seed", "refuses"),                     # a flag without its value
    ("python train.py --model m --data d --lr-schedule 1", "refuses"),            # no such flag
    ("python train.py --model m --data d --iter 2", "--iter is not an option"),   # a prefix argparse accepts
    ("python bench/generate.py --device cuda --run 3", "--run is not an option"),
    ("torchrun --standalon --nproc_per_node 2 train.py --preset paper", "--standalon is not an option"),
    ("python bench/nothing.py --x", "no such file"),
    ("python -m pytest -q tests/nothing", "does not exist"),
    ("python -m pytest -x tests", ".ci/run does not run"),
    ("pip install -r requirements-gpu.txt", "no such file"),
    ("make all", "not covered"),
    ("sbatch jobs/none.sbatch", "no such job script"),
    ("python -c 'import sys; sys.exit(3)'", "python -c"),
])
def test_a_wrong_command_fails_with_its_reason(cmd, message, tmp_path):
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_command(shlex.split(cmd), tmp_path)


def test_launchers_are_stripped_and_their_flags_checked():
    env, cmd, launcher = strip_launchers(shlex.split("OMP_WAIT_POLICY=PASSIVE python bench/round.py --runs 1"))
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"} and cmd == ["python", "bench/round.py", "--runs", "1"]
    assert launcher is None
    line = ("srun --kill-on-bad-exit=1 torchrun --nnodes 2 --nproc_per_node 8 --signals-to-handle SIGTERM,SIGUSR1 "
            "train.py --resume --out runs/x")
    _, cmd, launcher = strip_launchers(shlex.split(line))
    assert cmd == ["python", "train.py", "--resume", "--out", "runs/x"] and launcher == "torchrun"
    check_command(shlex.split("srun torchrun --nproc_per_node 8 train.py --preset paper --out runs/x"), ROOT)


def test_a_job_script_is_checked_line_by_line(tmp_path):
    """sbatch FILE: each command in the file is checked as a README command would be, none is run."""
    job = tmp_path / "train.sbatch"
    job.write_text("#!/bin/bash\n#SBATCH --nodes=2 --signal=B:USR1@300 --requeue\nexport OMP_NUM_THREADS=8\n"
                   "srun torchrun --nnodes 2 --nproc_per_node 8 --signals-to-handle SIGTERM,SIGUSR1 \\\n"
                   "    train.py --preset paper --model zephyr --data d.jsonl --out runs/x\n")
    check_command(["sbatch", str(job)], tmp_path)
    job.write_text(job.read_text().replace("--out runs/x", "--out runs/x --resum"))  # a prefix of --resume
    with pytest.raises(AssertionError, match="--resum is not an option"):
        check_command(["sbatch", str(job)], tmp_path)
