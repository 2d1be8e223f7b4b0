"""Job-array shards of a grid (``reproduce --shard I/N``): whole chains, so no shard waits on
another.

A *chain* is an architecture's seed with every cell that needs one of its cells: each connected
component of the grid's need graph belongs to the (architecture, seed) of its first cell (the
fit-transfer cells of every seed need seed 0's fit, so they join seed 0's chain). No cell of one chain needs a cell of another, so a shard that runs whole
chains needs nothing another shard makes, and a killed or never-started shard holds up no other:
its chains wait for its rerun. Chain j, counted from 1 in grid order, goes to shard
(j - 1) mod N + 1.
"""
from __future__ import annotations

import sys

from ..errors import UsageError
from .methods import CELLS

__all__ = ["SHARD_RULE", "parse_shard", "chains", "shard_cells"]

#: The split rule, as each shard prints it at its start.
SHARD_RULE = ("a chain is an architecture's seed with every cell that needs its cells; chain j (from 1, in "
              "grid order) goes to shard (j - 1) mod N + 1")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), 1 <= I <= N."""
    i, sep, n = str(text).partition("/")
    if not sep or not i.strip().isdigit() or not n.strip().isdigit() or not 1 <= int(i) <= int(n):
        raise UsageError(f"--shard: must be I/N with 1 <= I <= N (this task's share of N), got {text!r}")
    return int(i), int(n)


def chains(cells: list) -> list[list]:
    """The chains of ``cells`` (the grid's :class:`.grid.Cell`; this module imports nothing of the
    grid's, which imports it), in grid order: each connected component of the need graph goes
    to the (arch, seed) of its first cell, so no cell of one chain needs a cell of another."""
    parent = {c.key: c.key for c in cells}

    def root(key):
        while parent[key] != key:
            key = parent[key]
        return key
    order = {c.key: i for i, c in enumerate(cells)}
    for c in cells:
        for k in CELLS[c.kind].need_keys(c.arch, c.seed):
            if k in parent:  # join the two components under the earlier root: a root is its component's first
                a, b = sorted((root(c.key), root(k)), key=order.get)
                parent[b] = a
    out: dict[tuple, list] = {}
    for c in cells:
        out.setdefault(root(c.key)[:2], []).append(c)
    return list(out.values())


def shard_cells(cells: list, shard: tuple[int, int]) -> list:
    """Shard ``shard=(i, n)``'s share of ``cells``: whole chains, every n-th from the i-th. Says
    which on stderr."""
    every = chains(cells)
    mine = every[shard[0] - 1::shard[1]]
    names = ", ".join(f"{c[0].arch} seed {c[0].seed}" for c in mine) or "none"
    print(f"shard {shard[0]}/{shard[1]}: chains {len(mine)} of {len(every)} ({names}; rule: {SHARD_RULE})",
          file=sys.stderr, flush=True)
    return [c for chain in mine for c in chain]
