"""The reproduce grid: its settings, its cells (every registered cell kind per arch and seed)
and the scheduler that runs the unfinished ones, each after the cells it needs.

Layout: ``DIR/<arch>/seed_<s>/<cell>/`` (each a run directory, see :mod:`mcwt_ext.runs`). A
cell is finished when its summary exists; a rerun skips finished cells and resumes the others
(IMP at its round, training at its checkpoint). ``jobs > 1`` runs independent cells in parallel
processes. What the cells are is :mod:`.methods`' business; which run, when and where is this
module's.

Packs (``pack > 1``): every ready cell runs in a thread of its own until it asks to train
(:meth:`Cell.train`); the trainings asked for (IMP round r of every seed, the random and MCWT
cells, any trained cell registered in methods.py) are trained together, up to ``pack`` nets of
one architecture and training length at a time, by :func:`mcwt_ext.lockstep.train_pack`; then
the cells go on (IMP prunes and asks for its next round). One pack trains at a time, picked by
the time budget (:mod:`.budget`), and its cells go on as soon as it ends, so a long pack of one
architecture never holds the next rounds of another. Only one thread runs at a time, so
the cells' own work never overlaps. Each net keeps its run directory, so a killed pack resumes
from its checkpoints and the reports read the same files. A training no pack can take (the pack's
one capability check, :func:`mcwt_ext.lockstep.pack_refusal`: ResNet-20's batch norm and SGD,
augmentation, ``--precision bf16``) trains alone in its cell's thread with train(), the same run
as with ``--pack 1``, and the grid says so in one line per architecture and reason: nothing is
refused because of packing.

Shards (``shard=(i, n)``, a job array over a shared directory) run whole chains of cells
(:mod:`.shards`), so no shard waits on another process. A lock file in a cell's directory
(:mod:`mcwt_ext.runlock`) guards it against a second writer (a rerun while the first task still
runs): a cell of the shard held by a live process ends the shard with one line naming the holder.
Beyond one machine, :mod:`.ray_executor` runs the cells as Ray tasks.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UsageError
from ..models import arch_spec
from ..runlock import RunBusy, RunLock
from ..runs import RUNTIME_KEYS, RunDir, grid_cell
from ..validate import check_seed
from .methods import CELLS, cells_for, select_methods
from .packer import Packer, packer_of_this_thread
from .protocol import PROTOCOLS, Protocol
from .ray_executor import check_ray, run_on_ray
from .shards import parse_shard, shard_cells

__all__ = ["CellSettings", "Cell", "Grid", "run_cell", "schedule", "parse_pack", "parse_executor"]


def parse_executor(text: str) -> str:
    """``local`` (this process and its workers) or ``ray`` (cells as Ray tasks)."""
    if text not in EXECUTORS:
        raise UsageError(f"--executor: must be one of {', '.join(EXECUTORS)}, got {text!r}")
    return text


EXECUTORS = ("local", "ray")


def parse_pack(text: str) -> str | int:
    """``"auto"`` or a positive int (nets per pack; 1: train every cell on its own)."""
    if str(text) == "auto":
        return "auto"
    if not str(text).isdigit() or int(text) < 1:
        raise UsageError(f"--pack: must be auto or a positive int (nets per pack), got {text!r}")
    return int(text)


@functools.lru_cache(maxsize=2)
def _dataset(name: str, root: str | None):
    """One copy of a dataset per process, shared by the cells (packs keep several cells alive)."""
    from ..data import load_dataset
    return load_dataset(name, root)


@dataclass(frozen=True)
class CellSettings:
    """What every cell of one grid shares; picklable, for worker processes."""

    dataset: str
    data_root: str | None
    protocol: Protocol
    root: str
    iterations: int | None = None   # overrides the protocol's
    eval_every: int | None = None   # overrides the protocol's
    device: str = "cpu"
    threads: int = 0                # torch threads per worker process; 0: leave as is
    progress: bool = False          # training progress bars (only with one job: bars would interleave)
    augment: str | None = None      # overrides the architecture's training augmentation
    precision: str = "fp32"         # training arithmetic (mcwt_ext.precision)
    deadline: float | None = None   # time.time() at which cell-by-cell trainings stop (--time-budget)
    checkpoint_minutes: float | None = None  # overrides the trainings' (--export-every-minutes)


@dataclass(frozen=True)
class Cell:
    """One unit of work of the grid: cell kind ``kind`` for one (arch, seed)."""

    kind: str
    arch: str
    seed: int
    settings: CellSettings

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.arch, self.seed, self.kind)

    @property
    def progress(self) -> bool:
        return self.settings.progress

    def dir(self, kind: str | None = None) -> RunDir:
        """This cell's run directory, or that of cell ``kind`` of the same arch and seed."""
        return grid_cell(self.settings.root, self.arch, self.seed, kind or self.kind)

    def done(self) -> bool:
        return self.dir().done()

    def context(self):
        """(dataset, fresh model from the seed, TrainConfig, the run's config.json) of this cell."""
        from ..models import ARCHS, build_model

        s = self.settings
        if s.threads:
            torch.set_num_threads(s.threads)
        ds = _dataset(s.dataset, s.data_root)
        model = build_model(self.arch, ds.in_channels, ds.num_classes, ds.image_size, self.seed)
        train_cfg = s.protocol.train_config(self.arch, self.seed, iterations=s.iterations,
                                            eval_every=s.eval_every, device=s.device, augment=s.augment,
                                            precision=s.precision)
        if s.checkpoint_minutes is not None:  # a runtime setting: not part of the run's identity
            train_cfg = dataclasses.replace(train_cfg, checkpoint_minutes=s.checkpoint_minutes)
        config = dict(command=f"reproduce:{self.kind}", arch=self.arch, dataset=s.dataset,
                      data_root=s.data_root, split_seed=0, val_size=None,
                      in_channels=ds.in_channels, image_size=ds.image_size,
                      num_classes=ds.num_classes, seed=self.seed, protocol=s.protocol.describe(),
                      init_scheme=ARCHS[self.arch].init, train=dataclasses.asdict(train_cfg))
        return ds, model, train_cfg, config


    def train(self, model, dataset, masks, config, run_dir, progress=False, desc="train", *,
              snapshot_iterations=()):
        """What cells train with: :func:`mcwt_ext.train.train`, or, when the scheduler packs,
        the pack that trains this training together with others (same result files); a training
        no pack can take (:func:`mcwt_ext.lockstep.pack_refusal`) trains alone, as with --pack 1
        (:meth:`.packer.Packer.train`)."""
        packer = packer_of_this_thread()
        if packer is None:
            from ..train import train
            return train(model, dataset, masks, config, run_dir, progress, desc,
                         snapshot_iterations=snapshot_iterations)
        return packer.train(self, model, dataset, masks, config, run_dir, progress, desc,
                            snapshot_iterations=snapshot_iterations)


def run_cell(cell: Cell) -> tuple:
    from .. import distributed, supervision

    with supervision.stopping_at(cell.settings.deadline):
        CELLS[cell.kind].run(cell)
    distributed.barrier()  # under torchrun: the next cell may read what rank 0 wrote
    supervision.saved_point()
    return cell.key


# --- the scheduler -----------------------------------------------------------------------------

def schedule(cells: list[Cell], jobs: int = 1, progress: bool = True, *, pack: int | None = 1,
             budget=None, lock: str | None = None, lock_timeout: float = 600.0) -> None:
    """Run every unfinished cell of ``cells``, each once the cells it needs (in ``cells`` or done
    on disk) are done, in ``cells``' order where there is a choice: one at a time (``jobs=1``,
    ``pack=1``), in ``jobs`` worker processes, or with the trainings of the ready cells in packs
    of up to ``pack`` nets (None: no limit), each pack picked by ``budget`` (a
    :class:`.budget.Budget`; raises its BudgetSpent when none fits). With ``lock`` (what holds
    it), each cell's directory is locked while it runs; one held by a live process raises
    :class:`~mcwt_ext.runlock.RunBusy`. Nothing here waits on another process."""
    from ..progress import Progress

    if jobs > 1 and pack != 1:
        raise UsageError("jobs: packs train in one process; use --jobs 1 with --pack")
    pending = {c.key: c for c in cells if not c.done()}
    finished: set[tuple] = set()
    bar = Progress(len(cells), "reproduce", unit="cell", noun="cell", initial=len(cells) - len(pending),
                   enabled=progress)
    locks: dict[tuple, RunLock] = {}  # refreshed by runlock's thread while held

    def ready():
        """Pending cells whose needs are done (here, or on disk before this run)."""
        return [c for c in pending.values() if all(k in finished or grid_cell(c.settings.root, *k).done()
                                                   for k in CELLS[c.kind].need_keys(c.arch, c.seed))]

    def began(c):
        if lock is None:
            return
        held = RunLock(c.dir(), lock_timeout, lock)
        if not held.acquire():
            raise RunBusy(held.busy(f"cell {' '.join(map(str, c.key))}"))
        locks[c.key] = held
        print(f"{lock}: running {' '.join(map(str, c.key))}", file=sys.stderr, flush=True)

    def finish(key):
        finished.add(key)
        pending.pop(key)
        if key in locks:
            locks.pop(key).release()
        bar.set(last="/".join(map(str, key)))
        bar.update(1)

    def stuck():
        return RuntimeError(f"cells {sorted(pending)} need cells that are neither in the grid nor done")

    try:
        if pack != 1:
            packer = Packer(pack, progress, run_cell, budget)
            while pending:
                for cell in ready():
                    if cell.key not in packer.threads:
                        began(cell)
                        packer.start(cell)
                if packer.requests:
                    packer.train_requests(budget)
                ended = packer.collect()
                for key, error in ended:
                    if error is not None:
                        raise error
                    finish(key)
                if not ended and not packer.requests and pending and \
                        not any(k in packer.threads for k in pending):
                    raise stuck()
            return
        if jobs == 1:
            while pending:
                batch = ready()
                if not batch:
                    raise stuck()
                began(batch[0])
                finish(run_cell(batch[0]))
            return
        # spawn: a forked child of a process that has initialised CUDA cannot use CUDA
        with cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            running: dict[cf.Future, tuple] = {}
            while pending:
                for cell in ready():
                    if cell.key not in running.values():
                        began(cell)
                        running[pool.submit(run_cell, cell)] = cell.key
                if not running:
                    raise stuck()
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    running.pop(fut)
                    finish(fut.result())
    finally:
        for held in locks.values():
            held.release()
        bar.close()


# --- the grid ----------------------------------------------------------------------------------

@dataclass(kw_only=True)
class Grid:
    """Every registered cell for each of ``archs`` x ``seeds`` on ``dataset``, in ``out``."""

    archs: list[str]
    seeds: list[int]
    dataset: str
    out: Path
    data_root: str | None = None
    protocol: str = "reduced"
    jobs: int = 1
    iterations: int | None = None   # overrides the protocol's training iterations
    eval_every: int | None = None   # overrides the protocol's iterations between evaluations
    device: str = "cpu"
    progress: bool = True
    pack: str | int = "auto"        # nets per pack; auto: all ready ones on CUDA, 1 (no packs) on CPU
    shard: tuple[int, int] | None = None  # (i, n): run the i-th of n shares of the cells
    lock_timeout: float = 600.0     # seconds after which a shard's unrefreshed cell lock is stale
    executor: str = "local"         # local: schedule() in this process; ray: cells as Ray tasks
    ray_address: str | None = None  # the Ray cluster to join; None: a local Ray instance
    methods: str | list[str] = "paper"  # rows of the table: paper, all, or method keys
    budget: object = None           # a .budget.Budget: picks the packs; cell by cell, trainings stop at its deadline
    checkpoint_minutes: float | None = None  # overrides the trainings' clock checkpoints (runtime only)
    augment: str | None = None      # training augmentation for every arch; None: each arch's own
    precision: str = "fp32"         # training arithmetic (mcwt_ext.precision); bf16 cells train alone
    cells: list[Cell] = field(init=False)

    def __post_init__(self):
        from ..data import DATASETS

        for arch in self.archs:
            arch_spec(arch)
        for seed in self.seeds:
            check_seed(seed, "seeds")
        if self.dataset not in DATASETS:
            raise UsageError(f"dataset: must be one of {list(DATASETS)}, got {self.dataset!r}")
        if self.protocol not in PROTOCOLS:
            raise UsageError(f"protocol: must be one of {sorted(PROTOCOLS)}, got {self.protocol!r}")
        if not isinstance(self.jobs, int) or self.jobs < 1:
            raise UsageError(f"jobs: must be a positive int, got {self.jobs!r}")
        self.pack = parse_pack(self.pack)
        if self.shard is not None:
            self.shard = parse_shard("/".join(map(str, self.shard)))
        if not self.lock_timeout > 0:
            raise UsageError(f"lock_timeout: must be positive seconds, got {self.lock_timeout!r}")
        if self.jobs > 1 and self.pack not in ("auto", 1):
            raise UsageError("pack: packs train in one process; use jobs=1 with pack > 1")
        self.executor = parse_executor(self.executor)
        if self.executor == "ray":
            check_ray(self)
        elif self.ray_address is not None:
            raise UsageError("--ray-address: joins a Ray cluster; give it with --executor ray")
        self._check_precision()
        self.methods = select_methods(self.methods)
        kinds = cells_for(self.methods)
        if any(CELLS[k].needs_seed0 for k in kinds) and 0 not in self.seeds:
            raise UsageError(f"seeds: the methods {self.methods} need seed 0's cells (fit transfer); "
                             f"got seeds {self.seeds}")
        self.out = Path(self.out)
        local = self.executor == "local"
        # a Ray task holds one CPU (ray_executor); local workers share the cores
        threads = 1 if not local else max(1, (os.cpu_count() or 1) // self.jobs) if self.jobs > 1 else 0
        # cell by cell, the trainings themselves stop at the budget's deadline (and checkpoint);
        # packs are picked to fit it instead (.budget)
        deadline = time.time() + self.budget.left() if self.budget is not None and self.pack_size() == 1 \
            else None
        shared = CellSettings(self.dataset, self.data_root, PROTOCOLS[self.protocol], str(self.out),
                              self.iterations, self.eval_every, self.device, threads,
                              self.progress and self.jobs == 1 and local, self.augment, self.precision,
                              deadline, self.checkpoint_minutes)
        self.cells = [Cell(kind, arch, seed, shared)
                      for arch in self.archs for seed in self.seeds for kind in kinds
                      if CELLS[kind].applies(seed)]

    def _check_precision(self) -> None:
        from ..precision import PRECISIONS, check_precision

        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        check_precision(self.precision, self.device)

    def settings(self) -> dict:
        """The grid's identity: cells made under other settings do not mix (a setting at its
        default is left out, so grids made before it existed keep their identity)."""
        augment = {} if self.augment is None else dict(augment_override=self.augment)
        precision = {} if self.precision == "fp32" else dict(precision=self.precision)
        return dict(dataset=self.dataset, protocol=PROTOCOLS[self.protocol].describe(),
                    iterations_override=self.iterations, eval_every_override=self.eval_every, **augment,
                    **precision)

    def open(self) -> RunDir:
        """The grid directory, its config written, or checked against the grid's there (more
        archs or seeds may join an existing grid; other settings may not)."""
        return RunDir.open(self.out, dict(settings=self.settings(), archs=self.archs,
                                          seeds=self.seeds, data_root=self.data_root, methods=self.methods),
                           mutable=RUNTIME_KEYS | {"archs", "seeds", "methods"})

    def pack_size(self) -> int | None:
        """Nets per pack: 1 (every cell trains on its own), an int, or None (all ready ones)."""
        if self.pack == "auto":
            return None if torch.device(self.device).type == "cuda" and self.jobs == 1 else 1
        return self.pack

    def done(self) -> bool:
        return all(c.done() for c in self.cells)

    def run(self) -> None:
        """Run every unfinished cell (of this shard's chains), each after the cells it needs."""
        self.open()
        if self.executor == "ray":
            return run_on_ray(self, schedule)
        if self.budget is not None:
            self.budget.learn(self.out)
        shard = self.shard
        schedule(self.cells if shard is None else shard_cells(self.cells, shard), self.jobs, self.progress,
                 pack=self.pack_size(), budget=self.budget, lock_timeout=self.lock_timeout,
                 lock=None if shard is None else f"mcwt reproduce --shard {shard[0]}/{shard[1]}")
