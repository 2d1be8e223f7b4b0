"""Smoke runs of the benchmark scripts at a tiny size: they run to the end and print their tables."""
import importlib.util
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_bench_training(capsys, threads):
    _load("bench_training").main(["--device", "cpu", "--threads", "1", "--steps", "2", "--warmup", "1",
                                  "--eval-images", "60", "--mask-repeats", "2"])
    out = capsys.readouterr().out
    assert "masked" in out and "dense" in out


def test_bench_training_precision(capsys, threads):
    _load("bench_training").main(["--device", "cpu", "--threads", "1", "--precision-compare", "--tiny",
                                  "--eval-images", "60", "--shapes", "digits,cifar10"])
    out = capsys.readouterr().out
    assert out.count("| bf16 |") == 2 and "floor / min" in out and out.count("bf16/fp32 speed-up") == 2
    assert "1x8x8 inputs" in out and "3x32x32 inputs" in out
    side_by_side = out.split("| inputs |", 1)[1].splitlines()
    assert side_by_side[2].startswith("| digits (1x8x8) |") and side_by_side[3].startswith("| cifar10 (3x32x32) |")


def test_bench_connectivity(capsys, threads):
    _load("bench_connectivity").main(["--device", "cpu", "--threads", "1", "--quick", "--batch", "4", "--samples", "60"])
    out = capsys.readouterr().out
    assert out.count("|---") >= 2  # both sections' tables


def test_bench_sampling(capsys, threads):
    _load("bench_sampling").main(["--device", "cpu", "--quick", "--size", "64"])
    out = capsys.readouterr().out
    assert "64x64 tensor" in out and out.count("| cpu |") >= 4
