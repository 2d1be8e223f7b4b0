"""What constructing one mask of a row costs (seconds, one arch and seed), read from the run
directories of the cells that made it: a :class:`~mcwt_ext.experiments.methods.Method`'s ``cost``.

Each ``cost(cell_dir, seeds)`` takes ``cell_dir(cell, seed)``, the run directory of a cell of
this arch (``seed`` None: this seed), and returns None while any part is not measured yet."""
from __future__ import annotations

from ..runs import RunDir

__all__ = ["imp_cost", "fit_cost", "construction", "mcwt", "ablation", "dst", "transfer"]


def _json(rd: RunDir, name: str, key: str = "wall_time_s") -> float | None:
    return rd.load_json(name)[key] if rd.exists(name) else None


def _sum(*parts):
    return None if any(p is None for p in parts) else sum(parts)


def imp_cost(cell_dir, seed=None) -> float | None:
    """IMP's rounds before the ticket (the last round trains the finished ticket: evaluation)."""
    imp = cell_dir("imp", seed)
    if not imp.done():
        return None
    return sum(imp.round(r).load_json(RunDir.SUMMARY)["wall_time_s"] for r in range(imp.ticket_round()))


def fit_cost(cell_dir, fit: str = "fit", seed=None) -> float | None:
    return _json(cell_dir(fit, seed), RunDir.SUMMARY)


def construction(cell: str):
    return lambda cell_dir, seeds: _json(cell_dir(cell, None), RunDir.CONSTRUCTION)


def mcwt(cell: str, fit: str = "fit"):
    return lambda cell_dir, seeds: _sum(fit_cost(cell_dir, fit), _json(cell_dir(cell, None), RunDir.SAMPLE))


def ablation(cell: str):
    return lambda cell_dir, seeds: _sum(imp_cost(cell_dir), _json(cell_dir(cell, None), RunDir.CONSTRUCTION))


def dst(cell: str, start=None):
    """The training (its summary's wall time) plus making the start: a random mask's
    construction, or ``start``'s cost."""
    def cost(cell_dir, seeds):
        made = _json(cell_dir(cell, None), RunDir.CONSTRUCTION) if start is None else start(cell_dir, seeds)
        return _sum(made, _json(cell_dir(cell, None), RunDir.SUMMARY))
    return cost


def transfer(cell_dir, seeds) -> float | None:
    """One IMP and one fit (of seed 0) shared by the transfer samples (seeds other than 0),
    plus this sample's own sampling time."""
    shared = _sum(imp_cost(cell_dir, 0), fit_cost(cell_dir, "fit", 0))
    n = max(1, len([s for s in seeds if s != 0]))
    return _sum(None if shared is None else shared / n, _json(cell_dir("mcwt_transfer", None), RunDir.SAMPLE))
