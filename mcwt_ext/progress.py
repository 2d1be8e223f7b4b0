"""Progress of long work that shows on a terminal and in logs.

On a terminal: a tqdm bar. When stderr is not a terminal (``| tee``, CI, a batch job), where a bar
would print nothing useful: plain lines, at least one every ``MCWT_PROGRESS_INTERVAL`` seconds
(default 30) and one at the end, e.g.::

    train conv2: iteration 120/300, val_acc 0.9133, elapsed 41s, eta 1m02s

A step that ends ``interval`` seconds after the last line prints one; between steps (a long
evaluation, a checkpoint, a slow batch) a heartbeat thread prints the innermost open bar's line
once the log has been silent for ``interval`` seconds, naming the work under way (``Progress.aside``:
``..., evaluating``). ``enabled=False`` (the commands' ``--quiet``) silences both.

The ETA is measured in this process alone (a resumed run's earlier steps, done elsewhere, count
neither as done nor in a rate): steps left x this process's time per step (everything but the
evaluations: checkpoints included) + evaluations left x this process's time per evaluation
(``Progress.evaluating``). Until an evaluation has been timed here, the evaluations left are named
instead of guessed: ``eta 1m02s + 2 evaluations``. A bar that did no work in this process (a grid
whose cells are all done) closes without a line.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

__all__ = ["Progress", "note", "INTERVAL_ENV", "DEFAULT_INTERVAL_S"]

INTERVAL_ENV = "MCWT_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0

_now = time.monotonic  # the clock of the lines (a test may replace it)


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


class _Log:
    """The open log-line bars of this process (innermost last), when any of them last printed,
    and the heartbeat thread that prints the innermost one's line when the log falls silent."""

    def __init__(self):
        self.cond = threading.Condition(threading.RLock())
        self.bars: list[Progress] = []
        self.last = -float("inf")
        self.thread: threading.Thread | None = None

    def open(self, bar: "Progress") -> None:
        with self.cond:
            self.bars.append(bar)
            if self.thread is None and bar.interval > 0:
                self.thread = threading.Thread(target=self._beat, daemon=True, name="mcwt-progress")
                self.thread.start()
            self.cond.notify()

    def close(self, bar: "Progress") -> None:
        with self.cond:
            if bar in self.bars:
                self.bars.remove(bar)
            self.cond.notify()

    def _beat(self) -> None:
        with self.cond:
            while self.bars:
                bar = self.bars[-1]
                if bar.interval <= 0:  # a line per step: nothing to fill in
                    self.cond.wait()
                    continue
                wait = max(self.last, bar._start) + bar.interval - _now()
                if wait > 0:
                    self.cond.wait(wait)
                    continue
                try:
                    bar._line()
                except (OSError, ValueError):  # its stream is gone: stop beating for it
                    self.bars.remove(bar)
            self.thread = None


_log = _Log()


def _reset_after_fork() -> None:  # a forked child has neither the thread nor the parent's bars
    global _log
    _log = _Log()


os.register_at_fork(after_in_child=_reset_after_fork)


class Progress:
    """``total`` steps of work named ``desc``, ``initial`` of them already done (a resumed run).

    ``update(n)`` counts steps, ``set(**values)`` shows the latest values (e.g. ``val_acc``),
    ``aside(what)`` wraps work that is not a step (a checkpoint), ``evaluating(k)`` one of the
    ``evaluations`` this process has to run (k of them at once: a pack's nets), ``close()`` ends
    it (also as a context manager). ``interval``: seconds between log lines (default:
    ``$MCWT_PROGRESS_INTERVAL`` or 30)."""

    def __init__(self, total: int, desc: str, *, unit: str = "it", noun: str = "iteration",
                 initial: int = 0, evaluations: int = 0, enabled: bool = True, leave: bool = True,
                 interval: float | None = None, stream=None):
        self.total, self.desc, self.noun, self.n = total, desc, noun, initial
        self.stream = stream if stream is not None else sys.stderr
        self.values: dict[str, str] = {}
        self.doing: str | None = None  # the work aside under way, named in heartbeat lines
        self._bar = None
        self._log = False
        if enabled and self.stream.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                             dynamic_ncols=True, file=self.stream)
        elif enabled:
            self._log = True
            self.interval = _interval() if interval is None else interval
            self._start = self._last = _now()
            self._initial = initial
            self._evals_left = evaluations  # not yet finished (the one under way included)
            self._evals_done = 0       # timed in this process
            self._eval_s = 0.0         # seconds they took
            self._eval_from = None     # (when the evaluation under way began, how many it counts)
            self._printed = None       # (n, values, doing) of the last line
            _log.open(self)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._log and self.n < self.total and _now() - self._last >= self.interval:
            self._line()  # the last step's line is close()'s, with the final values

    def set(self, **values) -> None:
        # a new dict, swapped in whole: the heartbeat thread may be reading the old one
        self.values = {**self.values, **{k: f"{v:.4f}" if isinstance(v, float) else str(v)
                                         for k, v in values.items()}}
        if self._bar is not None:
            self._bar.set_postfix(self.values, refresh=False)

    @contextlib.contextmanager
    def aside(self, what: str):
        """Work between steps (``what``: e.g. "checkpointing"), named by the heartbeat lines
        printed while it lasts; its time counts as the steps' (it recurs with them)."""
        if not self._log:
            yield
            return
        self.doing = what
        try:
            yield
        finally:
            self.doing = None

    @contextlib.contextmanager
    def evaluating(self, count: int = 1):
        """``count`` of the evaluations, timed apart from the steps for the ETA."""
        if not self._log:
            yield
            return
        with self.aside("evaluating"):
            with _log.cond:  # the heartbeat thread reads these together
                self._eval_from = (_now(), count)
            try:
                yield
            finally:
                with _log.cond:
                    self._eval_s += _now() - self._eval_from[0]
                    self._evals_done += count
                    self._evals_left = max(0, self._evals_left - count)
                    self._eval_from = None

    def _eta(self, now: float) -> str | None:
        """The time left (see the module's doc), None before a step was timed here."""
        steps_left = max(0, self.total - self.n)
        under_way, began = (0, now) if self._eval_from is None else (self._eval_from[1], self._eval_from[0])
        eval_s = self._eval_s + (now - began)  # the evaluation under way's time so far included
        done = self.n - self._initial
        if steps_left and done <= 0:
            return None
        seconds = steps_left * max(0.0, now - self._start - eval_s) / done if steps_left else 0.0
        if not self._evals_left:
            return _duration(seconds) if steps_left else None
        if not self._evals_done:
            k = self._evals_left
            return f"{_duration(seconds)} + {k} evaluation{'' if k == 1 else 's'}"
        per = self._eval_s / self._evals_done
        seconds += per * max(0, self._evals_left - under_way) + max(0.0, per * under_way - (now - began))
        return _duration(seconds)

    def line(self) -> str:
        """The log line for the current state."""
        with _log.cond:
            now = _now()
            parts = [f"{self.noun} {self.n}/{self.total}"]
            parts += [f"{k} {v}" for k, v in self.values.items()]
            parts.append(f"elapsed {_duration(now - self._start)}")
            eta = self._eta(now)
            if eta is not None:
                parts.append(f"eta {eta}")
            if self.doing:
                parts.append(self.doing)
            return f"{self.desc}: " + ", ".join(parts)

    def _line(self) -> None:
        with _log.cond:  # one writer at a time: the heartbeat thread prints too
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._printed = (self.n, self.values, self.doing)
            self._last = _log.last = _now()
            _log.cond.notify()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._log:
            _log.close(self)
            with _log.cond:  # no line for no work (a grid all done), nor the last one again
                worked = self.n != self._initial or self._evals_done or self._printed is not None
                if worked and self._printed != (self.n, self.values, None):
                    self._line()
            self._log = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
