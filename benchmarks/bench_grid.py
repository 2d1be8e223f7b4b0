"""The digits grid with the local executor and on Ray, in one run, and Ray's cost per cell.

Runs ``reproduce``'s grid (conv2 on digits, the paper's five rows) in fresh temporary
directories: with ``--executor local`` (this process, one cell at a time) on torch's default
threads and on one thread, and with ``--executor ray`` on a local Ray instance of ``--cpus`` CPUs
(one cell per task, one thread each, cells that are ready run side by side). Then Ray's own cost per cell: a
chain of ``--chain`` no-op tasks, each started by its predecessor's object reference, as a cell
waits for its needs, on warm workers. Prints one Markdown table.

    .venv/bin/python benchmarks/bench_grid.py [--seeds 2] [--iterations 40] [--eval-every 20] [--cpus 2]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from mcwt_ext.experiments import Grid
from mcwt_ext.experiments.ray_executor import init_ray


def _grid_wall(out: Path, a, executor: str) -> tuple[float, int]:
    g = Grid(archs=["conv2"], seeds=list(range(a.seeds)), dataset="digits", out=out, iterations=a.iterations,
             eval_every=a.eval_every, progress=False, executor=executor)
    began = time.perf_counter()
    g.run()
    assert g.done()
    return time.perf_counter() - began, len(g.cells)


def main(argv=None):
    import ray

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="the local Ray instance's CPUs")
    ap.add_argument("--chain", type=int, default=200, help="no-op tasks in the overhead chain")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        threads = torch.get_num_threads()
        local, cells = _grid_wall(Path(tmp) / "local", a, "local")
        rows.append(("grid, local executor", f"{local:.1f} s", f"{cells} cells, {threads} threads"))
        torch.set_num_threads(1)
        try:
            local1, _ = _grid_wall(Path(tmp) / "local1", a, "local")
        finally:
            torch.set_num_threads(threads)
        rows.append(("grid, local executor, 1 thread", f"{local1:.1f} s", f"{cells} cells"))
        began = time.perf_counter()
        started = init_ray(ray, None, num_cpus=a.cpus)  # as reproduce starts it
        rows.append(("ray.init (a local instance)", f"{time.perf_counter() - began:.1f} s" if started else
                     "(already up)", f"{a.cpus} CPUs"))
        try:
            on_ray, _ = _grid_wall(Path(tmp) / "ray", a, "ray")
            rows.append(("grid, Ray executor", f"{on_ray:.1f} s",
                         f"ray / local {on_ray / local:.2f}, ray / local on 1 thread {on_ray / local1:.2f}"))

            @ray.remote(num_cpus=1)
            def noop(*needs):
                return None
            ray.get(noop.remote())  # a warm worker
            began = time.perf_counter()
            ref = noop.remote()
            for _ in range(a.chain - 1):
                ref = noop.remote(ref)
            ray.get(ref)
            per = (time.perf_counter() - began) / a.chain
            rows.append(("Ray's cost per cell (chain of no-op tasks)", f"{1000 * per:.1f} ms",
                         f"{a.chain} tasks; {1000 * per * cells:.0f} ms for the grid's {cells} cells"))
        finally:
            if started:
                ray.shutdown()
    print(f"# bench_grid {datetime.date.today()} | {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs | conv2 digits, {a.seeds} seeds, {a.iterations} iterations, "
          f"eval every {a.eval_every}")
    print("| what | time | note |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
