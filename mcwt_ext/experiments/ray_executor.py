"""The grid's cells as Ray tasks (``reproduce --executor ray``): Ray schedules, places and
retries them, on this machine or on a cluster.

A task runs a *group* of cells in one process, with the local scheduler
(:func:`.grid.schedule`, which :mod:`.grid` passes in, so that the two modules do not import
each other): one cell when packs are off, or, with packs, every cell of one
architecture at one depth of the need graph (IMP and random of every seed, then the fits, then
the MCWT cells), so their trainings train together as packs (:mod:`.packer`) on the task's GPU.
A task's arguments hold the object references of the tasks that run its cells' needs, so Ray
starts it exactly when they are done. Resources: one CPU per task (torch runs one thread in it);
on CUDA a task with packs holds one GPU, a task without packs ``1 / jobs`` of one (``--jobs J``:
J cells share a GPU).

The run directories live under the grid's directory, on storage every node sees, exactly as with
the local executor, so a task that dies (node lost, process killed) is retried by Ray (up to
:data:`RETRIES` times) and resumes from its checkpoints, and a rerun of the driver, with either
executor, resumes from disk. The driver writes the tables. Without an address the driver starts
a local Ray instance whose workers import the driver's mcwt_ext; a cluster's nodes need mcwt_ext
installed.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..errors import UsageError
from .methods import CELLS

__all__ = ["RETRIES", "parse_ray_address", "check_ray", "groups", "resources", "init_ray", "run_on_ray"]

#: Ray retries a task whose process or node died this many times (a cell's error is not retried:
#: it would fail again).
RETRIES = 3
#: A local instance's object store: the tasks return only cell keys, and Ray's default (30% of the
#: memory) can exceed a small /dev/shm.
OBJECT_STORE_BYTES = 200 * 1024**2


def parse_ray_address(text: str) -> str:
    """``auto``, ``HOST:PORT`` or ``ray://HOST:PORT`` (Ray Client): the cluster to join."""
    host, sep, port = str(text).removeprefix("ray://").rpartition(":")
    if text != "auto" and not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise UsageError(f"--ray-address: must be HOST:PORT (a head started by `ray start --head`), "
                         f"ray://HOST:PORT or auto, got {text!r}")
    return text


def _ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray: Ray is not installed; install the ray extra: pip install "
                         "--no-build-isolation '.[ray]' in the checkout (scripts/install.sh --test does)") from None
    return ray


def check_ray(grid) -> None:
    """Raise a ValueError naming the flag if ``grid`` cannot run on Ray (before anything is written)."""
    if grid.shard is not None:
        raise UsageError("--shard: splits a grid over job-array tasks; with --executor ray, Ray places the "
                         "cells itself: give one or the other")
    if grid.budget is not None:
        raise UsageError("--time-budget: picks packs within one process; not with --executor ray")
    from .. import distributed

    if distributed.active():
        raise UsageError("--executor ray: Ray starts its own processes; run it without torchrun")
    device = torch.device(grid.device)
    if device.type == "cuda" and device.index is not None:
        raise UsageError(f"--device {grid.device}: with --executor ray give cuda (Ray picks each task's GPU)")
    if grid.jobs > 1 and device.type != "cuda":
        raise UsageError("--jobs: with --executor ray, Ray runs as many cells at once as it has CPUs; --jobs J "
                         "is for --device cuda (J cells share a GPU)")
    _ray()


def groups(cells: list, pack: int | None) -> list[list]:
    """The cells each task runs: one each without packs (``pack == 1``), else those of one
    architecture and depth of the need graph (depth 0: needs nothing in the grid)."""
    if pack == 1:
        return [[c] for c in cells]
    depth: dict[tuple, int] = {}
    out: dict[tuple, list] = {}
    for c in cells:  # grid order: a cell's needs come before it
        depth[c.key] = 1 + max((depth[k] for k in CELLS[c.kind].need_keys(c.arch, c.seed) if k in depth),
                               default=-1)
        out.setdefault((c.arch, depth[c.key]), []).append(c)
    return list(out.values())


def resources(grid) -> dict:
    """``num_cpus`` and ``num_gpus`` of one task (see the module doc)."""
    if torch.device(grid.device).type != "cuda":
        return dict(num_cpus=1, num_gpus=0)
    return dict(num_cpus=1, num_gpus=1 if grid.pack_size() != 1 else 1 / grid.jobs)


def _run_group(schedule, cells: list, pack: int | None, *needs) -> list[tuple]:
    """A task: ``cells`` in this process by ``schedule`` (:func:`.grid.schedule`, passed in: this
    module imports nothing of the grid's), after ``needs`` (the tasks of their needs, done: Ray
    resolved these references before starting the task)."""
    schedule(cells, progress=False, pack=pack)
    return [c.key for c in cells]


def worker_setup() -> None:
    """Each Ray worker's first step (runtime_env's ``worker_process_setup_hook``): importing this
    module has imported the installed mcwt_ext. Ray puts the driver's working directory first on
    a worker's path when its first task arrives, and a source checkout there (the README's
    commands run in one, its mcwt_ext unbuilt) would otherwise shadow the installed package."""


def init_ray(ray, address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at ``address``, or start a local instance (of ``num_cpus`` CPUs; None:
    all); False if Ray was already up."""
    if ray.is_initialized():
        return False
    hook = f"{__name__}.{worker_setup.__name__}"
    if address is not None:
        ray.init(address=address, include_dashboard=False, runtime_env=dict(worker_process_setup_hook=hook))
        return True
    root = str(Path(__file__).resolve().parents[2])  # where this mcwt_ext was imported from
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    # "local": a new instance, never one that `ray start` left running here
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
             runtime_env=dict(env_vars=dict(PYTHONPATH=path), worker_process_setup_hook=hook))
    return True


def run_on_ray(grid, schedule) -> None:
    """Run every unfinished cell of ``grid`` as Ray tasks, each after the tasks of its needs;
    each task runs its cells with ``schedule`` (:func:`.grid.schedule`)."""
    from ..progress import Progress

    ray = _ray()
    started = init_ray(ray, grid.ray_address)
    pack = grid.pack_size()
    task = ray.remote(max_retries=RETRIES, retry_exceptions=False, **resources(grid))(_run_group)
    refs, owner = [], {}  # owner: cell key -> the reference of the task that runs it
    for group in groups(grid.cells, pack):
        todo = [c for c in group if not c.done()]
        if not todo:
            continue
        needs = {owner[k] for c in todo for k in CELLS[c.kind].need_keys(c.arch, c.seed) if k in owner}
        name = " ".join(map(str, todo[0].key)) + (f" (+{len(todo) - 1})" if len(todo) > 1 else "")
        ref = task.options(name=name).remote(schedule, todo, pack, *needs)
        refs.append(ref)
        owner.update((c.key, ref) for c in todo)
    total = len(grid.cells)
    bar = Progress(total, "reproduce", unit="cell", noun="cell", initial=total - len(owner), enabled=grid.progress)
    print(f"ray: {len(refs)} tasks for {len(owner)} cells, each {resources(grid)}", file=sys.stderr, flush=True)
    try:
        while refs:
            ready, refs = ray.wait(refs, num_returns=1)
            try:
                keys = ray.get(ready[0])
            except ray.exceptions.RayTaskError as e:  # the cell's own error, as the local executor raises it
                raise e.cause if isinstance(e.cause, Exception) else e
            bar.set(last="/".join(map(str, keys[-1])))
            bar.update(len(keys))
    finally:
        for ref in refs:  # stopped early (an error, Ctrl-C): the cells left resume on a rerun
            ray.cancel(ref)
        bar.close()
        if started:
            ray.shutdown()
