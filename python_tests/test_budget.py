"""The reproduce grid's time budget (issue 18 item 9): which pack fits in the time left."""
import json
import time
from pathlib import Path

import pytest

from mcwt_ext.experiments import Grid
from mcwt_ext.experiments.budget import Budget, BudgetSpent, Candidate, arch_macs, forward_macs
from mcwt_ext.models import build_model

SHAPE = (3, 10, 32)  # CIFAR-10


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _cand(arch, nets, iterations=1000, checkpoint_every=0):
    return Candidate(arch, "cuda", iterations, checkpoint_every, nets, SHAPE)


def test_without_a_deadline_the_first_group_trains_as_before():
    budget = Budget()
    assert budget.pick([_cand("conv6", 6), _cand("conv2", 3)], None) == (0, 6)
    assert budget.pick([_cand("conv6", 6)], 4) == (0, 4)  # the pack size still caps it


def test_conv2_first_then_the_longest_pack_that_fits():
    clock = Clock()
    budget = Budget(100, clock)
    budget.observe("conv2", "cuda", 2, 1000, 20.0)   # 0.02 s per iteration for 2 nets
    budget.observe("conv6", "cuda", 1, 1000, 30.0)   # 0.03 s per iteration for 1 net
    cands = [_cand("conv2", 3), _cand("conv6", 6)]
    assert budget.pick(cands, None) == (0, 3)        # conv2: 3 nets <= 0.02 * 3/2 * 1000 = 30 s
    clock.now += 75                                  # 25 s left: conv2's 30 s no longer fits
    assert budget.pick(cands, None) == (0, 2)        # 2 nets: 20 s
    clock.now += 6                                   # 19 s left
    with pytest.raises(BudgetSpent, match="19 s left"):
        budget.pick(cands, None)                     # conv6's bound is 30 s for any pack
    budget = Budget(70, clock)
    budget.observe("conv6", "cuda", 1, 1000, 30.0)
    assert budget.pick([_cand("conv6", 6)], None) == (0, 2)  # 2 nets <= 60 s; 3 would take 90


def test_a_pack_that_can_only_checkpoint_comes_after_any_that_finishes():
    clock = Clock()
    budget = Budget(50, clock)
    budget.observe("conv2", "cuda", 1, 100, 10.0)    # 0.1 s per iteration
    budget.observe("conv4", "cuda", 1, 100, 10.0)
    cands = [_cand("conv2", 1, iterations=1000, checkpoint_every=200), _cand("conv4", 1, iterations=400)]
    assert budget.pick(cands, None) == (1, 1)        # conv4 finishes in 40 s; conv2 would not
    clock.now += 15                                  # 35 s: conv4 no longer finishes
    assert budget.pick(cands, None) == (0, 1)        # conv2 reaches its checkpoint (20 s)
    clock.now += 20                                  # 15 s: nothing finishes or checkpoints
    with pytest.raises(BudgetSpent):
        budget.pick(cands, None)


def test_an_unmeasured_architecture_borrows_a_measured_rate_scaled_by_its_macs():
    budget = Budget(1e9)
    budget.observe("conv2", "cuda", 3, 100, 3.0)
    ratio = arch_macs("conv6", *SHAPE) / arch_macs("conv2", *SHAPE)
    assert ratio > 1
    assert budget.seconds(_cand("conv6", 3), 3, 100) == pytest.approx(3.0 * ratio)
    assert budget.seconds(_cand("conv6", 3), 6, 100) == pytest.approx(6.0 * ratio)
    cpu = Candidate("conv6", "cpu", 100, 0, 3, SHAPE)
    assert budget.seconds(cpu, 3, 100) is None       # another device type: nothing known
    spent = Budget(0)
    with pytest.raises(BudgetSpent):                 # no time at all: not even an unknown pack
        spent.pick([cpu], None)
    assert Budget(1).pick([cpu], None) == (0, 3)     # unknown, time left: try it (and measure)


def test_forward_macs_counts_conv_and_linear_layers():
    model = build_model("conv2", 1, 10, 8)
    # conv2 on 8x8: 64 3x3 kernels over 1 channel, then 64 over 64 (8x8 outputs each, padding 1),
    # a 2x2 pool, then 1024 -> 256 -> 256 -> 10.
    expected = 64 * 8 * 8 * 9 + 64 * 8 * 8 * 64 * 9 + 1024 * 256 + 256 * 256 + 256 * 10
    assert forward_macs(model, __import__("torch").zeros(1, 1, 8, 8)) == expected


def test_rates_are_learned_from_the_lockstep_summaries_in_the_grid(tmp_path):
    def summary(rel, **extra):
        path = tmp_path / rel / "summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(iterations=100, **extra)))
    pack = dict(pack_size=4, pack_wall_time_s=8.0, device="cuda:0")
    summary("conv2/seed_0/imp/round_00", lockstep=pack)
    summary("conv2/seed_1/random", lockstep=dict(pack, pack_wall_time_s=6.0))
    summary("conv2/seed_0/imp")                      # IMP's own summary: no pack
    summary("conv4/seed_0/fit", models=[])
    budget = Budget()
    budget.learn(tmp_path)
    assert budget.rates == {("conv2", "cuda"): {4: 0.08}}  # the slower of the two packs of 4


# ---- in the grid ---------------------------------------------------------------------------------

def _record_packs(monkeypatch, root):
    """The packs the grid under ``root`` trains, in order: each a list of run paths under it."""
    import mcwt_ext.lockstep as lockstep_mod

    real, packs = lockstep_mod.train_pack, []

    def recording(nets, *a, **kw):
        packs.append([Path(getattr(n.run_dir, "path", n.run_dir)).resolve().relative_to(root.resolve()).as_posix()
                      for n in nets])
        return real(nets, *a, **kw)
    monkeypatch.setattr(lockstep_mod, "train_pack", recording)
    return packs


TINY = dict(dataset="synthetic", iterations=6, eval_every=3, progress=False, methods="random")  # imp, random


def test_a_pack_releases_its_cells_at_once_conv2_first(tmp_path, monkeypatch):
    """conv2's round-0 pack ends, and its IMP prunes and trains round 1 before conv4's round 0
    (cells were released only after every pack of a batch: conv4's round 0 came second)."""
    packs = _record_packs(monkeypatch, tmp_path / "g")
    Grid(archs=["conv2", "conv4"], seeds=[0], out=tmp_path / "g", pack=8, **TINY).run()
    flat = [(i, p) for i, pack in enumerate(packs) for p in pack]
    first = {p: i for i, p in reversed(flat)}
    assert packs[0] == ["conv2/seed_0/imp/round_00", "conv2/seed_0/random"]
    assert first["conv2/seed_0/imp/round_01"] < first["conv4/seed_0/imp/round_00"]
    assert all(len({p.split("/")[0] for p in pack}) == 1 for pack in packs)  # one architecture each


def test_the_budget_stops_the_grid_between_packs_and_a_rerun_redoes_nothing(tmp_path, monkeypatch):
    """Every pack takes 60 s of a fake clock (the grid's timer too): the first pack (not measured
    yet) is tried with 100 s left; the next, measured at 60 s, does not fit the 40 s left."""
    import types

    import mcwt_ext.experiments.packer as packer_mod
    import mcwt_ext.lockstep as lockstep_mod

    clock, out = Clock(), tmp_path / "g"
    packs = _record_packs(monkeypatch, out)
    recording = lockstep_mod.train_pack

    def slow(nets, *a, **kw):
        clock.now += 60
        return recording(nets, *a, **kw)
    monkeypatch.setattr(lockstep_mod, "train_pack", slow)
    monkeypatch.setattr(packer_mod, "time", types.SimpleNamespace(perf_counter=clock, time=time.time, sleep=time.sleep))
    grid = Grid(archs=["conv2"], seeds=[0, 1], out=out, pack=8, budget=Budget(100, clock), **TINY)
    with pytest.raises(BudgetSpent, match="40 s left"):
        grid.run()
    assert len(packs) == 1 and not grid.done()
    r0 = out / "conv2" / "seed_0" / "imp" / "round_00" / "summary.json"
    before = r0.read_text()
    Grid(archs=["conv2"], seeds=[0, 1], out=out, pack=8, **TINY).run()  # no budget: finishes
    assert r0.read_text() == before and all(c.done() for c in grid.cells)
    assert all("round_00" not in p for pack in packs[1:] for p in pack)


def test_reproduce_time_budget_is_a_planned_stop_that_exports(tmp_path, monkeypatch, capsys):
    from mcwt_ext.cli import main
    from mcwt_ext.experiments import budget as budget_mod

    calls = []

    def left(self):  # time for the first pack, none after it
        calls.append(1)
        return 1e9 if len(calls) == 1 else -1.0
    monkeypatch.setattr(budget_mod.Budget, "left", left)
    code = main(["reproduce", "--dataset", "synthetic", "--iterations", "6", "--eval-every", "3", "--pack", "4",
                 "--time-budget", "60", "--no-progress", "--out", str(tmp_path / "g"),
                 "--export-state", str(tmp_path / "state.zip")])
    err = capsys.readouterr().err
    assert code == 0 and "time budget spent" in err and "8 cells left" in err  # the random cells are done
    assert (tmp_path / "state.zip").is_file() and not (tmp_path / "g" / "table.md").exists()
