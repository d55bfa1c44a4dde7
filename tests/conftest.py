import os

os.environ.setdefault("MEMLAB_FAST", "1")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
    # Notebook and browser tests time kernels in other processes against a 2-minute limit:
    # run them first, while the test process itself is still idle and small.
    items.sort(key=lambda it: 0 if ("notebook" in it.keywords or "browser" in it.keywords) else 1)


def pytest_configure(config):
    # two workers on two cores: one intra-op thread each (tests that want more set it)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread_module():
    """one_thread for a whole module (the dashboard tests: many tiny runs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
