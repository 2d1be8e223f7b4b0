"""The registry of what a grid computes: cells (units of work) and methods (rows of Table 1).

A *cell* is one unit of work per (arch, seed): a name, the cells it needs finished first, and a
run function of one :class:`~mcwt_ext.experiments.grid.Cell`. A *method* is a row of the table:
a key, its label, the paper's numbers, the cell that makes it and which training run inside
that cell it reads. Adding a row (a pruning-at-init baseline, a WT ablation, a fit variant) is
registering a cell and a method; the scheduler (grid.py) and the reports (report.py) need no
change. Registration order is table order and the order cells are scheduled in.

Registered here, per (arch, seed), all from the same initial weights, every pruned net at the
same per-layer sparsity::

    imp                 IMP: round 0 is the dense net ("Unpruned network"), the last
                        round trains the winning ticket ("Original Winning Ticket")
    random              uniform random masks, exact per-layer count, trained
    fit                 the four logistic models fitted on the IMP ticket
    mcwt_magnitude      MCWT w/o connectivity: sampled from the fit, trained
    mcwt_connectivity   MCWT with connectivity: sampled greedily, trained
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..runs import RunDir, load_ticket

__all__ = ["CellKind", "Method", "CELLS", "METHODS", "register_cell", "register_method"]


@dataclass(frozen=True)
class CellKind:
    """A unit of work: ``run(cell)`` fills ``cell.dir()``, after the cells in ``needs``."""

    name: str
    run: Callable
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Method:
    """A row of Table 1: made by cell ``cell``; ``trained(cell_dir)`` is the run directory of
    the training it reports (default: the cell's own)."""

    key: str
    label: str
    cell: str
    paper: Mapping[str, float] = field(default_factory=dict)  # arch -> the paper's accuracy (%)
    trained: Callable[[RunDir], RunDir] = lambda rd: rd


CELLS: dict[str, CellKind] = {}
METHODS: dict[str, Method] = {}


def register_cell(name: str, needs: tuple[str, ...] = ()):
    """Decorator: register ``run(cell)`` as the cell kind ``name``."""
    def register(run):
        unknown = [n for n in needs if n not in CELLS]
        if name in CELLS or unknown:
            raise ValueError(f"cell {name!r}: already registered, or needs unregistered {unknown}")
        CELLS[name] = CellKind(name, run, tuple(needs))
        return run
    return register


def register_method(method: Method) -> Method:
    if method.key in METHODS or method.cell not in CELLS:
        raise ValueError(f"method {method.key!r}: already registered, or its cell {method.cell!r} "
                         f"is not")
    METHODS[method.key] = method
    return method


# --- the cells ---------------------------------------------------------------------------------

def _desc(cell) -> str:
    return f"{cell.arch} seed {cell.seed} {cell.kind}"


def _sparsity(cell, ds, model):
    """The protocol's sparsity, per layer where the architecture keeps some layers dense."""
    from ..models import arch_sparsity

    return arch_sparsity(cell.arch, model, ds.example_input(), cell.settings.protocol.sparsity)


@register_cell("imp")
def run_imp_cell(cell) -> None:
    from ..imp import run_imp

    ds, model, train_cfg, config = cell.context()
    imp_cfg = cell.settings.protocol.imp_config(cell.arch, train_cfg,
                                                sparsity=_sparsity(cell, ds, model))
    run_imp(model, ds, imp_cfg, RunDir.open(cell.dir().path, config), progress=cell.progress,
            trainer=cell.train)


@register_cell("random")
def run_random_cell(cell) -> None:
    from ..masks import random_masks

    ds, model, train_cfg, config = cell.context()
    rd = RunDir.open(cell.dir().path, config)
    masks = random_masks(model, _sparsity(cell, ds, model), cell.seed)
    rd.save_tensors(RunDir.INIT, model.state_dict())
    rd.save_tensors(RunDir.MASKS, masks)
    cell.train(model, ds, masks, train_cfg, rd, progress=cell.progress, desc=_desc(cell))


@register_cell("fit", needs=("imp",))
def run_fit_cell(cell) -> None:
    from ..fit import fit_ticket

    ds, _, _, _ = cell.context()
    ticket = load_ticket(cell.dir("imp").path)
    start = time.perf_counter()
    fit = fit_ticket(ticket.model, ticket.masks, ds.train.tensors[0],
                     max_samples=cell.settings.protocol.connectivity_samples, seed=cell.seed)
    fit.source = dict(ticket=str(ticket.run.path), arch=cell.arch, dataset=cell.settings.dataset)
    wall = time.perf_counter() - start
    rd = cell.dir()
    fit.save(rd.file(RunDir.FIT))
    rd.save_json(RunDir.SUMMARY, dict(wall_time_s=wall, models=fit.to_json()["models"]))


def _run_mcwt_cell(cell, use_connectivity: bool) -> None:
    from ..sample import sample_record, sample_ticket

    ds, model, train_cfg, config = cell.context()
    rd = RunDir.open(cell.dir().path, dict(config, use_connectivity=use_connectivity))
    if rd.exists(RunDir.MASKS):  # sampled before a kill: train what was sampled
        masks = rd.load_tensors(RunDir.MASKS)
    else:
        protocol = cell.settings.protocol
        start = time.perf_counter()
        masks, draws = sample_ticket(model, cell.dir("fit").file(RunDir.FIT), ds.train.tensors[0],
                                     sparsity=_sparsity(cell, ds, model), use_connectivity=use_connectivity,
                                     seed=cell.seed, max_samples=protocol.connectivity_samples,
                                     progress=cell.progress)
        wall = time.perf_counter() - start
        rd.save_json(RunDir.SAMPLE, sample_record(draws, wall))
        rd.save_tensors(RunDir.INIT, model.state_dict())
        rd.save_tensors(RunDir.MASKS, masks)
    cell.train(model, ds, masks, train_cfg, rd, progress=cell.progress, desc=_desc(cell))


register_cell("mcwt_magnitude", needs=("fit",))(lambda cell: _run_mcwt_cell(cell, False))
register_cell("mcwt_connectivity", needs=("fit",))(lambda cell: _run_mcwt_cell(cell, True))


# --- the rows of Table 1 (paper: validation accuracy, %, CIFAR-10, 80% pruned per layer) ---------

register_method(Method("dense", "Unpruned network", "imp",
                       {"conv2": 67.20, "conv4": 74.62, "conv6": 77.40},
                       trained=lambda imp: imp.round(0)))
register_method(Method("random", "Randomly pruned network", "random",
                       {"conv2": 66.90, "conv4": 73.20, "conv6": 73.14}))
register_method(Method("wt", "Original Winning Ticket (IMP)", "imp",
                       {"conv2": 70.42, "conv4": 74.92, "conv6": 78.04},
                       trained=lambda imp: imp.round(imp.ticket_round())))
register_method(Method("mcwt_magnitude", "MCWT w/o connectivity", "mcwt_magnitude",
                       {"conv2": 69.47, "conv4": 76.39, "conv6": 78.10}))
register_method(Method("mcwt_connectivity", "MCWT with connectivity", "mcwt_connectivity",
                       {"conv2": 68.40, "conv4": 76.21, "conv6": 78.17}))
