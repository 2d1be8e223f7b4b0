"""Reproduce the paper's Table 1: a resumable grid of cells per architecture and seed.

    protocol.py   the full (Frankle & Carbin) and reduced (CPU) protocols
    methods.py    the registry: cells (units of work) and methods (rows of the table)
    grid.py       the grid's settings and cells, and the scheduler that runs them
    shards.py     a job array's share of a grid: whole chains of cells
    ray_executor.py  the cells as Ray tasks (reproduce --executor ray)
    budget.py     a call's time budget: which pack to train next in the time left
    report.py     table, cost and figures of a grid
"""
from .budget import Budget, BudgetSpent
from .grid import Cell, CellSettings, Grid, run_cell, schedule
from .methods import CELLS, METHODS, CellKind, Method, register_cell, register_method
from .protocol import PROTOCOLS, Protocol
from .report import METRICS, collect, cost_rows, figures, method_run, read_table_csv, report

__all__ = ["Budget", "BudgetSpent", "Cell", "CellSettings", "Grid", "run_cell", "schedule", "CELLS", "METHODS", "CellKind",
           "Method", "register_cell", "register_method", "PROTOCOLS", "Protocol", "METRICS",
           "collect", "cost_rows", "figures", "method_run", "read_table_csv", "report"]
