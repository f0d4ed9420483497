"""Shared test settings: deterministic, single-threaded torch for stable tolerances."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_defaults():
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CUDA is not available on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
