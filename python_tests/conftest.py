"""Shared test configuration: the device list, the CUDA auto-skip, the slow and numerics markers."""
import importlib.util
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

#: The directory the mcwt_ext under test was imported from: the checkout (in-place build) or
#: site-packages (`pip install .`, as in CI). A child Python must import the same package, not an
#: unbuilt source tree, so it runs with this first on its path and as its working directory
#: (``python -m`` puts the working directory first).
IMPORT_ROOT = str(Path(importlib.util.find_spec("mcwt_ext").origin).parents[1])


def child_env(**extra) -> dict:
    """The environment of a child Python that imports the mcwt_ext under test."""
    return {**os.environ, "PYTHONPATH": IMPORT_ROOT, **extra}


#: Every device-parametrised test runs on these. The CUDA variant carries the needs_cuda mark, so
#: `-m needs_cuda` selects every CUDA test (scripts/gpu_check.sh) and a CPU skips them.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: needs a visible CUDA device (skipped otherwise)")
    config.addinivalue_line("markers", "slow: takes over ~10 s on 2 CPU cores (CI runs it; "
                                       "`-m 'not slow'` for a quick pass)")
    config.addinivalue_line("markers", "numerics: compares computation paths; CI reruns these under "
                                       "other arithmetic")


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


def fake_clock(monkeypatch, module, step_s: float) -> None:
    """``module``'s ``time.monotonic`` (its checkpoint clock) reads ``step_s`` seconds later each
    time it is read; its ``time.perf_counter`` stays real."""
    readings = iter(range(10**9))
    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=time.perf_counter,
                                                        monotonic=lambda: next(readings) * step_s))
