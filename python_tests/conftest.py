"""Shared test configuration: the device list, the CUDA auto-skip and the slow marker."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

#: Every device-parametrised test runs on these; CUDA only where a GPU is visible.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: needs a visible CUDA device (skipped otherwise)")
    config.addinivalue_line("markers", "slow: takes over ~10 s on 2 CPU cores (CI runs it; "
                                       "`-m 'not slow'` for a quick pass)")


#: Module fixtures that train several nets: every test using one is slow.
SLOW_FIXTURES = {"grid", "ticket", "imp_run"}


def pytest_collection_modifyitems(config, items):
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="no CUDA device visible")
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if skip is not None and "needs_cuda" in item.keywords:
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
