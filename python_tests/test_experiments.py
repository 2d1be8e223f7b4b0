"""The reproduce grid: a complete table from a tiny grid, resume, table round trip, costs, figures,
CLI errors."""
import csv
import json
import math
import statistics

import pytest
import torch

from mcwt_ext.cli import main
from mcwt_ext.experiments import (CELLS, METHODS, METRICS, Grid, collect, cost_rows, grid as grid_mod,
                                  method_run, read_table_csv, report)
from mcwt_ext.runs import RunDir, grid_cell

SETTINGS = dict(dataset="synthetic", iterations=4, progress=False)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    g = Grid(archs=["conv2"], seeds=[0, 1], out=tmp_path_factory.mktemp("grid"), **SETTINGS)
    g.run()
    report(g)
    return g


def test_tiny_grid_makes_a_complete_table(grid):
    rows = collect(grid)
    assert grid.methods == [k for k, m in METHODS.items() if m.group == "paper"]  # the default
    assert len(rows) == len(METRICS) * len(grid.methods)
    assert all(r["n"] == 2 and 0 <= r["mean"] <= 100 and not math.isnan(r["std"]) for r in rows)
    text, against_wt = (grid.out / "table.md").read_text().split("### Against the winning ticket")
    for key in grid.methods:
        assert f"| conv2 | {METHODS[key].label} |" in against_wt
        assert text.count(f"| {METHODS[key].label} |") == len(METRICS)
    assert "67.20" in text  # the paper's number beside ours
    # each row is the mean over seeds of its training run's summary
    for r in rows:
        vals = [100 * method_run(grid.out, "conv2", s, r["method"]).load_json("summary.json")[r["metric"]]
                for s in grid.seeds]
        assert r["mean"] == pytest.approx(statistics.fmean(vals))


def test_dense_and_wt_rows_are_imp_rounds(grid):
    imp = grid_cell(grid.out, "conv2", 0, "imp")
    last = imp.load_json("summary.json")["rounds"][-1]["round"]
    assert method_run(grid.out, "conv2", 0, "dense").path == imp.path / "round_00"
    assert method_run(grid.out, "conv2", 0, "wt").path == imp.path / f"round_{last:02d}"
    assert last == 2  # reduced protocol: 60% of the remaining weights per round, 80% in two rounds


def test_pruned_cells_share_init_and_sparsity(grid):
    base = RunDir(grid.out / "conv2" / "seed_0")
    init = base.subdir("imp").load_tensors(RunDir.INIT)
    for cell in ("random", "mcwt_magnitude", "mcwt_connectivity"):
        other = base.subdir(cell).load_tensors(RunDir.INIT)
        assert all(torch.equal(init[k], other[k]) for k in init)
    wt = base.subdir("imp").load_tensors(RunDir.MASKS)
    rnd = base.subdir("random").load_tensors(RunDir.MASKS)
    assert all(int(wt[k].sum()) == int(rnd[k].sum()) for k in wt)


def test_costs_add_up(grid):
    rows = {r["method"]: r for r in cost_rows(grid)}
    imp = rows["IMP (all rounds before the ticket)"]
    walls = [sum(grid_cell(grid.out, "conv2", s, "imp").round(r).load_json("summary.json")["wall_time_s"]
                 for r in range(2)) for s in grid.seeds]
    assert imp["train_iterations"] == 2 * 4 and imp["wall_time_s"] == pytest.approx(statistics.fmean(walls))
    fit = statistics.fmean(grid_cell(grid.out, "conv2", s, "fit").load_json("summary.json")["wall_time_s"]
                           for s in grid.seeds)
    for key in ("mcwt_magnitude", "mcwt_connectivity"):
        label = METHODS[key].label
        sample = statistics.fmean(grid_cell(grid.out, "conv2", s, key).load_json("sample.json")["wall_time_s"]
                                  for s in grid.seeds)
        alone, total = rows[f"{label}: sampling"], rows[f"{label}: fit + sampling"]
        assert alone["wall_time_s"] == pytest.approx(sample) and alone["train_iterations"] == 0
        assert total["wall_time_s"] == pytest.approx(fit + sample)
        assert total["ratio_to_imp"] == pytest.approx((fit + sample) / imp["wall_time_s"])
    with open(grid.out / "cost.csv", newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["method"] for r in back] == list(rows)
    assert [float(r["wall_time_s"]) for r in back] == pytest.approx([r["wall_time_s"] for r in rows.values()])


def test_figures_hold_the_runs_numbers(grid):
    fig_dir = grid.out / "figures" / "conv2"
    curves = json.loads((fig_dir / "val_accuracy.json").read_text())
    assert set(curves) == {METHODS[k].label for k in grid.methods}
    for key in grid.methods:
        m = METHODS[key]
        history = method_run(grid.out, "conv2", 0, key).load_csv("metrics.csv")
        assert curves[m.label]["iteration"] == [int(r["iteration"]) for r in history]
        assert curves[m.label]["val_acc"] == [float(r["val_acc"]) for r in history]
    fig2b = json.loads((fig_dir / "fig2b_connectivity.json").read_text())
    assert all(set(per) == {"WT", "MCWT", "random"} for per in fig2b["histograms"].values())
    for name in ("fig1_initial_weights", "fig2b_connectivity", "val_accuracy"):
        assert (fig_dir / f"{name}.png").stat().st_size > 1000


def test_resume_skips_finished_cells(grid, monkeypatch):
    calls = []
    monkeypatch.setattr(grid_mod, "run_cell", lambda cell: calls.append(cell) or cell.key)
    Grid(archs=["conv2"], seeds=[0, 1], out=grid.out, **SETTINGS).run()
    assert calls == []
    # A grid with a new seed runs only that seed's cells, each after the cells it needs.
    Grid(archs=["conv2"], seeds=[0, 1, 2], out=grid.out, **SETTINGS).run()
    assert [c.kind for c in calls] == [k for k in CELLS if k in {c.kind for c in grid.cells}]
    assert {c.seed for c in calls} == {2}


def test_other_settings_are_refused(grid):
    with pytest.raises(ValueError, match="iterations_override 4 there, 5 now"):
        Grid(archs=["conv2"], seeds=[0], out=grid.out, **{**SETTINGS, "iterations": 5}).run()


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
    assert not (tmp_path / "g").exists()  # nothing made before the arguments are checked


def test_table_std_is_the_sample_standard_deviation_over_seeds_exactly(monkeypatch):
    """Three seeds of 60, 62 and 67 %: std sqrt(((-3)^2 + (-1)^2 + 4^2) / 2) = sqrt(13) (the
    population formula would give sqrt(26/3)); the paired difference to the WT is seed by seed."""
    import math
    import sys
    from types import SimpleNamespace

    report = sys.modules["mcwt_ext.experiments.report"]  # the package exports a function of that name

    values = {"wt": {0: 60.0, 1: 62.0, 2: 67.0}, "random": {0: 50.0, 1: 51.0, 2: 55.0}}
    monkeypatch.setattr(report, "_per_seed", lambda grid, arch, method, metric: values[method])
    rows = report.collect(SimpleNamespace(methods=["wt", "random"], archs=["conv2"]))
    wt = next(r for r in rows if r["method"] == "wt")
    assert wt["n"] == 3 and wt["mean"] == 63.0 and wt["std"] == math.sqrt(13.0)
    rnd = next(r for r in rows if r["method"] == "random")  # differences -10, -11, -12
    assert rnd["diff_mean"] == -11.0 and rnd["diff_n"] == 3
    assert report._mean_std([60.0, 62.0, 67.0]) == (63.0, math.sqrt(13.0))
