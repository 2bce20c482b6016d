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
