"""The grid on Ray (issue 20): ``reproduce --executor ray`` on a local Ray instance of 2 CPUs,
one per module (its start-up costs ~10 s), whose workers import the mcwt_ext under test and
run ``ray_hooks.worker_setup`` (checkpoints every 2 iterations, a kill on request)."""
import os
import re
import sys
from pathlib import Path

import pytest
from mcwt_ext.errors import UsageError
import torch
from conftest import IMPORT_ROOT
from readme_blocks import block, explain, run_block, sandbox

import mcwt_ext.experiments.grid as grid_mod
from mcwt_ext.cli import main
from mcwt_ext.experiments import Grid, report
from mcwt_ext.experiments.ray_executor import OBJECT_STORE_BYTES, groups
from mcwt_ext.runs import RunDir, grid_cell

ray = pytest.importorskip("ray")  # scripts/install.sh --test installs it, so CI runs these

DIGITS = dict(archs=["conv2"], seeds=[0, 1], dataset="digits", iterations=6, eval_every=3, progress=False)


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """The local Ray instance; yields the folder of the kill flag and the workers' event log."""
    root = tmp_path_factory.mktemp("ray")
    env = dict(PYTHONPATH=os.pathsep.join([IMPORT_ROOT, str(Path(__file__).parent)]),
               MCWT_TEST_KILL_FLAG=str(root / "kill"), MCWT_TEST_EVENTS=str(root / "events"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
             runtime_env=dict(env_vars=env, worker_process_setup_hook="ray_hooks.worker_setup"))
    yield root
    ray.shutdown()


@pytest.fixture(scope="module")
def local_table(tmp_path_factory):
    """The local executor's table of the grid, on one thread as a Ray task trains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = Grid(out=tmp_path_factory.mktemp("local") / "g", **DIGITS)
        g.run()
        report(g)
    finally:
        torch.set_num_threads(threads)
    return (g.out / "table.csv").read_text()


def _ray_grid(out, monkeypatch, **kw):
    """The grid on Ray, its table written by the driver (this process, which runs no cell: its
    run_cell fails, and the Ray workers are other processes)."""
    def not_here(cell):
        raise AssertionError(f"{cell.key} ran in the driver")
    monkeypatch.setattr(grid_mod, "run_cell", not_here)
    g = Grid(out=out, executor="ray", **DIGITS, **kw)
    g.run()
    report(g)
    return g


@pytest.mark.slow
def test_ray_grid_table_equals_the_local_executors(ray_local, local_table, tmp_path, monkeypatch):
    g = _ray_grid(tmp_path / "g", monkeypatch)
    assert g.done() and (g.out / "table.csv").read_text() == local_table


@pytest.mark.slow
def test_a_killed_cell_task_is_retried_and_resumes_from_its_checkpoint(ray_local, local_table, tmp_path,
                                                                       monkeypatch):
    (ray_local / "kill").touch()
    g = _ray_grid(tmp_path / "g", monkeypatch)
    assert not (ray_local / "kill").exists()  # a worker died
    events = (ray_local / "events").read_text().splitlines()
    killed = [e.split(" ", 1)[1] for e in events if e.startswith("killed ")]
    assert len(killed) == 1 and killed[0].startswith(str(g.out)), events
    assert f"resumed {killed[0]}" in events, events  # the retry went on from the checkpoint
    assert (g.out / "table.csv").read_text() == local_table


@pytest.mark.slow
def test_packs_on_ray_train_as_the_local_executors_packs_and_give_its_table(ray_local, tmp_path, monkeypatch):
    """--pack 8: one task per depth of the need graph trains its cells as packs (IMP round 0 of
    both seeds with both random cells, then the four MCWT cells), as the local executor does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Ray task trains
    try:
        local = Grid(out=tmp_path / "local", pack=8, **DIGITS)
        local.run()
        report(local)
    finally:
        torch.set_num_threads(threads)
    g = _ray_grid(tmp_path / "ray", monkeypatch, pack=8)
    assert g.done() and (g.out / "table.csv").read_text() == (local.out / "table.csv").read_text()
    for kind, size in (("random", 4), ("mcwt_magnitude", 4), ("mcwt_connectivity", 4)):
        for seed in (0, 1):
            summary = grid_cell(g.out, "conv2", seed, kind).load_json(RunDir.SUMMARY)
            assert summary["lockstep"]["pack_size"] == size, (kind, seed, summary.get("lockstep"))


def test_packs_make_one_task_per_architecture_and_depth(tmp_path):
    g = Grid(archs=["conv2", "conv4"], seeds=[0, 1], dataset="synthetic", out=tmp_path / "g", methods="all")
    tasks = groups(g.cells, None)
    assert [sorted({c.kind for c in t}) for t in tasks[:4]] == [
        sorted(k for k in {c.kind for c in g.cells}
               if k in ("imp", "random", "random_erk", "random_erk_dense", "rigl", "set", "rigl_erk")
               or k.startswith("prune_")),
        sorted(["fit", "fit_layer", "fit_pooled_raw", "ablate_shuffle_mask", "ablate_reinit",
                "ablate_shuffle_values"]),
        sorted(["mcwt_magnitude", "mcwt_connectivity", "mcwt_fit_layer", "mcwt_fit_pooled_raw",
                "mcwt_transfer", "mcwt_exact"]),
        ["rigl_mcwt"]]
    assert [{c.arch for c in t} for t in tasks] == [{"conv2"}] * 4 + [{"conv4"}] * 4
    assert {c.seed for c in tasks[0]} == {0, 1}
    assert [[c.key] for c in g.cells] == [[c.key for c in t] for t in groups(g.cells, 1)]  # no packs: a cell each


def test_without_ray_the_executor_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--dataset", "synthetic", "--executor", "ray", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "ray extra" in err[0] and "'.[ray]'" in err[0], err
    assert not (tmp_path / "g").exists()


@pytest.mark.slow
def test_readme_ray_block_runs_as_written(tmp_path):
    """docs/scaling.md's one-machine Ray command, as written (it starts its own local Ray instance)."""
    box = sandbox(tmp_path)
    text = block("--executor ray")
    done = run_block(text, box, timeout=900)
    assert done.returncode == 0, explain(done)
    out = box / re.search(r"--out (\S+)", text).group(1)
    assert (out / "table.csv").is_file() and "ray: " in done.stderr, explain(done)
    assert all(grid_cell(out, "conv2", s, "mcwt_connectivity").done() for s in (0, 1))


@pytest.mark.slow
def test_bench_grid_runs(ray_local, capsys):
    """benchmarks/bench_grid.py at a tiny size, on this module's Ray instance."""
    from test_benchmarks import _load

    _load("bench_grid").main(["--seeds", "1", "--iterations", "2", "--eval-every", "1", "--chain", "5"])
    out = capsys.readouterr().out
    assert "| grid, Ray executor |" in out and "| Ray's cost per cell (chain of no-op tasks) |" in out, out


@pytest.mark.parametrize("device, jobs, pack, want", [
    ("cpu", 1, "auto", dict(num_cpus=1, num_gpus=0)),
    ("cuda", 1, "auto", dict(num_cpus=1, num_gpus=1)),     # packs: a task holds a GPU
    ("cuda", 4, "auto", dict(num_cpus=1, num_gpus=0.25)),  # no packs: 4 cells share one
    ("cuda", 1, 1, dict(num_cpus=1, num_gpus=1.0)),
], ids=["cpu", "gpu-packs", "gpu-jobs4", "gpu-pack1"])  # no "cuda" id: needs no GPU, so not in -m needs_cuda
def test_task_resources_follow_the_device_and_packs(tmp_path, device, jobs, pack, want):
    from mcwt_ext.experiments.ray_executor import resources

    g = Grid(archs=["conv2"], seeds=[0], dataset="synthetic", out=tmp_path / "g", device=device, jobs=jobs,
             pack=pack, executor="ray")
    assert resources(g) == want


def test_a_cells_error_reaches_the_driver_as_the_cells_own(ray_local, tmp_path):
    """A cell that fails (here: its directory holds another run) fails the grid with its own
    error, as under the local executor, not wrapped in Ray's."""
    g = Grid(archs=["conv2"], seeds=[0], dataset="synthetic", out=tmp_path / "g", iterations=2, eval_every=1,
             progress=False, methods="random", executor="ray")
    imp = grid_cell(g.out, "conv2", 0, "imp")
    imp.path.mkdir(parents=True)
    imp.save_json("config.json", dict(command="train", arch="conv4"))
    with pytest.raises(UsageError) as e:
        g.run()
    assert type(e.value) is UsageError and "arch" in str(e.value), e.value


@pytest.mark.slow
def test_workers_import_the_installed_package_not_a_checkout_in_the_working_directory(tmp_path):
    """Ray puts the driver's working directory first on its workers' path; the commands of docs/scaling.md
    run in a source checkout whose mcwt_ext may be unbuilt. A driver (a script, so its own path
    does not hold its working directory) in a folder whose mcwt_ext/ cannot be imported still
    runs the grid on a local Ray instance that mcwt_ext starts."""
    import subprocess

    from conftest import child_env

    (tmp_path / "mcwt_ext").mkdir()
    (tmp_path / "mcwt_ext" / "__init__.py").write_text("raise ImportError('the unbuilt checkout was imported')\n")
    driver = tmp_path / "driver" / "run.py"
    driver.parent.mkdir()
    driver.write_text(
        "from mcwt_ext.experiments import Grid\n"
        "Grid(archs=['conv2'], seeds=[0], dataset='synthetic', iterations=2, eval_every=2, progress=False,\n"
        "     executor='ray', out='grid', methods='random').run()\n")
    out = subprocess.run([sys.executable, str(driver)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=child_env(RAY_ADDRESS=""))
    assert out.returncode == 0, out.stderr[-3000:]
    assert grid_cell(tmp_path / "grid", "conv2", 0, "random").done()
