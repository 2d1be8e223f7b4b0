"""Progress of long work that shows on a terminal and in logs.

On a terminal: a tqdm bar. When stderr is not a terminal (``| tee``, CI, a batch job), where a bar
would print nothing useful: one plain line at most every ``MCWT_PROGRESS_INTERVAL`` seconds
(default 30) and one at the end, e.g.::

    train conv2: iteration 120/300, val_acc 0.9133, elapsed 41s, eta 1m02s

``enabled=False`` (the commands' ``--quiet``) silences both.
"""
from __future__ import annotations

import os
import sys
import time

__all__ = ["Progress", "note", "INTERVAL_ENV", "DEFAULT_INTERVAL_S"]

INTERVAL_ENV = "MCWT_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def note(message: str, enabled: bool = True) -> None:
    """One line of news on stderr (e.g. where a run resumes), unless silenced."""
    if enabled:
        print(message, file=sys.stderr, flush=True)


class Progress:
    """``total`` steps of work named ``desc``, ``initial`` of them already done (a resumed run).

    ``update(n)`` counts steps, ``set(**values)`` shows the latest values (e.g. ``val_acc``),
    ``close()`` ends it (also as a context manager). ``interval``: seconds between log lines
    (default: ``$MCWT_PROGRESS_INTERVAL`` or 30)."""

    def __init__(self, total: int, desc: str, *, unit: str = "it", noun: str = "iteration",
                 initial: int = 0, enabled: bool = True, leave: bool = True,
                 interval: float | None = None, stream=None):
        self.total, self.desc, self.noun, self.n = total, desc, noun, initial
        self.stream = stream if stream is not None else sys.stderr
        self.values: dict[str, str] = {}
        self._bar = None
        self._log = False
        if enabled and self.stream.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                             dynamic_ncols=True, file=self.stream)
        elif enabled:
            self._log = True
            self.interval = _interval() if interval is None else interval
            self._start = self._last = time.monotonic()
            self._initial = initial

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._log and time.monotonic() - self._last >= self.interval:
            self._line()

    def add_total(self, n: int) -> None:
        """``n`` more steps of work than first counted."""
        self.total += n
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def set(self, **values) -> None:
        self.values.update({k: f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in values.items()})
        if self._bar is not None:
            self._bar.set_postfix(self.values, refresh=False)

    def line(self) -> str:
        """The log line for the current state."""
        elapsed = time.monotonic() - self._start
        parts = [f"{self.noun} {self.n}/{self.total}"]
        parts += [f"{k} {v}" for k, v in self.values.items()]
        parts.append(f"elapsed {_duration(elapsed)}")
        done = self.n - self._initial
        if 0 < done and self.n < self.total:
            parts.append(f"eta {_duration(elapsed / done * (self.total - self.n))}")
        return f"{self.desc}: " + ", ".join(parts)

    def _line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._last = time.monotonic()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._log:
            self._line()
            self._log = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
