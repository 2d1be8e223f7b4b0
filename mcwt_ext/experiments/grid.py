"""The reproduce grid: its settings, its cells (every registered cell kind per arch and seed)
and the scheduler that runs the unfinished ones, each after the cells it needs.

Layout: ``DIR/<arch>/seed_<s>/<cell>/`` (each a run directory, see :mod:`mcwt_ext.runs`). A
cell is finished when its summary exists; a rerun skips finished cells and resumes the others
(IMP at its round, training at its checkpoint). ``jobs > 1`` runs independent cells in parallel
processes. What the cells are is :mod:`.methods`' business; which run, when and where is this
module's.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models import arch_spec
from ..runs import RUNTIME_KEYS, RunDir, grid_cell
from ..validate import check_seed
from .methods import CELLS, cells_for, select_methods
from .protocol import PROTOCOLS, Protocol

__all__ = ["CellSettings", "Cell", "Grid", "run_cell", "schedule"]


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
        from ..data import load_dataset
        from ..models import build_model

        s = self.settings
        if s.threads:
            torch.set_num_threads(s.threads)
        ds = load_dataset(s.dataset, s.data_root)
        model = build_model(self.arch, ds.in_channels, ds.num_classes, ds.image_size, self.seed)
        train_cfg = s.protocol.train_config(self.arch, self.seed, iterations=s.iterations,
                                            eval_every=s.eval_every, device=s.device)
        config = dict(command=f"reproduce:{self.kind}", arch=self.arch, dataset=s.dataset,
                      data_root=s.data_root, split_seed=0, val_size=None,
                      in_channels=ds.in_channels, image_size=ds.image_size,
                      num_classes=ds.num_classes, seed=self.seed, protocol=s.protocol.describe(),
                      train=dataclasses.asdict(train_cfg))
        return ds, model, train_cfg, config


def run_cell(cell: Cell) -> tuple:
    CELLS[cell.kind].run(cell)
    return cell.key


# --- the scheduler -----------------------------------------------------------------------------

def schedule(cells: list[Cell], jobs: int = 1, progress: bool = True) -> None:
    """Run every unfinished cell of ``cells``, each after the cells it needs (same arch and seed),
    in ``cells``' order where there is a choice; ``jobs > 1``: in that many worker processes."""
    from tqdm.auto import tqdm

    pending = {c.key: c for c in cells if not c.done()}
    finished = {c.key for c in cells if c.done()}
    bar = tqdm(total=len(cells), initial=len(finished), desc="reproduce", unit="cell",
               disable=not (progress and sys.stderr.isatty()))

    def ready():
        return [c for c in pending.values()
                if all(k in finished for k in CELLS[c.kind].need_keys(c.arch, c.seed))]

    def finish(key):
        pending.pop(key)
        finished.add(key)
        bar.set_postfix_str("/".join(map(str, key)))
        bar.update(1)

    try:
        if jobs == 1:
            while pending:
                finish(run_cell(ready()[0]))
            return
        with cf.ProcessPoolExecutor(jobs) as pool:
            running: dict[cf.Future, tuple] = {}
            while pending:
                for cell in ready():
                    if cell.key not in running.values():
                        running[pool.submit(run_cell, cell)] = cell.key
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    running.pop(fut)
                    finish(fut.result())
    finally:
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
    methods: str | list[str] = "paper"  # rows of the table: paper, all, or method keys
    cells: list[Cell] = field(init=False)

    def __post_init__(self):
        from ..data import DATASETS

        for arch in self.archs:
            arch_spec(arch)
        for seed in self.seeds:
            check_seed(seed, "seeds")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: must be one of {list(DATASETS)}, got {self.dataset!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: must be one of {sorted(PROTOCOLS)}, got {self.protocol!r}")
        if not isinstance(self.jobs, int) or self.jobs < 1:
            raise ValueError(f"jobs: must be a positive int, got {self.jobs!r}")
        self.methods = select_methods(self.methods)
        kinds = cells_for(self.methods)
        if any(CELLS[k].needs_seed0 for k in kinds) and 0 not in self.seeds:
            raise ValueError(f"seeds: the methods {self.methods} need seed 0's cells (fit transfer); "
                             f"got seeds {self.seeds}")
        self.out = Path(self.out)
        threads = max(1, (os.cpu_count() or 1) // self.jobs) if self.jobs > 1 else 0
        shared = CellSettings(self.dataset, self.data_root, PROTOCOLS[self.protocol], str(self.out),
                              self.iterations, self.eval_every, self.device, threads,
                              self.progress and self.jobs == 1)
        self.cells = [Cell(kind, arch, seed, shared)
                      for arch in self.archs for seed in self.seeds for kind in kinds
                      if CELLS[kind].applies(seed)]

    def settings(self) -> dict:
        """The grid's identity: cells made under other settings do not mix."""
        return dict(dataset=self.dataset, protocol=PROTOCOLS[self.protocol].describe(),
                    iterations_override=self.iterations, eval_every_override=self.eval_every)

    def open(self) -> RunDir:
        """The grid directory, its config written, or checked against the grid's there (more
        archs or seeds may join an existing grid; other settings may not)."""
        return RunDir.open(self.out, dict(settings=self.settings(), archs=self.archs,
                                          seeds=self.seeds, data_root=self.data_root, methods=self.methods),
                           mutable=RUNTIME_KEYS | {"archs", "seeds", "methods"})

    def run(self) -> None:
        """Run every unfinished cell, each after the cells it needs."""
        self.open()
        schedule(self.cells, self.jobs, self.progress)
