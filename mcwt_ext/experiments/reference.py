"""The main job's promise: its ``table.csv`` against the reference in ``docs/results/digits``.

On the machine that made it, a rerun (or a killed and resumed run) of the main job gives the
reference table bit for bit. On another CPU, or with another thread count, the float rounding
differs (other SIMD widths, FMA or not, other summation orders), IMP prunes a few other weights,
and from there the trainings diverge like reruns of a chaotic trajectory: every cell then lies
within the tolerance stored beside the reference (how it was derived:
``docs/results/digits/README.md``). The reference ships inside the package
(``reference_tables/digits_table.csv``, a copy of ``docs/results/digits/table.csv``, which a test keeps
equal), so an installed ``mcwt`` can say which of the three its table is.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .report import read_table_csv

__all__ = ["REFERENCE_DIR", "Reference", "Verdict", "main_job_reference", "compare_with_reference",
           "verdict_lines"]

REFERENCE_DIR = Path(__file__).with_name("reference_tables")


@dataclass(frozen=True)
class Reference:
    """A reference table, the grid it was made by and the tolerance of each column (points)."""

    table: Path
    grid: dict
    tolerance: dict[str, float]
    docs: str  # where the reference lives in the repository (for the messages)


def _grid_identity(grid) -> dict:
    """What makes two grids compute the same table (as JSON would have it)."""
    return json.loads(json.dumps(dict(settings=grid.settings(), archs=list(grid.archs),
                                      seeds=list(grid.seeds), methods=list(grid.methods))))


def main_job_reference(grid) -> Reference | None:
    """The reference for ``grid`` when it is the main job's grid, else None."""
    meta = json.loads((REFERENCE_DIR / "digits_table.json").read_text())
    if _grid_identity(grid) != meta["grid"]:
        return None
    return Reference(REFERENCE_DIR / "digits_table.csv", meta["grid"], meta["tolerance"], meta["docs"])


@dataclass
class Verdict:
    """``kind``: "bit for bit", "within the tolerance" or "not within the tolerance";
    ``cells``: one line per differing cell, those beyond the tolerance marked."""

    kind: str
    cells: list[str] = field(default_factory=list)
    beyond: int = 0

    def lines(self, reference: Reference) -> list[str]:
        tol = ", ".join(f"{k} {v:g}" for k, v in reference.tolerance.items())
        head = f"table.csv against the main job's reference {reference.docs}: {self.kind}"
        if self.kind != "bit for bit":
            head += (f" ({len(self.cells)} cells differ, {self.beyond} beyond the tolerance; "
                     f"tolerance in points: {tol})")
        return [head] + [f"  {c}" for c in self.cells]


def compare_with_reference(table: Path, reference: Reference) -> Verdict:
    """Whether ``table`` equals the reference byte for byte, or every cell lies within the
    reference's tolerance (``mean`` and ``std`` in points; ``n`` and ``paper`` exactly), or not."""
    if Path(table).read_bytes() == reference.table.read_bytes():
        return Verdict("bit for bit")
    want = {(r["metric"], r["method"], r["arch"]): r for r in read_table_csv(reference.table)}
    got = {(r["metric"], r["method"], r["arch"]): r for r in read_table_csv(table)}
    cells, beyond = [], 0
    for key in list(want) + [k for k in got if k not in want]:
        name = " ".join(key)
        if key not in got or key not in want:
            cells.append(f"{name}: {'missing' if key not in got else 'not in the reference'} (beyond)")
            beyond += 1
            continue
        a, b = got[key], want[key]
        for col in ("n", "mean", "std", "paper"):
            if a[col] == b[col]:
                continue
            tol = reference.tolerance.get(col)
            out = tol is None or a[col] is None or b[col] is None or abs(a[col] - b[col]) > tol
            beyond += out
            diff = "" if a[col] is None or b[col] is None else f" ({a[col] - b[col]:+.4f})"
            cells.append(f"{name} {col}: {_text(a[col])} here, {_text(b[col])} in the reference{diff}"
                         + (" (beyond)" if out else ""))
    return Verdict("not within the tolerance" if beyond else "within the tolerance", cells, beyond)


def _text(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def verdict_lines(grid, table: Path) -> list[str]:
    """What ``reproduce`` says at its end: for the main job's grid, how ``table`` compares with
    the reference (and every differing cell); for any other grid, nothing."""
    reference = main_job_reference(grid)
    return [] if reference is None else compare_with_reference(table, reference).lines(reference)
