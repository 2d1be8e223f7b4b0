"""Shared test configuration: the device list and the CUDA auto-skip."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

#: Every device-parametrised test runs on these; CUDA only where a GPU is visible.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: needs a visible CUDA device (skipped otherwise)")
    config.addinivalue_line("markers", "slow: takes more than about 10 s (deselect with -m 'not slow')")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device visible")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def synthetic():
    """The tiny synthetic dataset (3x8x8, 10 classes) of the fast training tests."""
    from mcwt_ext.data import load_dataset

    return load_dataset("synthetic")


def synthetic_model(seed=0):
    """Conv-2 sized for :func:`synthetic`."""
    from mcwt_ext.models import build_model

    return build_model("conv2", 3, 10, 8, seed=seed)
