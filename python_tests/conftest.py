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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device visible")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)
