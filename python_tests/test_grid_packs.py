"""The reproduce scheduler's packs, shards and state bundles (issue 10 item 3, issue 13 item 5, issue 20 item 2)."""
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import IMPORT_ROOT, child_env

import mcwt_ext.experiments.grid as grid_mod
import mcwt_ext.lockstep as lockstep_mod
from mcwt_ext.cli import main
from mcwt_ext.experiments import Grid, report
from mcwt_ext.experiments.protocol import PROTOCOLS, Protocol
from mcwt_ext.experiments.report import read_table_csv
from mcwt_ext.runs import RunDir, grid_cell
from mcwt_ext.state import export_state, import_state

TINY = dict(dataset="synthetic", iterations=6, eval_every=3, progress=False)
TRAINED = ("random", "mcwt_magnitude", "mcwt_connectivity")


def _grid(out, **kw):
    return Grid(archs=["conv2"], seeds=[0, 1], out=out, **{**TINY, **kw})


def _summary(out, seed, *parts):
    return json.loads((Path(out) / "conv2" / f"seed_{seed}" / Path(*parts) / "summary.json").read_text())


class _Killed(Exception):
    pass


def _kill_at(monkeypatch, step):
    """The pack dies when it starts its ``step``-th step (counted over the whole grid)."""
    real, seen = lockstep_mod._Pack.step, []

    def dying(self, idx):
        seen.append(1)
        if len(seen) == step:
            raise _Killed
        return real(self, idx)
    monkeypatch.setattr(lockstep_mod._Pack, "step", dying)


def _checkpoint_every(monkeypatch, n):
    real = Protocol.train_config

    def cfg(self, *a, **kw):
        return dataclasses.replace(real(self, *a, **kw), checkpoint_every=n)
    monkeypatch.setattr(Protocol, "train_config", cfg)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    g = _grid(tmp_path_factory.mktemp("packed"), pack=8)
    g.run()
    report(g)
    return g


def test_packs_advance_imp_rounds_together_and_pack_the_trained_cells(packed):
    imp = grid_cell(packed.out, "conv2", 0, "imp")
    rounds = imp.ticket_round()
    assert rounds >= 1
    for r in range(rounds + 1):
        sizes = {_summary(packed.out, s, "imp", f"round_{r:02d}")["lockstep"]["pack_size"] for s in (0, 1)}
        # round 0 trains with the random cells (ready at the start), the last with nothing else
        assert sizes == {4 if r == 0 else 2}
    for kind in TRAINED[1:]:
        assert {_summary(packed.out, s, kind)["lockstep"]["pack_size"] for s in (0, 1)} == {4}


@pytest.mark.slow
@pytest.mark.numerics
def test_pack_grid_matches_the_per_cell_grid(packed, tmp_path):
    single = _grid(tmp_path / "single", pack=1)
    single.run()
    assert "lockstep" not in _summary(single.out, 0, "random")
    for s in (0, 1):  # same masks (pruned from weights equal up to float rounding)
        for kind in ("imp", *TRAINED):
            a = RunDir(single.out / "conv2" / f"seed_{s}" / kind).load_tensors(RunDir.MASKS)
            b = RunDir(packed.out / "conv2" / f"seed_{s}" / kind).load_tensors(RunDir.MASKS)
            assert all(torch.equal(a[k], b[k]) for k in a)
        for kind in TRAINED:
            assert _summary(single.out, s, kind)["val_acc_early_stop"] == \
                pytest.approx(_summary(packed.out, s, kind)["val_acc_early_stop"], abs=0.02)


def test_table_reports_the_maximum_validation_accuracy(packed):
    rows = [r for r in read_table_csv(packed.out / "table.csv") if r["metric"] == "val_acc_max"]
    assert {r["method"] for r in rows} >= {"dense", "wt", *TRAINED}
    for r in rows:
        method = r["method"]
        kind = {"dense": "imp/round_00", "wt": None}.get(method, method)
        if kind is None:
            kind = f"imp/round_{grid_cell(packed.out, 'conv2', 0, 'imp').ticket_round():02d}"
        vals = [100 * _summary(packed.out, s, *kind.split("/"))["val_acc_max"] for s in (0, 1)]
        assert r["mean"] == pytest.approx(sum(vals) / 2, abs=1e-3)
    assert "Maximum validation accuracy" in (packed.out / "table.md").read_text()
    rounds = RunDir(packed.out / "conv2" / "seed_0" / "imp").load_csv(RunDir.ROUNDS)
    assert all(float(r["val_acc_max"]) >= float(r["val_acc_early_stop"]) for r in rounds)


@pytest.mark.slow
@pytest.mark.numerics
def test_killed_pack_grid_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    _checkpoint_every(monkeypatch, 2)
    whole = _grid(tmp_path / "whole", pack=8)
    whole.run()
    _kill_at(monkeypatch, 10)  # round 1 of IMP, after its checkpoint at step 2
    with pytest.raises(_Killed):
        _grid(tmp_path / "killed", pack=8).run()
    ckpt = tmp_path / "killed" / "conv2" / "seed_0" / "imp" / "round_01" / RunDir.CHECKPOINT
    assert torch.load(ckpt, weights_only=True)["iteration"] == 2
    monkeypatch.setattr(lockstep_mod._Pack, "step", _REAL_STEP)
    _grid(tmp_path / "killed", pack=8).run()
    for s in (0, 1):
        for rel in ("imp/rounds.csv", "random/metrics.csv", "mcwt_connectivity/metrics.csv"):
            part = Path("conv2") / f"seed_{s}" / rel
            assert (tmp_path / "killed" / part).read_text() == (tmp_path / "whole" / part).read_text()


_REAL_STEP = lockstep_mod._Pack.step


@pytest.mark.parametrize("pack", [1, 8])
def test_bundle_of_a_grid_stopped_in_imp_finishes_elsewhere_without_redoing(tmp_path, monkeypatch, pack):
    """Stopped in IMP round 1 (round 0 finished), exported, imported in a fresh directory: the
    finished round is not trained again (its trained weights did not travel), the rest is."""
    whole = _grid(tmp_path / "whole", pack=pack)
    whole.run()
    real_train = lockstep_mod.train_pack if pack > 1 else None
    from mcwt_ext import train as train_mod

    def stop_at_round_1(run_dir):
        if Path(run_dir).name == "round_01":
            raise _Killed
    if pack > 1:
        def dying_pack(nets, *a, **kw):
            for n in nets:
                stop_at_round_1(n.run_dir)
            return real_train(nets, *a, **kw)
        monkeypatch.setattr(lockstep_mod, "train_pack", dying_pack)
    else:
        real = train_mod.train

        def dying(model, ds, masks, cfg, run_dir, *a, **kw):
            stop_at_round_1(run_dir)
            return real(model, ds, masks, cfg, run_dir, *a, **kw)
        monkeypatch.setattr(train_mod, "train", dying)
    with pytest.raises(_Killed):
        _grid(tmp_path / "a", pack=pack).run()
    monkeypatch.undo()
    export_state(tmp_path / "a", tmp_path / "state.zip")
    import_state(tmp_path / "state.zip", tmp_path / "b")
    r0 = tmp_path / "b" / "conv2" / "seed_0" / "imp" / "round_00"
    assert (r0 / "summary.json").exists() and not (r0 / "final.safetensors").exists()
    before = (r0 / "summary.json").read_text()
    _grid(tmp_path / "b", pack=pack).run()
    assert (r0 / "summary.json").read_text() == before and not (r0 / "final.safetensors").exists()
    for s in (0, 1):
        for rel in ("imp/rounds.csv", "imp/round_01/metrics.csv", "random/metrics.csv"):
            part = Path("conv2") / f"seed_{s}" / rel
            assert (tmp_path / "b" / part).read_text() == (tmp_path / "whole" / part).read_text()


def test_paper_protocol_trains_the_table_runs_longer(tmp_path):
    paper = PROTOCOLS["paper"]
    cfg = paper.train_config("conv2", 0)
    imp = paper.imp_config("conv2", cfg)
    assert cfg.iterations == 225_000 and imp.table_iterations == 225_000
    assert imp.train.iterations == 20_000 and imp.rates == PROTOCOLS["full"].imp_config(
        "conv2", PROTOCOLS["full"].train_config("conv2", 0)).rates
    # A tiny paper-like protocol: rounds of 4 iterations, the dense round and the ticket 8.
    tiny = dataclasses.replace(paper, iterations={"conv2": 4}, rates={"conv": 0.6, "linear": 0.6, "output": 0.6},
                               eval_every=2, connectivity_samples=50, table_iterations={"conv2": 8})
    monkey = dict(PROTOCOLS)
    try:
        PROTOCOLS["tiny_paper"] = tiny
        g = Grid(archs=["conv2"], seeds=[0], out=tmp_path / "g", dataset="synthetic", protocol="tiny_paper",
                 progress=False, pack=1)
        g.run()
    finally:
        PROTOCOLS.clear()
        PROTOCOLS.update(monkey)
    imp = grid_cell(g.out, "conv2", 0, "imp")
    last = imp.ticket_round()
    its = [imp.round(r).load_json(RunDir.SUMMARY)["iterations"] for r in range(last + 1)]
    assert its[0] == its[-1] == 8 and all(i == 4 for i in its[1:-1])
    assert imp.round(0).exists("weights_000004.safetensors")  # round 1 pruned from iteration 4
    for kind in TRAINED:
        assert _summary(g.out, 0, kind)["iterations"] == 8


# --- shards ---------------------------------------------------------------------------------------

def _cli(*argv, **kw):
    kw = dict(dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE), **kw)
    return subprocess.Popen([sys.executable, "-m", "mcwt_ext.cli", *argv], cwd=IMPORT_ROOT, env=child_env(),
                            text=True, **kw)


SHARD_GRID = ["reproduce", "--dataset", "digits", "--arch", "conv2", "--seeds", "2", "--iterations", "6",
              "--eval-every", "3", "--no-progress"]


def _run_all(tmp_path, runs: dict, timeout: float = 900) -> dict:
    """Start every ``name: argv`` CLI run at once (output to files, so no pipe can fill) and wait
    for all; on timeout kill them and fail showing each one's stderr (a hung shard shows why)."""
    procs = {}
    for name, argv in runs.items():
        out, err = open(tmp_path / f"{name}.out", "w"), open(tmp_path / f"{name}.err", "w")
        procs[name] = _cli(*argv, stdout=out, stderr=err)
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs.values()) and time.time() < deadline:
        time.sleep(0.5)
    hung = [n for n, p in procs.items() if p.poll() is None]
    for n in hung:
        procs[n].kill()
        procs[n].wait()
    logs = {n: (tmp_path / f"{n}.err").read_text() for n in procs}
    assert not hung, f"{hung} still running after {timeout} s; stderr: {logs}"
    failed = {n: logs[n][-3000:] for n, p in procs.items() if p.returncode != 0}
    assert not failed, failed
    return logs


def _ran(err: str) -> list[str]:
    return [line.split("running ", 1)[1] for line in err.splitlines() if ": running " in line]


def _wait_for(path: Path, text: str, proc, timeout: float = 300) -> None:
    """Until the file ``path`` holds ``text`` (fail if ``proc`` ends first or after ``timeout`` s)."""
    deadline = time.time() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        assert proc.poll() is None and time.time() < deadline, (path.read_text() if path.exists() else "")
        time.sleep(0.2)


@pytest.mark.slow
def test_a_killed_shard_holds_up_no_other_and_its_rerun_finishes_the_grid(tmp_path):
    """Two shards of a two-seed grid, one chain each (seed 0, seed 1). Shard 1 is killed in its
    first cell (holding its lock); shard 2 runs its own chain to the end without waiting and
    writes no table; shard 1's rerun takes its dead lock over, finishes the grid and writes the
    table, which equals a single process's byte for byte."""
    grid = SHARD_GRID
    err1 = tmp_path / "shard1.err"
    with open(err1, "w") as f:
        killed = _cli(*grid, "--out", str(tmp_path / "sharded"), "--shard", "1/2", stdout=subprocess.DEVNULL,
                      stderr=f)
        _wait_for(err1, "running conv2 0 imp", killed)
        killed.kill()
        killed.wait()
    assert "chains 1 of 2 (conv2 seed 0; rule: a chain is an architecture's seed" in err1.read_text()
    assert grid_cell(tmp_path / "sharded", "conv2", 0, "imp").exists(RunDir.LOCK)  # left by the dead shard
    logs = _run_all(tmp_path, {"single": [*grid, "--out", str(tmp_path / "single")],
                               "shard2": [*grid, "--out", str(tmp_path / "sharded"), "--shard", "2/2"]})
    from mcwt_ext.experiments.methods import cells_for, select_methods
    kinds = cells_for(select_methods("paper"))
    assert sorted(_ran(logs["shard2"])) == sorted(f"conv2 1 {k}" for k in kinds)
    assert "no table yet" in logs["shard2"] and not (tmp_path / "sharded" / "table.csv").exists()
    logs = _run_all(tmp_path, {"rerun1": [*grid, "--out", str(tmp_path / "sharded"), "--shard", "1/2"]})
    assert sorted(_ran(logs["rerun1"])) == sorted(f"conv2 0 {k}" for k in kinds)
    # one seed's cells differ between runs only if a cell was redone or lost: the tables equal
    assert (tmp_path / "single" / "table.csv").read_text() == (tmp_path / "sharded" / "table.csv").read_text()
    assert not list((tmp_path / "sharded").rglob(RunDir.LOCK))


def test_shards_take_whole_chains_and_fit_transfer_joins_seed_0s(tmp_path, capsys):
    """Every cell in exactly one shard, no need across shards (the transfer cells of seeds 1, 2
    need seed 0's fit: they go with seed 0), and each shard says its share and the rule."""
    from mcwt_ext.experiments.methods import CELLS
    from mcwt_ext.experiments.shards import chains, shard_cells

    g = Grid(archs=["conv2", "conv4"], seeds=[0, 1, 2], dataset="synthetic", out=tmp_path / "g", methods="all")
    every = chains(g.cells)
    assert [(c[0].arch, c[0].seed) for c in every] == [(a, s) for a in ("conv2", "conv4") for s in (0, 1, 2)]
    assert {c.key for c in every[0] if c.kind == "mcwt_transfer"} == {("conv2", 1, "mcwt_transfer"),
                                                                      ("conv2", 2, "mcwt_transfer")}
    shares = [shard_cells(g.cells, (i, 4)) for i in (1, 2, 3, 4)]
    assert sorted(c.key for s in shares for c in s) == sorted(c.key for c in g.cells)
    for share in shares:
        keys = {c.key for c in share}
        assert all(k in keys for c in share for k in CELLS[c.kind].need_keys(c.arch, c.seed))
    for j, chain in enumerate(every, start=1):  # the rule the README and each shard state
        assert {c.key for c in chain} <= {c.key for c in shares[(j - 1) % 4]}
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("shard 1/4: chains 2 of 6 (conv2 seed 0, conv4 seed 1; rule: ") and \
        err[3].startswith("shard 4/4: chains 1 of 6 (conv4 seed 0; rule: "), err
    assert err[0].endswith("chain j (from 1, in grid order) goes to shard (j - 1) mod N + 1)"), err


def test_a_cell_held_by_a_live_process_ends_the_shard_with_one_line(tmp_path, capsys):
    """The lock is a guard, not a queue: a shard finding a cell of its chain held by a live
    process (here this one, as another task on this host) stops at once, naming the holder."""
    out = tmp_path / "g"
    argv = ["reproduce", "--dataset", "synthetic", "--seeds", "1", "--iterations", "2", "--eval-every", "1",
            "--no-progress", "--shard", "1/1", "--out", str(out)]
    Grid(archs=["conv2"], seeds=[0], dataset="synthetic", out=out, iterations=2, eval_every=1).open()
    imp = grid_cell(out, "conv2", 0, "imp")
    imp.path.mkdir(parents=True)
    imp.file(RunDir.LOCK).write_text(json.dumps(dict(pid=os.getpid(), host=socket.gethostname(),
                                                     time=time.time(), what="another task")))
    began = time.time()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and time.time() - began < 60
    err = capsys.readouterr().err.strip().splitlines()
    assert f"cell conv2 0 imp is in use by process {os.getpid()}" in err[-1] and "(another task)" in err[-1], err
    assert not imp.exists(RunDir.CONFIG)  # nothing of the cell was written
    imp.file(RunDir.LOCK).unlink()  # the control: free, the same shard runs it
    g = Grid(archs=["conv2"], seeds=[0], dataset="synthetic", out=out, iterations=2, eval_every=1,
             shard=(1, 1), methods="random", progress=False)
    g.run()
    assert g.done()


@pytest.mark.slow
def test_sigterm_exports_the_state_so_far(tmp_path):
    bundle = tmp_path / "state.zip"
    p = _cli(*SHARD_GRID[:-5], "--iterations", "3000", "--eval-every", "100", "--no-progress",
             "--out", str(tmp_path / "g"), "--export-state", str(bundle))
    metrics = tmp_path / "g" / "conv2" / "seed_0" / "imp" / "round_00" / "metrics.csv"
    deadline = time.time() + 120
    while not metrics.exists() and time.time() < deadline:
        time.sleep(0.2)
    p.terminate()
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "exported" in err and bundle.is_file()
    import_state(bundle, tmp_path / "h")
    assert (tmp_path / "h" / "conv2" / "seed_0" / "imp" / "round_00" / "masks.safetensors").exists()


# A child whose main thread is interrupted (SIGTERM) while a pack's cell thread computes in torch,
# then ends as `mcwt` ends (cli.entry). Ended the usual way, Python 3.11 unwinds that daemon thread
# out of torch's C++ frames at exit and the process aborts (exit 134, once in CI's lease rehearsal).
_INTERRUPTED_MID_CELL = """
import os, signal, threading, torch
import mcwt_ext.cli as cli
from mcwt_ext.experiments.packer import Packer
from mcwt_ext.runlock import sigterm_as_interrupt

class Cell:
    key = ("conv2", 0, "busy")

def busy(cell):
    a = torch.randn(256, 256)
    while True:
        a = torch.tanh(a @ a)

def main():
    try:
        with sigterm_as_interrupt():
            threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
            Packer(None, False, busy).start(Cell())  # returns when the cell blocks or ends: never
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        return 130

cli.main = main
cli.entry()
"""


def test_a_grid_interrupted_mid_cell_exits_130_not_aborted():
    child = subprocess.run([sys.executable, "-c", _INTERRUPTED_MID_CELL], capture_output=True, text=True,
                           env=child_env(), timeout=120)
    assert (child.returncode, child.stdout.strip()) == (130, "interrupted"), child.stderr[-2000:]


def test_worker_processes_are_spawned_not_forked(tmp_path, monkeypatch):
    """--jobs N: a child forked after CUDA is initialised cannot use CUDA, so the pool spawns."""
    class Pool(Exception):
        pass

    def pool(jobs, mp_context=None):
        raise Pool(mp_context.get_start_method() if mp_context is not None else "default")
    monkeypatch.setattr(grid_mod.cf, "ProcessPoolExecutor", pool)
    with pytest.raises(Pool, match="^spawn$"):
        _grid(tmp_path / "g", jobs=2, pack=1).run()


@pytest.mark.slow
def test_a_spawned_worker_pool_runs_the_grid(tmp_path):
    g = _grid(tmp_path / "g", jobs=2, pack=1, methods="random")
    g.run()
    assert g.done()


@pytest.mark.parametrize("argv, message", [
    (["--shard", "3/2"], "--shard"), (["--shard", "0/0"], "--shard"), (["--shard", "a/b"], "--shard"),
    (["--shard", "1"], "--shard"), (["--pack", "0"], "--pack"), (["--pack", "many"], "--pack"),
    (["--pack", "4", "--jobs", "2"], "pack"),
    (["--export-every-minutes", "1"], "--export-every-minutes"),  # rewrites --export-state's bundle
    (["--export-every-minutes", "0", "--export-state", "s.zip"], "--export-every-minutes"),
    (["--export-every-minutes", "1", "--export-state", "s.zip", "--jobs", "2"], "--export-every-minutes"),
    (["--time-budget", "0", "--pack", "4"], "--time-budget"),
    (["--import-state", "/nonexistent/state.zip"], "--import-state"),
])
def test_bad_reproduce_flags(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--out", str(tmp_path / "g"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "g").exists()


def test_bundle_rederives_random_and_mcwt_without_connectivity(packed, tmp_path):
    manifest = export_state(packed.out, tmp_path / "state.zip")
    derived = {Path(e["path"]).parent.name: e["derived"]["kind"] for e in manifest["masks"] if "derived" in e}
    assert derived == {"random": "random", "mcwt_magnitude": "mcwt_magnitude"}
    assert sum("derived" in e for e in manifest["masks"]) == 4  # both seeds
    import_state(tmp_path / "state.zip", tmp_path / "b")
    for s in (0, 1):
        for kind in ("random", "mcwt_magnitude", "mcwt_connectivity"):
            a = RunDir(packed.out / "conv2" / f"seed_{s}" / kind).load_tensors(RunDir.MASKS)
            b = RunDir(tmp_path / "b" / "conv2" / f"seed_{s}" / kind).load_tensors(RunDir.MASKS)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
