"""What a grid asks of the trainings it runs, without the trainings knowing the grid.

- A **deadline** (``mcwt reproduce --time-budget`` when cells train one by one): a training checks
  :func:`deadline_passed` between steps; past it, the training checkpoints and raises
  :class:`BudgetSpent`, a planned stop. The checkpoint travels in the state bundle, so the stop
  loses nothing.
- A **saver** (``--export-every-minutes``): called after every training checkpoint and at the end
  of every cell (:func:`saved_point`), it writes the state bundle when it is due.

Both are process-wide (set around a grid's run, and around each cell in a worker process): a pack trains in another
thread than the one that started the grid, and must see them too.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

__all__ = ["BudgetSpent", "stopping_at", "saving_with", "deadline_passed", "saved_point"]


class BudgetSpent(Exception):
    """The time budget ran out: a planned stop (the state goes on elsewhere)."""


_deadline: float | None = None          # time.time() at which trainings stop
_saver: Callable[[], None] | None = None


@contextlib.contextmanager
def stopping_at(deadline: float | None):
    """Trainings inside stop at ``deadline`` (seconds since the epoch; None: never)."""
    global _deadline
    before, _deadline = _deadline, deadline
    try:
        yield
    finally:
        _deadline = before


@contextlib.contextmanager
def saving_with(saver: Callable[[], None] | None):
    """Trainings inside call ``saver`` after each checkpoint, and cells at their end."""
    global _saver
    before, _saver = _saver, saver
    try:
        yield
    finally:
        _saver = before


def deadline_passed() -> bool:
    return _deadline is not None and time.time() >= _deadline


def saved_point() -> None:
    """A consistent point: a checkpoint was just written, or a cell just ended."""
    if _saver is not None:
        _saver()
