"""`reproduce --methods`: the paper's rows by default; `all` adds issue 12's rows, each with its gap
to the WT, its overlap with the WT mask and its construction cost, and the accuracy-vs-cost figure."""
import csv
import json
import math
import statistics

import pytest
import torch

from mcwt_ext.cli import main
from mcwt_ext.experiments import METHODS, Grid, report
from mcwt_ext.experiments.methods import cells_for, select_methods
from mcwt_ext.runs import FIGURE_FILES, GRID_FILES, RunDir, grid_cell


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_paper_is_the_default_and_has_the_five_rows(tmp_path):
    g = Grid(archs=["conv2"], seeds=[0, 1], dataset="synthetic", out=tmp_path)
    assert g.methods == ["dense", "random", "wt", "mcwt_magnitude", "mcwt_connectivity"]
    assert {c.kind for c in g.cells} == {"imp", "random", "fit", "mcwt_magnitude", "mcwt_connectivity"}


def test_method_lists():
    assert select_methods("all") == list(METHODS)
    assert select_methods("prune_snip") == ["wt", "prune_snip"]  # the WT is every row's reference
    assert cells_for(["mcwt_transfer"]) == ["imp", "fit", "mcwt_transfer"]
    with pytest.raises(ValueError, match="methods"):
        select_methods("nope")


def test_transfer_needs_seed_0(tmp_path):
    with pytest.raises(ValueError, match="seed 0"):
        Grid(archs=["conv2"], seeds=[1, 2], dataset="synthetic", out=tmp_path, methods="mcwt_transfer")


def test_cli_refuses_unknown_methods(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--methods", "wt,nope", "--out", str(tmp_path / "g")])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err


def test_mcwt_cells_sample_on_the_grids_device(tmp_path, monkeypatch):
    """The MCWT cell moves its model to the grid's device before sampling (it sampled on the CPU
    beside a GPU, issue 18): "meta" stands for a device other than the CPU here."""
    from mcwt_ext import sample as sample_mod
    from mcwt_ext.experiments import CellSettings
    from mcwt_ext.experiments.grid import Cell
    from mcwt_ext.experiments.methods import _run_mcwt_cell
    from mcwt_ext.experiments.protocol import PROTOCOLS

    class Sampled(Exception):
        pass

    def spy(model, *args, **kwargs):
        raise Sampled(next(model.parameters()).device.type)
    monkeypatch.setattr(sample_mod, "sample_ticket", spy)
    settings = CellSettings("synthetic", None, PROTOCOLS["reduced"], str(tmp_path), device="meta")
    with pytest.raises(Sampled, match="meta"):
        _run_mcwt_cell(Cell("mcwt_connectivity", "conv2", 0, settings), True)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    from mcwt_ext.experiments import methods

    g = Grid(archs=["conv2"], seeds=[0, 1], dataset="synthetic", iterations=4, eval_every=2,
             out=tmp_path_factory.mktemp("all"), progress=False, methods="all")
    with pytest.MonkeyPatch.context() as m:  # 4 iterations: the dst rows update their masks twice
        m.setitem(methods.DST_SETTINGS, "update_every", 1)
        g.run()
    report(g)
    return g


@pytest.mark.slow
def test_all_gives_every_row(grid):
    rows = {r["method"]: r for r in _csv(grid.out / GRID_FILES["methods_csv"])}
    assert list(rows) == list(METHODS)
    for key, r in rows.items():
        assert int(r["n"]) == (1 if key == "mcwt_transfer" else 2), key  # no transfer cell at seed 0
        assert not math.isnan(float(r["val_acc_mean"])) and not math.isnan(float(r["gap_to_wt"]))
    assert float(rows["wt"]["overlap_mean"]) == 1.0 and float(rows["wt"]["gap_to_wt"]) == 0.0
    for key in ("ablate_reinit", "ablate_shuffle_values"):  # the WT's mask itself
        assert float(rows[key]["overlap_mean"]) == 1.0
    assert float(rows["ablate_shuffle_mask"]["overlap_mean"]) < 0.5
    table = (grid.out / GRID_FILES["table_md"]).read_text()
    assert all(m.label in table for m in METHODS.values()) and "Gap to WT" in table


@pytest.mark.slow
def test_overlap_csv_has_every_layer(grid):
    rows = _csv(grid.out / GRID_FILES["overlap_csv"])
    wt = [r for r in rows if r["method"] == "wt"]
    assert len(wt) == 2 * 5 and all(float(r["overlap"]) == 1.0 for r in wt)
    assert {r["method"] for r in rows} == set(METHODS) - {"dense"}
    assert math.isnan(float({r["method"]: r for r in _csv(grid.out / GRID_FILES["methods_csv"])}["dense"]["overlap_mean"]))


@pytest.mark.slow
def test_dst_rows_are_compared_by_the_masks_they_end_with(grid):
    """RigL, SET and RigL from the MCWT sample: the masks changed while training at the start's
    per-layer counts; the overlap with the WT is that of the final masks; the cost table counts
    one training."""
    from mcwt_ext.experiments.report import method_masks

    for key in ("rigl", "set", "rigl_mcwt", "rigl_erk"):
        for seed in (0, 1):
            rd = grid_cell(grid.out, "conv2", seed, METHODS[key].cell)
            start, final = rd.load_tensors(RunDir.MASKS), rd.load_tensors(RunDir.FINAL_MASKS)
            assert any(not torch.equal(start[n], final[n]) for n in start), key
            assert {n: int(m.sum()) for n, m in final.items()} == {n: int(m.sum()) for n, m in start.items()}
            ended = method_masks(grid.out, "conv2", seed, key)
            assert all(torch.equal(ended[n], final[n]) for n in final)
            assert rd.load_json(RunDir.CONFIG)["dst"]["update_every"] == 1
    mcwt = grid_cell(grid.out, "conv2", 0, "mcwt_connectivity").load_tensors(RunDir.MASKS)
    start = grid_cell(grid.out, "conv2", 0, "rigl_mcwt").load_tensors(RunDir.MASKS)
    assert all(torch.equal(mcwt[n], start[n]) for n in mcwt)
    costs = {r["method"]: r for r in _csv(grid.out / GRID_FILES["cost_csv"])}
    for key in ("rigl", "set", "rigl_mcwt", "rigl_erk"):
        assert float(costs[METHODS[key].label]["train_iterations"]) == 4
    assert float(costs[METHODS["rigl_mcwt"].label]["wall_time_s"]) > \
        float(costs["MCWT with connectivity: fit + sampling"]["wall_time_s"])


@pytest.mark.slow
def test_erk_rows_start_from_the_erk_counts(grid):
    """random (ERK) and RigL (ERK): the first conv whole, and in all the same total as the uniform
    random cell (issue 28: the first layer counted), spread otherwise (on these tiny inputs ERK
    also keeps a small layer whole); ERK's control keeps ERK's whole layers whole and the same
    total; the header names the whole layers."""
    from mcwt_ext.distribution import ERK_TOTAL

    for seed in (0, 1):
        uniform = grid_cell(grid.out, "conv2", seed, "random").load_tensors(RunDir.MASKS)
        kept = lambda masks: [int(masks[n].sum()) for n in masks]  # noqa: E731
        whole = lambda masks: [n for n, m in masks.items() if bool(m.all())]  # noqa: E731
        for cell in ("random_erk", "rigl_erk", "random_erk_dense"):
            rd = grid_cell(grid.out, "conv2", seed, cell)
            erk = rd.load_tensors(RunDir.MASKS)
            first = next(n for n, m in erk.items() if m.dim() == 4 and m.shape[1] == 3)  # 3 image channels
            assert bool(erk[first].all()) and not bool(uniform[first].all()), cell
            assert sum(kept(erk)) == sum(kept(uniform)) and kept(erk) != kept(uniform), cell
            config = rd.load_json(RunDir.CONFIG)
            assert (config["distribution"], config["erk_total"]) == (METHODS[cell].distribution, ERK_TOTAL)
        random_erk, control = (grid_cell(grid.out, "conv2", seed, c).load_tensors(RunDir.MASKS)
                               for c in ("random_erk", "random_erk_dense"))
        assert whole(control) == whole(random_erk) and kept(control) != kept(random_erk)
        assert "distribution" not in grid_cell(grid.out, "conv2", seed, "random").load_json(RunDir.CONFIG)
    table = (grid.out / GRID_FILES["table_md"]).read_text()
    header = table.split("### ")[0]
    assert "- conv2, uniform rows (every other pruned row): dense layers: none;" in header
    assert f"- conv2, ERK rows ({METHODS['random_erk'].label}, {METHODS['rigl_erk'].label}): dense layers: " \
           "conv1 `0.weight` (first layer)" in header
    assert "- conv2, ERK's control" in header
    layers = _csv(grid.out / GRID_FILES["layers_csv"])
    assert {r["distribution"] for r in layers} == {"uniform", "erk", "uniform-erk-dense"}


@pytest.mark.slow
def test_transfer_samples_from_seed_0s_fit(grid):
    cell = grid_cell(grid.out, "conv2", 1, "mcwt_transfer")
    config = cell.load_json(RunDir.CONFIG)
    assert config["fit_seed"] == 0 and config["seed"] == 1
    assert not grid_cell(grid.out, "conv2", 0, "mcwt_transfer").path.exists()
    ablation = grid_cell(grid.out, "conv2", 1, "ablate_reinit").load_json(RunDir.CONFIG)
    assert ablation["ablation_seed"] == 10_001


@pytest.mark.slow
def test_cost_figure_matches_the_tables(grid):
    numbers = json.loads((grid.out / GRID_FILES["figures"] / "conv2" / FIGURE_FILES["cost"])
                         .with_suffix(".json").read_text())["points"]
    assert (grid.out / GRID_FILES["figures"] / "conv2" / FIGURE_FILES["cost"]).stat().st_size > 1000
    methods = {r["label"]: r for r in _csv(grid.out / GRID_FILES["methods_csv"])}
    costs = {r["method"]: float(r["wall_time_s"]) for r in _csv(grid.out / GRID_FILES["cost_csv"])}
    assert set(numbers) == {m.label for k, m in METHODS.items() if k != "dense"}
    for label, p in numbers.items():
        assert p["cost_s"] == pytest.approx(float(methods[label]["cost_s_mean"]))
        assert p["val_acc"] == pytest.approx(float(methods[label]["val_acc_mean"]))
        if METHODS[p["method"]].group != "paper":
            assert p["cost_s"] == pytest.approx(costs[label])
    assert numbers[METHODS["wt"].label]["cost_s"] == pytest.approx(costs["IMP (all rounds before the ticket)"])
    assert numbers[METHODS["mcwt_connectivity"].label]["cost_s"] == pytest.approx(
        costs["MCWT with connectivity: fit + sampling"])


@pytest.mark.slow
def test_paired_gaps_and_dead_units_in_every_table(grid):
    """methods.csv's gap is the mean of the per-seed differences to the WT, with its interval;
    table.md gives it for every metric; dead-unit shares are in methods.csv and overlap.csv."""
    from mcwt_ext.compare import total_dead
    from mcwt_ext.experiments.report import _summary, method_masks
    from mcwt_ext.experiments.stats import paired_difference

    rows = {r["method"]: r for r in _csv(grid.out / GRID_FILES["methods_csv"])}
    acc = {m: {s: 100 * x["val_acc_early_stop"] for s in (0, 1)
               if (x := _summary(grid.out, "conv2", s, m)) is not None} for m in METHODS}
    for key, r in rows.items():
        p = paired_difference(acc[key], acc["wt"])
        assert (int(r["gap_n"]), float(r["gap_to_wt"])) == (p.n, pytest.approx(p.mean, abs=1e-9))
        assert math.isnan(float(r["gap_low"]))  # at most 2 seeds here: no interval below 3
        seeds = [float(d) for d in r["gap_seeds"].split(";") if d]  # the per-seed differences instead
        assert seeds == pytest.approx(list(p.diffs), abs=1e-4) and len(seeds) == (1 if key == "mcwt_transfer" else 2)
        masks = method_masks(grid.out, "conv2", 1, key)  # (seed 1: the transfer row has no seed 0)
        if masks is None:
            assert math.isnan(float(r["dead_out_mean"]))
        else:
            assert 0.0 <= float(r["dead_out_mean"]) <= 1.0 and 0.0 <= float(r["dead_in_mean"]) <= 1.0
    assert float(rows["dense"]["gap_to_wt"]) == pytest.approx(
        statistics.fmean(acc["dense"][s] - acc["wt"][s] for s in (0, 1)), abs=1e-9)
    for key in ("random", "prune_synflow"):
        dead = [total_dead(method_masks(grid.out, "conv2", s, key)) for s in (0, 1)]
        assert float(rows[key]["dead_out_mean"]) == pytest.approx(statistics.fmean(d[0] for d in dead), abs=1e-12)
        assert float(rows[key]["dead_in_mean"]) == pytest.approx(statistics.fmean(d[1] for d in dead), abs=1e-12)
    layers = _csv(grid.out / GRID_FILES["overlap_csv"])
    assert all(0.0 <= float(r["dead_out"]) <= 1.0 and 0.0 <= float(r["dead_in"]) <= 1.0 for r in layers)
    table = (grid.out / GRID_FILES["table_md"]).read_text()
    assert table.count("paired diff. to WT, 95% CI") == 4  # every metric's table
    assert "Gap to WT, paired" in table and "Dead units (out / in)" in table
