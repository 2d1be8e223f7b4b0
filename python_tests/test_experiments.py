"""The reproduce grid: a complete table from a tiny grid, resume, table round trip, CLI errors."""
import math

import pytest

from mcwt_ext import experiments
from mcwt_ext.cli import main
from mcwt_ext.experiments import METHODS, METRICS, Grid, collect, read_table_csv, report


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    g = Grid(["conv2"], [0, 1], "synthetic", tmp_path_factory.mktemp("grid"), iterations=4,
             progress=False)
    g.run()
    report(g)
    return g


def test_tiny_grid_makes_a_complete_table(grid):
    rows = collect(grid)
    assert len(rows) == len(METRICS) * len(METHODS)
    assert all(r["n"] == 2 and 0 <= r["mean"] <= 100 and not math.isnan(r["std"]) for r in rows)
    text = (grid.out / "table.md").read_text()
    for label in METHODS.values():
        assert text.count(label) == len(METRICS)
    assert "67.20" in text  # the paper's number beside ours
    cost = (grid.out / "cost.md").read_text()
    assert "MCWT with connectivity: fit + sampling" in cost
    for name in ("fig1_initial_weights", "fig2b_connectivity", "val_accuracy"):
        assert (grid.out / "figures" / "conv2" / f"{name}.png").stat().st_size > 1000
        assert (grid.out / "figures" / "conv2" / f"{name}.json").exists()


def test_pruned_cells_share_init_and_sparsity(grid):
    from mcwt_ext.runs import RunDir
    import torch

    base = RunDir(grid.out / "conv2" / "seed_0")
    init = base.subdir("imp").load_tensors(RunDir.INIT)
    for cell in ("random", "mcwt_magnitude", "mcwt_connectivity"):
        other = base.subdir(cell).load_tensors(RunDir.INIT)
        assert all(torch.equal(init[k], other[k]) for k in init)
    wt = base.subdir("imp").load_tensors(RunDir.MASKS)
    rnd = base.subdir("random").load_tensors(RunDir.MASKS)
    assert all(int(wt[k].sum()) == int(rnd[k].sum()) for k in wt)


def test_resume_skips_finished_cells(grid, monkeypatch):
    calls = []
    monkeypatch.setattr(experiments, "run_cell", lambda cell: calls.append(cell) or cell.key)
    Grid(["conv2"], [0, 1], "synthetic", grid.out, iterations=4, progress=False).run()
    assert calls == []
    # A grid with a new seed runs only that seed's cells.
    Grid(["conv2"], [0, 1, 2], "synthetic", grid.out, iterations=4, progress=False).run()
    assert sorted(c.kind for c in calls) == sorted(experiments.CELLS)
    assert {c.seed for c in calls} == {2}


def test_other_settings_are_refused(grid):
    with pytest.raises(ValueError, match="other settings"):
        Grid(["conv2"], [0], "synthetic", grid.out, iterations=5, progress=False).run()


def test_table_csv_round_trips(grid):
    rows = collect(grid)
    back = read_table_csv(grid.out / "table.csv")
    assert len(back) == len(rows)
    for a, b in zip(rows, back):
        assert (a["metric"], a["method"], a["arch"], a["n"], a["paper"]) == \
               (b["metric"], b["method"], b["arch"], b["n"], b["paper"])
        assert a["mean"] == pytest.approx(b["mean"], abs=1e-4)
        assert a["std"] == pytest.approx(b["std"], abs=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["--arch", "conv3"], "architectures"),
    (["--dataset", "mnist"], "invalid choice"),
    (["--dataset", "cifar10"], "--data-root"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent/dir"], "cifar-10-batches-py"),
    (["--seeds", "0"], "below 1"),
])
def test_cli_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--out", str(tmp_path / "g"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
