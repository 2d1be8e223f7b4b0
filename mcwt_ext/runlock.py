"""One writer per run directory: a lock file in it, held by one process at a time.

The lock is the file ``RunDir.LOCK`` (hidden, so state bundles skip it), created atomically
(``O_EXCL``) with its holder's pid, host, start time and what it runs. While held, a background
thread touches it every ``timeout / 4`` seconds. A lock is stale, and the next taker takes it
over, when it is half written, was not refreshed for ``timeout`` seconds (a holder on another
host over a shared file system that died), or is held by a dead process on this host.

Who locks: every ``mcwt`` command that writes a run directory, for its whole run
(:func:`holding`, through ``command_inputs.opened``), and the reproduce scheduler for each cell a
shard runs. The Python API (``train(run_dir=...)``, ``run_imp``, ``train_pack``) does not lock:
the grid calls it inside cells whose lock it holds, also from worker processes whose parent
holds that lock, where a lock taken by the callee would be refused by its own parent. Locking at
the command (and cell) level gives each directory one owner without re-entrant locks; a
program that calls the API on one directory from two processes takes :func:`holding` itself.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

from .errors import UsageError
from .runs import RunDir

__all__ = ["RunLock", "RunBusy", "holding", "check_free", "sigterm_as_interrupt", "Terminated", "DEFAULT_TIMEOUT_S"]

#: Seconds without a refresh after which a lock held on another host counts as abandoned.
DEFAULT_TIMEOUT_S = 600.0


class RunBusy(UsageError):
    """The run directory is held by another live process (a usage error: the CLI prints one line)."""


class RunLock:
    """A claim on the run directory ``run_dir`` by this process (see the module doc)."""

    def __init__(self, run_dir: str | os.PathLike, timeout: float = DEFAULT_TIMEOUT_S,
                 what: str | None = None):
        self.path, self.timeout, self.what = Path(run_dir) / RunDir.LOCK, timeout, what
        self.me = dict(pid=os.getpid(), host=socket.gethostname())

    def holder(self) -> dict | None:
        """What the lock file says (pid, host, time, what), or None without a readable one."""
        try:
            holder = json.loads(self.path.read_text() or "null")
        except (FileNotFoundError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def stale(self) -> bool:
        """The lock file is absent, half written, not refreshed for ``timeout`` seconds, or held
        by a dead process on this host."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        holder = self.holder()
        if holder is None:
            return True  # gone, or half written by a process that died creating it
        if holder.get("host") == self.me["host"] and holder.get("pid") != self.me["pid"]:
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True
            except (PermissionError, TypeError, KeyError, OverflowError):
                pass  # alive under another user, or a pid we cannot test: the age decides
        return age > self.timeout

    def acquire(self) -> bool:
        """Claim the directory: True when this process holds it now (and refreshes it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self.stale():
                    return False
                stale = self.path.with_name(f"{self.path.name}.stale.{self.me['pid']}")
                try:  # take it over: move the stale lock aside (one taker wins), then create ours
                    os.replace(self.path, stale)
                    stale.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(dict(self.me, time=time.time(), what=self.what), f)
            _refresher.add(self)
            return True
        return False

    def refresh(self) -> None:
        try:
            os.utime(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        """Give the lock up, if this process still holds it (a taken-over lock is left alone)."""
        _refresher.discard(self)
        holder = self.holder() or {}
        if (holder.get("pid"), holder.get("host")) == (self.me["pid"], self.me["host"]):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def busy(self, name: str) -> str:
        """Why ``name`` (e.g. ``--out D``) cannot be had: who holds it, where and since when."""
        h = self.holder() or {}
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["time"])) \
            if isinstance(h.get("time"), (int, float)) else "an unknown time"
        what = f" ({h['what']})" if h.get("what") else ""
        return (f"{name} is in use by process {h.get('pid', '?')} on {h.get('host', '?')}{what} since "
                f"{since}; rerun when it has ended (a lock of a dead process is taken over)")


class _Refresher:
    """One daemon thread that touches every lock this process holds, every ``timeout / 4`` s."""

    def __init__(self):
        self.held: set[RunLock] = set()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None

    def add(self, lock: RunLock) -> None:
        with self.cond:
            self.held.add(lock)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, daemon=True, name="mcwt-runlock")
                self.thread.start()
            self.cond.notify()

    def discard(self, lock: RunLock) -> None:
        with self.cond:
            self.held.discard(lock)
            self.cond.notify()

    def _run(self) -> None:
        with self.cond:
            while self.held:
                self.cond.wait(max(0.05, min(lock.timeout for lock in self.held) / 4))
                for lock in self.held:
                    lock.refresh()
            self.thread = None


_refresher = _Refresher()


def _forget_after_fork() -> None:  # a forked child holds none of its parent's locks
    global _refresher
    _refresher = _Refresher()


os.register_at_fork(after_in_child=_forget_after_fork)


def check_free(run_dir: str | os.PathLike, name: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Raise :class:`RunBusy` now if another live process holds ``run_dir`` (before a command's
    slow preparations; :func:`holding` still claims it when the command starts writing)."""
    lock = RunLock(run_dir, timeout)
    if lock.path.exists() and not lock.stale():
        raise RunBusy(lock.busy(name))


@contextlib.contextmanager
def holding(run_dir: str | os.PathLike, name: str, what: str | None = None,
            timeout: float = DEFAULT_TIMEOUT_S):
    """Hold the lock of ``run_dir`` (``name`` in the error, e.g. ``--out D``) for the block,
    refreshed, released however the block ends; :class:`RunBusy` if a live process holds it. A
    directory the lock created goes again if the block left it empty (nothing was written)."""
    lock, made = RunLock(run_dir, timeout, what), not Path(run_dir).exists()
    for _ in range(3):  # a holder that ends between our try and our look is not "busy"
        if lock.acquire():
            break
        if lock.holder() is not None and not lock.stale():
            raise RunBusy(lock.busy(name))
    else:
        raise RunBusy(lock.busy(name))
    try:
        yield lock
    finally:
        lock.release()
        if made:
            with contextlib.suppress(OSError):  # not empty (or gone): the run's files stay
                Path(run_dir).rmdir()


class Terminated(KeyboardInterrupt):
    """What SIGTERM raises: handled wherever Ctrl-C is. A subclass, not KeyboardInterrupt itself,
    because CPython remembers an exact KeyboardInterrupt leaving any ``exec`` of a string (which
    dataclasses run while a module is imported) and then ends the process by SIGINT, even when
    the interrupt was caught and the command returned its own exit code."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler's time limit, ``timeout``, ``kill``) raises :class:`Terminated` (a
    KeyboardInterrupt) in the block, so cleanup runs and locks are released (the default action
    ends the process at once)."""
    def handler(signum, frame):
        raise Terminated(f"signal {signum}")
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
