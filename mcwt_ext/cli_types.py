"""The ``mcwt`` command line's argument types. Each parses one flag's text and raises
``ArgumentTypeError``, which argparse turns into one error line naming the flag; registries
(architectures, Table 1 rows) are read where a type needs them, so a new entry needs no edit here.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .imp import KINDS
from .models import ARCHS
from .validate import check_rate, check_seed, check_sparsity


def int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


positive_int, nonnegative_int = int_at_least(1), int_at_least(0)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def unit_share(text: str) -> float:
    """A share in (0, 1]."""
    value = _number(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} does not lie in (0, 1]")
    return value


def _checked(check, parse):
    """An argument type from a :mod:`mcwt_ext.validate` check."""
    def arg(text: str):
        try:
            return check(parse(text), "value")
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    arg.__name__ = check.__name__.removeprefix("check_")
    return arg


sparsity = _checked(check_sparsity, _number)
rate = _checked(check_rate, _number)
seed = _checked(check_seed, _integer)


def rates_spec(text: str) -> dict[str, float]:
    """``conv=0.1,linear=0.2,output=0.1`` (any subset of the kinds)."""
    rates = {}
    for item in text.split(","):
        kind, sep, value = item.partition("=")
        kind = kind.strip()
        if not sep or kind not in KINDS:
            raise argparse.ArgumentTypeError(f"{item!r} is not KIND=RATE with KIND one of {', '.join(KINDS)}")
        rates[kind] = rate(value)
    return rates


def device_spec(text: str) -> str:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device is visible")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA device(s) visible "
                                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return text


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return path


def arch_list(text: str) -> list[str]:
    archs = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in archs if a not in ARCHS]
    if bad or not archs:
        raise argparse.ArgumentTypeError(f"{text!r}: architectures must be a comma list of "
                                         f"{', '.join(sorted(ARCHS))}")
    return archs


def library_type(parse):
    """An argparse type from a library parser whose ValueError names the flag."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as e:  # argparse names the flag itself: drop the library's "--flag: "
            msg = str(e)
            raise argparse.ArgumentTypeError(msg.split(": ", 1)[1] if msg.startswith("--") else msg) from None
    convert.__name__ = parse.__name__.removeprefix("parse_")
    return convert


def methods_help() -> str:
    """Every registered Table 1 row as ``key (label)``, so --help lists what the registry holds."""
    from .experiments.methods import METHODS

    return "; ".join(f"{k} ({m.label})" for k, m in METHODS.items())


def methods_spec(text: str) -> str | list[str]:
    from .experiments.methods import select_methods

    try:
        select_methods(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("methods: ")) from None
    return text
