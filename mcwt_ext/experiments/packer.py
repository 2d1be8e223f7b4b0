"""Packs: cells run in threads of their own, one at a time, until they ask to train; the packer
trains what they asked for together (:func:`mcwt_ext.lockstep.train_pack`, one pack at a time,
the time budget's pick: :mod:`.budget`) and lets each cell go on with its result."""
from __future__ import annotations

import threading
import time

import torch

__all__ = ["Packer", "packer_of_this_thread", "cell_threads_alive"]


def packer_of_this_thread() -> "Packer | None":
    """The packer a cell running in this thread trains through (None: train on its own)."""
    return _PACKERS.get(threading.get_ident())


_PACKERS: dict[int, "Packer"] = {}  # cell thread -> the packer its Cell.train asks


def cell_threads_alive() -> bool:
    """Whether a cell thread has not ended: after an interrupt (which only the main thread sees)
    one may still be inside torch's C++ code, where Python 3.11 ends a daemon thread at exit by
    unwinding it, which aborts the process (SIGABRT)."""
    return bool(_PACKERS)


class Packer:
    """Runs cells in threads, one at a time, and trains what they ask for in packs."""

    def __init__(self, size: int | None, progress: bool, run_cell):
        self.size, self.progress, self.run_cell = size, progress, run_cell
        self.turn = threading.Event()      # set by a cell thread when it blocks or ends
        self.requests: dict[tuple, tuple] = {}  # cell key -> (cell, PackNet, dataset, Event, [result])
        self.threads: dict[tuple, threading.Thread] = {}
        self.ended: dict[tuple, BaseException | None] = {}

    # -- in a cell thread
    def request(self, cell, net, dataset):
        box = [None]
        go = threading.Event()
        self.requests[cell.key] = (cell, net, dataset, go, box)
        self.turn.set()
        go.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _body(self, cell) -> None:
        _PACKERS[threading.get_ident()] = self
        error = None
        try:
            self.run_cell(cell)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            error = e
        finally:
            _PACKERS.pop(threading.get_ident(), None)
            self.ended[cell.key] = error
            self.turn.set()

    def _wait_turn(self) -> None:
        self.turn.wait()
        self.turn.clear()

    # -- in the scheduler's thread
    def start(self, cell) -> None:
        t = threading.Thread(target=self._body, args=(cell,), daemon=True, name="/".join(map(str, cell.key)))
        self.threads[cell.key] = t
        self.turn.clear()
        t.start()
        self._wait_turn()

    def running(self) -> bool:
        return bool(self.threads)

    def collect(self) -> list[tuple]:
        """Cells that ended since the last call: (key, error or None)."""
        out = list(self.ended.items())
        for key, _ in out:
            self.ended.pop(key)
            self.threads.pop(key, None)
        return out

    def train_requests(self, budget=None) -> None:
        """Train one pack of the trainings asked for (the budget's pick: see :mod:`.budget`),
        then let its cells go on until they ask again or end (one at a time), so the next pick
        sees their next requests beside the waiting ones."""
        from ..lockstep import PackOptions, train_pack
        from .budget import Budget, Candidate

        budget = budget or Budget()
        groups: dict[tuple, list] = {}
        for key, req in sorted(self.requests.items()):
            cfg = req[1].config
            groups.setdefault((req[0].arch, cfg.iterations, cfg.lr, cfg.batch_size, cfg.device), []).append(req)
        cands = [Candidate(arch, reqs[0][1].config.device, iterations, reqs[0][1].config.checkpoint_every,
                           len(reqs), (ds.in_channels, ds.num_classes, ds.image_size))
                 for (arch, iterations, *_), reqs in groups.items() for ds in [reqs[0][2]]]
        i, m = budget.pick(cands, self.size)
        chunk, cand = list(groups.values())[i][:m], cands[i]
        for req in chunk:
            del self.requests[req[0].key]
        device = torch.device(cand.device)
        began = time.perf_counter()
        results = train_pack([r[1] for r in chunk], chunk[0][2], PackOptions(cuda_graph=device.type == "cuda"),
                             self.progress, desc=f"{cand.arch} pack of {m}, {cand.iterations} iterations")
        budget.observe(cand.arch, cand.device, m, cand.iterations, time.perf_counter() - began)
        for (_, _, _, go, box), result in zip(chunk, results):
            box[0] = result
            self.turn.clear()
            go.set()
            self._wait_turn()
