"""Packs: cells run in threads of their own, one at a time, until they ask to train; the packer
trains what they asked for together (:func:`mcwt_ext.lockstep.train_pack`, one pack at a time,
the time budget's pick: :mod:`.budget`) and lets each cell go on with its result.

A training the pack cannot take (:func:`mcwt_ext.lockstep.pack_refusal`: batch norm, SGD or a
schedule, augmentation, ``--precision bf16``, ...) is trained at once, alone, in its cell's
thread by :func:`mcwt_ext.train.train`, exactly as with ``--pack 1`` (same run directory, same
files, so either resumes the other), and the packer says so once per architecture and reason."""
from __future__ import annotations

import sys
import threading
import time

import torch

from .. import supervision

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

    def __init__(self, size: int | None, progress: bool, run_cell, budget=None):
        self.size, self.progress, self.run_cell, self.budget = size, progress, run_cell, budget
        self.said: set[tuple[str, str]] = set()  # (arch, reason) of the trainings said to train alone
        self.turn = threading.Event()      # set by a cell thread when it blocks or ends
        self.requests: dict[tuple, tuple] = {}  # cell key -> (cell, PackNet, dataset, Event, [result])
        self.threads: dict[tuple, threading.Thread] = {}
        self.ended: dict[tuple, BaseException | None] = {}

    @staticmethod
    def options(device: str | torch.device):
        """The PackOptions of the packs on ``device`` (a CUDA graph on CUDA)."""
        from ..lockstep import PackOptions

        return PackOptions(cuda_graph=torch.device(device).type == "cuda")

    # -- in a cell thread
    def train(self, cell, model, dataset, masks, config, run_dir, progress=False, desc="train", *,
              snapshot_iterations=()):
        """:meth:`Cell.train` under packs: a training a pack can take waits for its pack; one it
        cannot (:func:`~mcwt_ext.lockstep.pack_refusal`) trains now, alone, with
        :func:`mcwt_ext.train.train` (as with ``--pack 1``: the same run), within the time
        budget's deadline if there is one."""
        from ..lockstep import PackNet, pack_refusal
        from ..train import train  # looked up at each call, so a patched train() is the one used

        reason = pack_refusal(model, config, self.options(config.device))
        if reason is None:
            return self.request(cell, PackNet(model, masks, config, run_dir, snapshot_iterations), dataset)
        self.say_alone(cell.arch, reason)
        left = None if self.budget is None else self.budget.left()
        deadline = None if left is None or left == float("inf") else time.time() + left
        with supervision.stopping_at(deadline):
            return train(model, dataset, masks, config, run_dir, progress, desc,
                         snapshot_iterations=snapshot_iterations)

    def say_alone(self, arch: str, reason: str) -> None:
        """One line on stderr, once per architecture and reason: its trainings train alone."""
        if (arch, reason) in self.said:
            return
        self.said.add((arch, reason))
        size = "auto" if self.size is None else self.size
        print(f"reproduce: --pack {size}: {arch} cells train one at a time, as with --pack 1 ({reason})",
              file=sys.stderr, flush=True)

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
        from ..lockstep import train_pack
        from .budget import Budget, Candidate

        budget = budget or self.budget or Budget()
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
        results = train_pack([r[1] for r in chunk], chunk[0][2], self.options(device),
                             self.progress, desc=f"{cand.arch} pack of {m}, {cand.iterations} iterations")
        budget.observe(cand.arch, cand.device, m, cand.iterations, time.perf_counter() - began)
        for (_, _, _, go, box), result in zip(chunk, results):
            box[0] = result
            self.turn.clear()
            go.set()
            self._wait_turn()
