import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many tiny checks: on a shared 2-core machine, intra-op threads only
    add waiting (measured 4× slower with 2 threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
