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

and, for ``reproduce --methods all`` (issue 12; group in brackets)::

    prune_<m>           [baseline] pruning at init by magnitude, snip, grasp or synflow
                        (layer allocation), trained
    prune_<m>_global    [baseline] snip, grasp or synflow with global allocation, as their
                        papers run them, trained
    ablate_<k>          [ablation] the WT with its mask shuffled, its weights re-initialised
                        (seed 10000 + seed) or its kept values shuffled, trained
    fit_layer,          [fit] the fit with one model per layer / raw |w| pooled per kind, and
    fit_pooled_raw      MCWT (with connectivity) sampled from each: mcwt_fit_layer,
                        mcwt_fit_pooled_raw
    mcwt_transfer       [transfer] MCWT for seeds 1..N-1 sampled from the fit of seed 0's
                        ticket (no cell at seed 0)
    mcwt_exact          [fit] MCWT with connectivity, exactly the target count per layer
    rigl, set           [dst] dynamic sparse training (issue 21) from a random start at the
                        protocol's per-layer sparsity: RigL, SET (mcwt_ext.dst defaults)
    rigl_mcwt           [dst] RigL started from this seed's MCWT (with connectivity) sample
    random_erk,         [baseline] random masks under ERK (:mod:`mcwt_ext.distribution`: the first
    rigl_erk            layer dense, the same total kept count as uniform), trained; [dst] RigL
                        from such a start
    random_erk_dense    [baseline] ERK's control (issue 28): random masks with ERK's dense layers
                        dense and the others pruned to one share, the same total, trained: random
                        (ERK) minus it is ERK's allocation alone, it minus random the dense layers

A method's ``cost`` is what constructing one of its masks took (seconds, one arch and seed):
the IMP rounds before the ticket for the WT and its ablations, the fit plus sampling for MCWT,
the one training (mask updates and RigL's dense gradients included) for dynamic sparse training.
A dst row's masks, for its overlap with the WT, are those it ends training with.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..errors import UsageError
from ..runs import RunDir, grid_cell, load_ticket
from . import costs

__all__ = ["CellKind", "Method", "CELLS", "METHODS", "GROUPS", "register_cell", "register_method",
           "select_methods", "cells_for"]


@dataclass(frozen=True)
class CellKind:
    """A unit of work: ``run(cell)`` fills ``cell.dir()``, after the cells in ``needs``."""

    name: str
    run: Callable
    needs: tuple[str, ...] = ()       # cells of the same arch and seed
    needs_seed0: tuple[str, ...] = ()  # cells of the same arch at seed 0 (fit transfer)
    applies: Callable[[int], bool] = lambda seed: True  # the seeds that have this cell

    def need_keys(self, arch: str, seed: int) -> list[tuple[str, int, str]]:
        """The grid keys (arch, seed, cell) this cell waits for."""
        return [(arch, seed, d) for d in self.needs] + [(arch, 0, d) for d in self.needs_seed0]


@dataclass(frozen=True)
class Method:
    """A row of Table 1: made by cell ``cell``; ``trained(cell_dir)`` is the run directory of
    the training it reports (default: the cell's own)."""

    key: str
    label: str
    cell: str
    paper: Mapping[str, float] = field(default_factory=dict)  # arch -> the paper's accuracy (%)
    trained: Callable[[RunDir], RunDir] = lambda rd: rd
    group: str = "paper"   # one of GROUPS; `reproduce --methods paper` runs the "paper" ones
    #: seconds to construct one mask: ``cost(cell_dir, seeds)`` with ``cell_dir(cell, seed)`` the
    #: run directory of a cell of this arch (``seed`` None: this seed); None: not measured / no mask
    cost: Callable | None = None
    #: how its masks spread the sparsity over the layers (:data:`mcwt_ext.distribution.DISTRIBUTIONS`;
    #: the table's header names each distribution's dense layers)
    distribution: str = "uniform"


CELLS: dict[str, CellKind] = {}
METHODS: dict[str, Method] = {}


GROUPS = ("paper", "baseline", "ablation", "fit", "transfer", "dst")


def register_cell(name: str, needs: tuple[str, ...] = (), *, needs_seed0: tuple[str, ...] = (),
                  applies: Callable[[int], bool] | None = None):
    """Decorator: register ``run(cell)`` as the cell kind ``name``."""
    def register(run):
        unknown = [n for n in (*needs, *needs_seed0) if n not in CELLS]
        if name in CELLS or unknown:
            raise ValueError(f"cell {name!r}: already registered, or needs unregistered {unknown}")
        CELLS[name] = CellKind(name, run, tuple(needs), tuple(needs_seed0),
                               applies or (lambda seed: True))
        return run
    return register


def select_methods(spec: str | list[str]) -> list[str]:
    """``paper`` (the paper's five rows), ``all``, or a comma list / list of method keys, in
    table order; the WT row is always included (every row is compared with it)."""
    if isinstance(spec, str):
        if spec == "paper":
            return [k for k, m in METHODS.items() if m.group == "paper"]
        if spec == "all":
            return list(METHODS)
        spec = [k.strip() for k in spec.split(",") if k.strip()]
    unknown = [k for k in spec if k not in METHODS]
    if unknown or not spec:
        raise UsageError(f"methods: must be paper, all or a comma list of {', '.join(METHODS)}; "
                         f"got {unknown or spec}")
    return [k for k in METHODS if k in spec or k == "wt"]


def cells_for(methods: list[str]) -> list[str]:
    """The cells the rows ``methods`` need, with everything they wait for, in registration order."""
    wanted = {METHODS[m].cell for m in methods}
    while True:
        more = {d for c in wanted for d in (*CELLS[c].needs, *CELLS[c].needs_seed0)} - wanted
        if not more:
            return [c for c in CELLS if c in wanted]
        wanted |= more


def register_method(method: Method) -> Method:
    from ..distribution import DISTRIBUTIONS

    if method.key in METHODS or method.cell not in CELLS or method.distribution not in DISTRIBUTIONS:
        raise ValueError(f"method {method.key!r}: already registered, its cell {method.cell!r} is not, "
                         f"or its distribution {method.distribution!r} is none of {list(DISTRIBUTIONS)}")
    METHODS[method.key] = method
    return method


# --- the cells ---------------------------------------------------------------------------------

def _desc(cell) -> str:
    return f"{cell.arch} seed {cell.seed} {cell.kind}"


def _sparsity(cell, ds, model, distribution: str = "uniform"):
    """The protocol's sparsity, per layer where the architecture keeps some layers dense, or
    spread over the layers by ERK (:mod:`mcwt_ext.distribution`)."""
    from ..distribution import layer_sparsity

    return layer_sparsity(cell.arch, model, ds.example_input(), cell.settings.protocol.sparsity, distribution)


def _distribution_entry(distribution: str) -> dict:
    """What a cell's config records of its distribution: nothing for uniform, so the uniform
    cells keep the identity they had before ERK existed (and resume from their runs); the others
    their distribution and the rule of ERK's total (:func:`mcwt_ext.distribution.identity_entry`),
    so a cell made under the earlier rule (the first layer outside the total) does not resume."""
    from ..distribution import identity_entry

    return {} if distribution == "uniform" else dict(distribution=distribution, **identity_entry(distribution))


@register_cell("imp")
def run_imp_cell(cell) -> None:
    from ..imp import run_imp

    ds, model, train_cfg, config = cell.context()
    imp_cfg = cell.settings.protocol.imp_config(cell.arch, train_cfg,
                                                sparsity=_sparsity(cell, ds, model))
    rd = RunDir.open(cell.dir().path, dict(config, imp=dict(allocation=imp_cfg.allocation)))
    run_imp(model, ds, imp_cfg, rd, progress=cell.progress, trainer=cell.train)


def _timed_masks(rd: RunDir, make) -> dict:
    """``make()``'s masks, timed into ``construction.json``; those of a run killed after making
    them are reused (the same masks, and their measured time is kept)."""
    if rd.exists(RunDir.MASKS) and rd.exists(RunDir.CONSTRUCTION):
        return rd.load_tensors(RunDir.MASKS)
    start = time.perf_counter()
    masks = make()
    rd.save_json(RunDir.CONSTRUCTION, dict(wall_time_s=time.perf_counter() - start))
    rd.save_tensors(RunDir.MASKS, masks)
    return masks


def _run_random_cell(cell, distribution: str = "uniform") -> None:
    from ..masks import random_masks

    ds, model, train_cfg, config = cell.context()
    rd = RunDir.open(cell.dir().path, dict(config, **_distribution_entry(distribution)))
    rd.save_tensors(RunDir.INIT, model.state_dict())
    masks = _timed_masks(rd, lambda: random_masks(model, _sparsity(cell, ds, model, distribution), cell.seed))
    cell.train(model, ds, masks, train_cfg, rd, progress=cell.progress, desc=_desc(cell))


register_cell("random")(_run_random_cell)
register_cell("random_erk")(lambda cell: _run_random_cell(cell, "erk"))
register_cell("random_erk_dense")(lambda cell: _run_random_cell(cell, "uniform-erk-dense"))


def _run_fit_cell(cell, granularity: str) -> None:
    from ..fit import fit_ticket

    ds, _, _, _ = cell.context()
    ticket = load_ticket(cell.dir("imp").path)
    start = time.perf_counter()
    fit = fit_ticket(ticket.model, ticket.masks, ds.train.tensors[0],
                     max_samples=cell.settings.protocol.connectivity_samples, seed=cell.seed,
                     device=cell.settings.device, granularity=granularity)
    fit.source = dict(ticket=str(ticket.run.path), arch=cell.arch, dataset=cell.settings.dataset)
    wall = time.perf_counter() - start
    rd = cell.dir()
    fit.save(rd.file(RunDir.FIT))
    rd.save_json(RunDir.SUMMARY, dict(wall_time_s=wall, granularity=granularity,
                                      models=fit.to_json()["models"]))


register_cell("fit", needs=("imp",))(lambda cell: _run_fit_cell(cell, "kind"))


def _run_mcwt_cell(cell, use_connectivity: bool, fit: str = "fit", *, exact: bool = False,
                   fit_seed: int | None = None) -> None:
    """MCWT sampled from the fit in cell ``fit`` (of seed ``fit_seed``; None: this seed)."""
    from .. import distributed
    from ..sample import sample_record, sample_ticket

    ds, model, train_cfg, config = cell.context()
    fit_dir = cell.dir(fit) if fit_seed is None else grid_cell(cell.settings.root, cell.arch, fit_seed, fit)
    identity = dict(config, use_connectivity=use_connectivity)
    if fit != "fit" or exact or fit_seed is not None:  # the paper's cells keep their identity
        identity.update(fit=fit, exact=exact, fit_seed=cell.seed if fit_seed is None else fit_seed)
    rd = RunDir.open(cell.dir().path, identity)
    if rd.exists(RunDir.MASKS):  # sampled before a kill: train what was sampled
        masks = rd.load_tensors(RunDir.MASKS)
    else:
        protocol = cell.settings.protocol
        sparsity = _sparsity(cell, ds, model)
        model.to(distributed.device_for(cell.settings.device))  # sample where the grid computes
        start = time.perf_counter()
        masks, draws = sample_ticket(model, fit_dir.file(RunDir.FIT), ds.train.tensors[0],
                                     sparsity=sparsity, use_connectivity=use_connectivity,
                                     exact=exact, seed=cell.seed,
                                     max_samples=protocol.connectivity_samples,
                                     progress=cell.progress)
        wall = time.perf_counter() - start
        rd.save_json(RunDir.SAMPLE, sample_record(draws, wall))
        rd.save_tensors(RunDir.INIT, model.state_dict())
        rd.save_tensors(RunDir.MASKS, masks)
    cell.train(model, ds, masks, train_cfg, rd, progress=cell.progress, desc=_desc(cell))


register_cell("mcwt_magnitude", needs=("fit",))(lambda cell: _run_mcwt_cell(cell, False))
register_cell("mcwt_connectivity", needs=("fit",))(lambda cell: _run_mcwt_cell(cell, True))


# --- issue 12: pruning at init, WT ablations, fit variants, fit transfer, exact count -------------

#: the seed ``reinit`` draws fresh weights from: one no cell of any seed < 10000 uses
REINIT_SEED_OFFSET = 10_000


def _run_prune_cell(cell, method: str, allocation: str = "layer") -> None:
    from ..prune_at_init import prune_at_init

    ds, model, train_cfg, config = cell.context()
    rd = RunDir.open(cell.dir().path, dict(config, prune_method=method, allocation=allocation))
    rd.save_tensors(RunDir.INIT, model.state_dict())
    masks = _timed_masks(rd, lambda: prune_at_init(model, method, ds.train.tensors,
                                                   _sparsity(cell, ds, model), seed=cell.seed,
                                                   allocation=allocation))
    cell.train(model, ds, masks, train_cfg, rd, progress=cell.progress, desc=_desc(cell))


def ablation_seed(kind: str, seed: int) -> int:
    """The seed of an ablation of seed ``seed``'s ticket (reinit: a fresh init no cell shares)."""
    return REINIT_SEED_OFFSET + seed if kind == "reinit" else seed


def _run_ablate_cell(cell, kind: str) -> None:
    from ..ablate import ablate
    from ..models import build_model

    ds, model, train_cfg, config = cell.context()
    ticket = load_ticket(cell.dir("imp").path)
    rd = RunDir.open(cell.dir().path, dict(config, ablation=kind, ablation_seed=ablation_seed(kind, cell.seed)))
    build = (lambda s: build_model(cell.arch, ds.in_channels, ds.num_classes, ds.image_size, s)) \
        if kind == "reinit" else None
    state = {}

    def make():
        init, masks = ablate(ticket.model, ticket.masks, kind, ablation_seed(kind, cell.seed), build=build)
        state.update(init)
        rd.save_tensors(RunDir.INIT, init)
        return masks

    masks = _timed_masks(rd, make)
    model.load_state_dict(state or rd.load_tensors(RunDir.INIT))
    cell.train(model, ds, masks, train_cfg, rd, progress=cell.progress, desc=_desc(cell))


PRUNE_METHODS = ("magnitude", "snip", "grasp", "synflow")
#: the baselines whose papers allocate globally (one ranking over all pruned layers), run so too
GLOBAL_PRUNE_METHODS = ("snip", "grasp", "synflow")
ABLATIONS = ("shuffle-mask", "reinit", "shuffle-values")
FIT_VARIANTS = ("layer", "pooled-raw")


def _key(text: str) -> str:
    return text.replace("-", "_")


for _m in PRUNE_METHODS:
    register_cell(f"prune_{_m}")(lambda cell, m=_m: _run_prune_cell(cell, m))
for _m in GLOBAL_PRUNE_METHODS:
    register_cell(f"prune_{_m}_global")(lambda cell, m=_m: _run_prune_cell(cell, m, "global"))
for _k in ABLATIONS:
    register_cell(f"ablate_{_key(_k)}", needs=("imp",))(lambda cell, k=_k: _run_ablate_cell(cell, k))
for _g in FIT_VARIANTS:
    register_cell(f"fit_{_key(_g)}", needs=("imp",))(lambda cell, g=_g: _run_fit_cell(cell, g))
    register_cell(f"mcwt_fit_{_key(_g)}", needs=(f"fit_{_key(_g)}",))(
        lambda cell, g=_g: _run_mcwt_cell(cell, True, f"fit_{_key(g)}"))
register_cell("mcwt_transfer", needs_seed0=("fit",), applies=lambda seed: seed != 0)(
    lambda cell: _run_mcwt_cell(cell, True, "fit", fit_seed=0))
register_cell("mcwt_exact", needs=("fit",))(lambda cell: _run_mcwt_cell(cell, True, exact=True))


#: settings of the grid's DstConfig beyond mcwt_ext.dst's defaults (RigL's: update every 100 steps
#: until 75% of the training, alpha 0.3) and :func:`dst_update_every`; none by default
DST_SETTINGS: dict = {}
#: the fewest mask updates a grid's DST cell makes (RigL's, counting the one at step 0)
MIN_DST_UPDATES = 5


def dst_update_every(iterations: int, stop_at: float = 0.75) -> int:
    """RigL's ΔT = 100 steps between updates, unless the training is too short for
    :data:`MIN_DST_UPDATES` updates at that interval (updates at 0, ΔT, ... <= stop_at *
    iterations): then the interval that makes that many (300 steps: every 56)."""
    end = int(stop_at * iterations)
    return 100 if end // 100 + 1 >= MIN_DST_UPDATES else max(1, end // (MIN_DST_UPDATES - 1))


def grid_dst_config(method: str, iterations: int, seed: int = 0):
    """The DstConfig of a grid's DST cell training ``iterations`` steps."""
    from ..dst import DstConfig

    return DstConfig(method, seed=seed, **{"update_every": dst_update_every(iterations), **DST_SETTINGS})


def _run_dst_cell(cell, method: str, start: str | None = None, distribution: str = "uniform") -> None:
    """Dynamic sparse training from a random start, or from the masks of cell ``start``. It trains
    in its own loop (never in a pack: its masks change while it trains)."""
    from ..dst import train_dst
    from ..masks import random_masks

    ds, model, train_cfg, config = cell.context()
    dst = grid_dst_config(method, train_cfg.iterations, cell.seed)
    rd = RunDir.open(cell.dir().path, dict(config, dst=dataclasses.asdict(dst), start=start or "random",
                                           **_distribution_entry(distribution)))
    rd.save_tensors(RunDir.INIT, model.state_dict())
    if start is None:
        masks = _timed_masks(rd, lambda: random_masks(model, _sparsity(cell, ds, model, distribution), cell.seed))
    else:
        masks = cell.dir(start).load_tensors(RunDir.MASKS)
        rd.save_or_check_tensors(RunDir.MASKS, masks, "start masks")
    train_dst(model, ds, masks, train_cfg, dst, rd, progress=cell.progress, desc=_desc(cell))


register_cell("rigl")(lambda cell: _run_dst_cell(cell, "rigl"))
register_cell("set")(lambda cell: _run_dst_cell(cell, "set"))
register_cell("rigl_mcwt", needs=("mcwt_connectivity",))(
    lambda cell: _run_dst_cell(cell, "rigl", "mcwt_connectivity"))
register_cell("rigl_erk")(lambda cell: _run_dst_cell(cell, "rigl", distribution="erk"))


# --- the rows of Table 1 (paper: validation accuracy, %, CIFAR-10, 80% pruned per layer) ---------

register_method(Method("dense", "Unpruned network", "imp",
                       {"conv2": 67.20, "conv4": 74.62, "conv6": 77.40},
                       trained=lambda imp: imp.imp_dense()))
register_method(Method("random", "Randomly pruned network", "random",
                       {"conv2": 66.90, "conv4": 73.20, "conv6": 73.14}, cost=costs.construction("random")))
register_method(Method("wt", "Original Winning Ticket (IMP)", "imp",
                       {"conv2": 70.42, "conv4": 74.92, "conv6": 78.04},
                       trained=lambda imp: imp.round(imp.ticket_round()),
                       cost=lambda cell_dir, seeds: costs.imp_cost(cell_dir)))
register_method(Method("mcwt_magnitude", "MCWT w/o connectivity", "mcwt_magnitude",
                       {"conv2": 69.47, "conv4": 76.39, "conv6": 78.10}, cost=costs.mcwt("mcwt_magnitude")))
register_method(Method("mcwt_connectivity", "MCWT with connectivity", "mcwt_connectivity",
                       {"conv2": 68.40, "conv4": 76.21, "conv6": 78.17}, cost=costs.mcwt("mcwt_connectivity")))

# --- the rows issue 12 adds (`reproduce --methods all`) ------------------------------------------

_PRUNE_LABELS = dict(zip(PRUNE_METHODS, ("Magnitude at init", "SNIP", "GraSP", "SynFlow")))
for _m in PRUNE_METHODS:
    register_method(Method(f"prune_{_m}", f"{_PRUNE_LABELS[_m]} (pruning at init, per layer)", f"prune_{_m}",
                           group="baseline", cost=costs.construction(f"prune_{_m}")))
for _m in GLOBAL_PRUNE_METHODS:
    register_method(Method(f"prune_{_m}_global", f"{_PRUNE_LABELS[_m]} (pruning at init, global)",
                           f"prune_{_m}_global", group="baseline", cost=costs.construction(f"prune_{_m}_global")))
for _k, _label in zip(ABLATIONS, ("WT, mask shuffled per layer", "WT mask, re-initialised weights",
                                  "WT, kept values shuffled per layer")):
    register_method(Method(f"ablate_{_key(_k)}", _label, f"ablate_{_key(_k)}", group="ablation",
                           cost=costs.ablation(f"ablate_{_key(_k)}")))
for _g, _label in zip(FIT_VARIANTS, ("MCWT, one fit per layer", "MCWT, raw magnitude pooled per kind")):
    register_method(Method(f"mcwt_fit_{_key(_g)}", _label, f"mcwt_fit_{_key(_g)}", group="fit",
                           cost=costs.mcwt(f"mcwt_fit_{_key(_g)}", f"fit_{_key(_g)}")))
register_method(Method("mcwt_transfer", "MCWT from seed 0's fit (transfer)", "mcwt_transfer",
                       group="transfer", cost=costs.transfer))
register_method(Method("mcwt_exact", "MCWT with connectivity, exact count", "mcwt_exact", group="fit",
                       cost=costs.mcwt("mcwt_exact")))

# --- the rows issue 21 adds: dynamic sparse training (one training each) ---------------------------

register_method(Method("rigl", "RigL (dynamic sparse training)", "rigl", group="dst", cost=costs.dst("rigl")))
register_method(Method("set", "SET (dynamic sparse training)", "set", group="dst", cost=costs.dst("set")))
register_method(Method("rigl_mcwt", "RigL from the MCWT sample", "rigl_mcwt", group="dst",
                       cost=costs.dst("rigl_mcwt", costs.mcwt("mcwt_connectivity"))))
register_method(Method("random_erk", "Randomly pruned network (ERK)", "random_erk", group="baseline",
                       cost=costs.construction("random_erk"), distribution="erk"))
# issue 28: ERK's control, uniform random pruning with ERK's dense layers, at the same total
register_method(Method("random_erk_dense", "Randomly pruned network (ERK's dense layers)", "random_erk_dense",
                       group="baseline", cost=costs.construction("random_erk_dense"),
                       distribution="uniform-erk-dense"))
register_method(Method("rigl_erk", "RigL (ERK)", "rigl_erk", group="dst", cost=costs.dst("rigl_erk"),
                       distribution="erk"))
