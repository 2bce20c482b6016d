"""Every command in README.md works, as a newcomer would type it on a fresh clone.

The commands are read out of the README itself (its bash blocks, and `python ...` / `torchrun ...`
spans in the text), so a command added to or changed in the README is tested as it stands, and one
this file does not know how to check fails. They run in order in one scratch folder, as a reader
would run them: the demo (on the smoke preset, so it takes seconds), `--resume`, sample.py on the
demo's own export, and data.py's demo, check and convert on files made here. Commands that need
GPUs, downloads or long runs (the paper's recipe, the benchmarks, the studies) have their arguments
parsed instead: train.py's by its own parser (torchrun's by torchrun's), a benchmark's by running it
with --help and finding every flag the README gives it in the help text."""
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT
import train

README = os.path.join(ROOT, "README.md")


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
    for span in re.finditer(r"`((?:python|torchrun) [^`]+)`", text):
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


def run(cmd, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def script_path(word):
    return os.path.join(ROOT, word) if word.endswith(".py") and not os.path.isabs(word) else word


def check_help_lists_flags(script, args, cwd):
    """A long or GPU-only command: its script's --help works and knows every flag the README gives it."""
    res = run([sys.executable, script_path(script), "--help"], cwd)
    assert res.returncode == 0, res.stderr[-2000:]
    for flag in (a.split("=")[0] for a in args if a.startswith("--")):
        assert flag in res.stdout, f"{script} --help does not list {flag}"


def is_long_train_run(args):
    """The paper's recipe and everything on real checkpoints and data: parsed, not run."""
    return "paper" in args or "--model" in args or "--data" in args


@pytest.mark.parametrize("cmd", COMMANDS, ids=[" ".join(c)[:80] for c in COMMANDS])
def test_readme_command(cmd, workdir):
    head = cmd[0]
    if head == "pip" or cmd[:3] == ["python", "-m", "pytest"] or cmd == ["bash", ".ci/run"]:
        assert head != "pip" or all(os.path.exists(os.path.join(ROOT, a)) for a in cmd if a.endswith(".txt"))
        return  # CI itself installs and runs these
    if head == "torchrun":
        from torch.distributed.run import get_args_parser
        i = next(i for i, a in enumerate(cmd) if a.endswith(".py"))
        get_args_parser().parse_args(cmd[1:i + 1])  # torchrun's own flags
        if cmd[i] == "train.py":
            train.parse_args(cmd[i + 1:])  # raises SystemExit on a flag train.py does not take
        else:
            assert cmd[i].startswith("bench/"), shlex.join(cmd)
            check_help_lists_flags(cmd[i], cmd[i + 1:], workdir)
        return
    assert head == "python", f"README command not covered by tests/test_readme.py: {shlex.join(cmd)}"
    script, args = cmd[1], cmd[2:]
    if script == "train.py":
        if args in (["-h"], ["--help"]):
            assert run([sys.executable, script_path(script), *args], workdir).returncode == 0
        elif is_long_train_run(args):
            train.parse_args(args)
        else:  # the demo and its --resume, on the smoke preset: the same run in seconds
            res = run([sys.executable, script_path(script), "--preset", "smoke", *args], workdir)
            assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
            assert "| θ_" in res.stdout
            if "--resume" in args:
                assert "resumed from" in res.stdout
        return
    if script == "sample.py" and args[args.index("--model") + 1].startswith("out/"):
        # the README names the demo's last export; the smoke preset makes fewer iterations
        i = args.index("--model") + 1
        last = sorted(glob.glob(os.path.join(workdir, os.path.dirname(args[i]), "iter_*")))
        assert last, f"{args[i]}: run the demo first"
        args = args[:i] + [last[-1]] + args[i + 1:]
        res = run([sys.executable, script_path(script), *args], workdir)
        assert res.returncode == 0 and res.stdout.strip(), res.stderr[-3000:]
        return
    if script == "data.py":
        res = run([sys.executable, script_path(script), *args], workdir)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        if args[0] == "convert":
            out = args[2]
            rejected = os.path.join(workdir, out[:-len(".jsonl")] + ".rejected.jsonl")
            assert os.path.getsize(os.path.join(workdir, out)) > 0 and os.path.exists(rejected)
        return
    if script.startswith(("bench/", "tools/")) or script == "sample.py":  # downloads, real checkpoints: parsed
        check_help_lists_flags(script, args, workdir)
        return
    raise AssertionError(f"README command not covered by tests/test_readme.py: {shlex.join(cmd)}")


def test_the_readme_has_the_commands_a_newcomer_needs():
    words = [" ".join(c) for c in COMMANDS]
    for needed in ("python train.py", "--resume", "python sample.py", "python data.py check", "python data.py demo",
                   "python data.py convert", "python -m pytest -q tests"):
        assert any(needed in w for w in words), needed
