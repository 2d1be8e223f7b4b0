"""Dynamic sparse training (mcwt_ext.dst): the update rule against google-research/rigl's, exact
per-layer counts after every update, fresh moments for grown weights, seeded SET growth and
bit-identical resume after a kill."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DEVICES, synthetic_model
from mcwt_ext.dst import DstConfig, MaskSchedule, drop_and_grow, drop_fraction, random_start, train_dst
from mcwt_ext.runs import RunDir
from mcwt_ext.train import TrainConfig, train
from test_train import _same_weights, kill_then_resume


# --- the reference, transcribed ------------------------------------------------------------------

def _top_k_indices(score):
    """TF's ``nn_ops.top_k(score, k=n).indices``: descending, equal values lower index first."""
    return np.argsort(-score, kind="stable")


def _reference_update(mask, weights, score_grow, drop_fraction):
    """google-research/rigl, rigl/sparse_optimizers_base.py, SparseSETOptimizerBase._get_update_op
    (score_drop from SparseRigLOptimizerBase.generic_mask_update: |mask * weights| plus noise of
    std noise_std, here 0; score_grow: |masked gradient| for RigL, uniform noise for SET), in
    numpy float32 as there. Returns the new mask (mask1 + mask2)."""
    mask = mask.astype(np.float32).ravel()
    score_drop = np.abs(mask * weights.astype(np.float32).ravel())
    n_total = score_drop.size
    n_ones = int(mask.sum())
    n_prune = int(np.float32(n_ones) * np.float32(drop_fraction))
    n_keep = n_ones - n_prune
    mask1 = np.zeros(n_total, np.float32)
    mask1[_top_k_indices(score_drop)[:n_keep]] = 1
    score_grow = score_grow.astype(np.float32).ravel()
    lifted = np.where(mask1 == 1, score_grow.min() - 1, score_grow)
    mask2 = np.zeros(n_total, np.float32)
    mask2[_top_k_indices(lifted)[:n_prune]] = 1
    assert (mask1 * mask2).sum() == 0
    return (mask1 + mask2).astype(bool)


def _reference_drop_fraction(step, alpha, end):
    """get_drop_fraction's 'cosine' branch: TF1 learning_rate_decay.cosine_decay(alpha, step,
    decay_steps=end - begin_step), begin_step 0, its own alpha 0."""
    step = min(step, end)
    return alpha * 0.5 * (1 + math.cos(math.pi * step / end))


def _hand_case():
    """Three small layers: an exact tie and a near-tie in |w| at the drop boundary, a kept weight
    dropped and grown back (small |w|, the largest gradient), equal gradients among candidates."""
    w1 = np.array([[0.50, -0.10, 0.30, 0.00], [0.00, 0.25, -0.2500003, 0.70]], np.float32)
    m1 = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], bool)
    g1 = np.array([[0.0, 0.9, 0.1, 0.4], [0.4, 0.0, 0.05, 0.2]], np.float32)  # 0.9: regrows -0.10
    w2 = np.array([0.3, -0.3, 0.3, 0.0, 0.0, 0.0, 0.6, -0.05], np.float32)  # exact ties in |w|
    m2 = np.array([1, 1, 1, 0, 0, 0, 1, 1], bool)
    g2 = np.array([0.0, 0.0, 0.0, 0.2, 0.2, 0.2, 0.0, 0.0], np.float32)     # exact ties in |g|
    w3 = np.arange(1, 19, dtype=np.float32).reshape(2, 3, 3) / 10 * np.where(np.arange(18) % 2, 1, -1).reshape(2, 3, 3)
    m3 = (np.arange(18) % 3 != 0).reshape(2, 3, 3)
    g3 = np.linspace(1, 0, 18, dtype=np.float32).reshape(2, 3, 3)
    return [(m1, w1, g1), (m2, w2, g2), (m3, w3, g3)]


@pytest.mark.parametrize("fraction", [0.3, 0.34, 0.5, 0.15, 0.1])
def test_drop_and_grow_equals_the_reference(fraction):
    """RigL (grow by |gradient|) and SET (grow by uniform scores): the same new masks."""
    rng = np.random.default_rng(0)
    changed = 0
    for mask, w, g in _hand_case():
        for grow in (np.abs(g), rng.uniform(size=g.shape).astype(np.float32)):
            ours = drop_and_grow(torch.from_numpy(mask), torch.from_numpy(w), torch.from_numpy(grow), fraction)
            theirs = _reference_update(mask, w, grow, fraction)
            assert np.array_equal(ours.numpy().ravel(), theirs)
            assert ours.sum() == mask.sum()
            changed += int((ours.numpy() != mask).sum())
    assert changed > 0  # negative control: the case does change masks


def test_drop_and_grow_equals_the_reference_on_many_ties():
    """Random layers whose magnitudes and scores take 4 values (ties everywhere, at every
    boundary), at random fractions: the same masks as the transcription, every time."""
    rng = np.random.default_rng(1)
    for _ in range(300):
        shape = tuple(rng.integers(1, 7, size=rng.integers(1, 4)))
        mask = rng.uniform(size=shape) < rng.uniform(0.1, 0.9)
        w = (rng.integers(1, 5, size=shape) * rng.choice([-1, 1], size=shape) * mask).astype(np.float32)
        g = rng.integers(0, 4, size=shape).astype(np.float32)
        fraction = float(rng.uniform(0, 1))
        ours = drop_and_grow(torch.from_numpy(mask), torch.from_numpy(w), torch.from_numpy(g), fraction)
        assert np.array_equal(ours.numpy().ravel(), _reference_update(mask, w, g, fraction))


def test_hand_case_exercises_ties_and_regrowth():
    """The hand-made case is what it claims: at 0.34 layer 1 drops 2 of its 6, -0.10 (grown back:
    the largest gradient) and 0.25 (the near-tie -0.2500003 stays); of the two candidates with
    gradient 0.4 the lower index grows."""
    mask, w, g = _hand_case()[0]
    new = drop_and_grow(torch.from_numpy(mask), torch.from_numpy(w), torch.from_numpy(np.abs(g)), 0.34)
    assert mask[0, 1] and new[0, 1]
    assert mask[1, 1] and not new[1, 1] and new[1, 2]
    assert new[0, 3] and not new[1, 0]
    assert int(new.sum()) == int(mask.sum())


def test_drop_fraction_is_the_references_cosine():
    for step in (0, 1, 50, 99, 100, 150):
        assert drop_fraction(step, 0.3, 100) == pytest.approx(
            _reference_drop_fraction(step, 0.3, 100) if step < 100 else 0.0, abs=1e-15)
    assert drop_fraction(50, 0.3, 100) == pytest.approx(0.15)
    # global steps g <= end = 18: RigL's from 0 (before the step), SET's from 1 (after it)
    assert DstConfig("rigl", update_every=4, stop_at=0.75).update_steps(24) == [0, 4, 8, 12, 16]
    assert DstConfig("set", update_every=4, stop_at=0.75).update_steps(24) == [1, 5, 9, 13, 17]


@pytest.mark.parametrize("device", DEVICES)
def test_update_is_the_same_on_every_device(device):
    torch.manual_seed(0)
    mask = torch.rand(16, 9) < 0.3
    w, g = torch.randn(16, 9) * mask, torch.randn(16, 9)
    expected = drop_and_grow(mask, w, g.abs(), 0.3)
    got = drop_and_grow(mask.to(device), w.to(device), g.abs().to(device), 0.3)
    assert torch.equal(got.cpu(), expected)


# --- inside training -----------------------------------------------------------------------------

def _cfg(**kw):
    return TrainConfig(**{**dict(iterations=24, lr=1e-2, eval_every=12, checkpoint_every=6), **kw})


def _dst(method, **kw):
    return DstConfig(method, **{**dict(update_every=4, stop_at=0.75), **kw})


class _Checked(MaskSchedule):
    """Checks every update: counts per layer exact, pruned weights zero, grown weights at zero
    with zero moments, a dense gradient seen (nonzero at pruned positions)."""

    def update(self, step):
        before = [m.bool().clone() for m in self.masks]
        dense_grad = any(bool((p.grad[~b] != 0).any()) for p, b in zip(self.params, before))
        super().update(step)
        self.records.append(dict(step=step, dense_grad=dense_grad,
                                 changed=sum(int((m.bool() ^ b).sum()) for m, b in zip(self.masks, before))))
        for p, m, b in zip(self.params, self.masks, before):
            new = m.bool()
            assert int(new.sum()) == int(b.sum())
            assert not bool(p[~new].any())
            grown = new & ~b
            assert not bool(p[grown].any())
            for key in ("exp_avg", "exp_avg_sq"):  # none before the first optimiser step (RigL at 0)
                state = self.optimizer.state.get(p, {})
                assert key not in state or not bool(state[key][grown].any())


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_counts_exact_and_grown_weights_fresh_after_every_update(synthetic, method):
    model = synthetic_model()
    start = random_start(model, 0.2, seed=0)
    hook = _Checked(_dst(method), 24)
    hook.records = []
    train(model, synthetic, start, _cfg(), progress=False, step_hook=hook)
    assert [r["step"] for r in hook.records] == [1, 5, 9, 13, 17]  # RigL: before these steps; SET: after
    assert all(r["changed"] > 0 for r in hook.records)
    if method == "rigl":
        assert all(r["dense_grad"] for r in hook.records)
    final = hook.current()
    for name, mask in start.items():
        assert int(final[name].sum()) == int(mask.sum())
        assert not bool(model.get_parameter(name).detach()[~final[name]].any())
    assert any(not torch.equal(final[n], start[n]) for n in start)


def test_layers_left_dense_stay_dense(synthetic):
    """A per-layer density dict (an allocation) that leaves the output layer out keeps it whole."""
    model = synthetic_model()
    start = random_start(model, {"0.weight": 0.2, "8.weight": 0.3}, seed=0)
    assert set(start) == {"0.weight", "8.weight"}
    _, final = train_dst(model, synthetic, start, _cfg(iterations=12), _dst("rigl"), progress=False)
    assert set(final) == set(start)
    assert [int(final[n].sum()) for n in start] == [int(start[n].sum()) for n in start]


def test_set_growth_is_seeded(synthetic):
    start = random_start(synthetic_model(), 0.2, seed=0)
    runs = [train_dst(synthetic_model(), synthetic, start, _cfg(iterations=12), _dst("set", seed=s),
                      progress=False)[1] for s in (0, 0, 1)]
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in start)
    assert any(not torch.equal(runs[0][n], runs[2][n]) for n in start)


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["rigl", "set"])
def test_resume_after_a_kill_is_bit_identical(synthetic, tmp_path, monkeypatch, method):
    """Killed after the checkpoint at 12 (updates at 0, 4, 8 before it; 12, 16 after; SET one step later), resumed: the
    final weights and masks equal an unkilled run's byte for byte."""
    start = random_start(synthetic_model(), 0.2, seed=0)
    whole = synthetic_model()
    _, expected = train_dst(whole, synthetic, start, _cfg(), _dst(method), tmp_path / "whole", progress=False)
    def killed(rd):
        assert torch.load(rd.file(RunDir.CHECKPOINT), weights_only=True)["iteration"] == 12

    rd = RunDir(tmp_path / "killed")
    resumed, (_, final) = kill_then_resume(
        monkeypatch, 14, lambda m, out: train_dst(m, synthetic, start, _cfg(), _dst(method), out, progress=False),
        rd.path, killed)
    assert _same_weights(whole, resumed)
    assert all(torch.equal(final[n], expected[n]) for n in start)
    assert any(not torch.equal(final[n], start[n]) for n in start)  # the masks did change
    assert rd.file(RunDir.FINAL_MASKS).read_bytes() == \
        RunDir(tmp_path / "whole").file(RunDir.FINAL_MASKS).read_bytes()
    # a finished run is read back with its final masks, not retrained
    again = synthetic_model()
    _, read = train_dst(again, synthetic, start, _cfg(), _dst(method), rd, progress=False)
    assert _same_weights(again, resumed) and all(torch.equal(read[n], final[n]) for n in start)
    with pytest.raises(ValueError, match="alpha"):  # other dst settings are another run
        train_dst(synthetic_model(), synthetic, start, _cfg(), _dst(method, alpha=0.5), rd, progress=False)


@pytest.mark.slow
def test_dst_cells_train_on_their_own_in_packed_grids(tmp_path):
    """With packs the dst cell trains in its own thread (its masks change: no lockstep pack), to
    the same final weights and masks as without packs; the WT's IMP still trains in packs."""
    import mcwt_ext.lockstep as lockstep_mod
    from mcwt_ext.experiments import Grid
    from mcwt_ext.experiments import methods
    from mcwt_ext.runs import grid_cell

    packed = []
    real = lockstep_mod.train_pack

    def spy(nets, *args, **kwargs):
        packed.extend(str(net.run_dir) for net in nets)
        return real(nets, *args, **kwargs)

    grids = {}
    with pytest.MonkeyPatch.context() as m:
        m.setitem(methods.DST_SETTINGS, "update_every", 2)
        m.setattr(lockstep_mod, "train_pack", spy)
        for pack in (1, 2):
            grids[pack] = Grid(archs=["conv2"], seeds=[0], dataset="synthetic", iterations=6, eval_every=3,
                               progress=False, methods="set", pack=pack, out=tmp_path / f"pack{pack}")
            grids[pack].run()
    assert packed and not any(Path(p).name == "set" for p in packed)
    one, two = (grid_cell(grids[p].out, "conv2", 0, "set") for p in (1, 2))
    for name in (RunDir.FINAL, RunDir.FINAL_MASKS):
        assert one.file(name).read_bytes() == two.file(name).read_bytes()


@pytest.mark.slow
def test_readme_block_runs_as_written(tmp_path):
    """docs/cli.md's dynamic sparse training commands, as written: RigL from a random start, then SET
    from the masks RigL ends with (the same counts), not from RigL's start."""
    from readme_blocks import block, explain, run_block, sandbox

    box = sandbox(tmp_path)
    done = run_block(block("mcwt dst"), box, timeout=600)
    assert done.returncode == 0, explain(done)
    rigl, set_ = (RunDir(box / "runs" / name) for name in ("rigl", "set"))
    start, rigl_end = rigl.load_tensors(RunDir.MASKS), rigl.load_tensors(RunDir.FINAL_MASKS)
    assert all(torch.equal(m, rigl_end[n]) for n, m in set_.load_tensors(RunDir.MASKS).items())
    for rd in (rigl, set_):
        final = rd.load_tensors(RunDir.FINAL_MASKS)
        assert {n: int(m.sum()) for n, m in final.items()} == {n: int(m.sum()) for n, m in start.items()}
        assert any(not torch.equal(final[n], start[n]) for n in start)


def test_state_bundle_carries_the_final_masks(tmp_path):
    """export_state/import_state carry final_masks.safetensors bit for bit (a grid resumed
    elsewhere reports a dst row's overlap with the masks it ended with, not its start)."""
    from mcwt_ext.cli import main
    from mcwt_ext.state import export_state, import_state

    run = tmp_path / "grid" / "run"
    assert main(["dst", "--method", "set", "--arch", "conv2", "--dataset", "synthetic", "--iterations", "6",
                 "--eval-every", "3", "--update-every", "2", "--quiet", "--out", str(run)]) == 0
    export_state(tmp_path / "grid", tmp_path / "state.zip")
    import_state(tmp_path / "state.zip", tmp_path / "copy")
    here, there = RunDir(run), RunDir(tmp_path / "copy" / "run")
    final = here.load_tensors(RunDir.FINAL_MASKS)
    assert any(not torch.equal(final[n], m) for n, m in here.load_tensors(RunDir.MASKS).items())
    copied = there.load_tensors(RunDir.FINAL_MASKS)
    assert copied.keys() == final.keys() and all(torch.equal(copied[n], final[n]) for n in final)


def test_erk_distribution_sets_the_start_counts(tmp_path):
    """`mcwt dst --distribution erk` starts from ERK's per-layer counts (the random baseline's
    masks for the same flags) and keeps them through the updates."""
    from mcwt_ext.cli import main

    flags = ["--arch", "conv2", "--dataset", "synthetic", "--iterations", "4", "--eval-every", "2",
             "--distribution", "erk", "--quiet"]
    assert main(["random", *flags, "--no-train", "--out", str(tmp_path / "random")]) == 0
    assert main(["dst", "--method", "rigl", *flags, "--update-every", "1", "--out", str(tmp_path / "dst")]) == 0
    random = RunDir(tmp_path / "random").load_tensors(RunDir.MASKS)
    start, final = (RunDir(tmp_path / "dst").load_tensors(f) for f in (RunDir.MASKS, RunDir.FINAL_MASKS))
    assert all(torch.equal(start[n], random[n]) for n in random)
    assert {n: int(m.sum()) for n, m in final.items()} == {n: int(m.sum()) for n, m in random.items()}
    assert len({round(float(m.float().mean()), 3) for m in random.values()}) > 2  # not uniform


def test_the_grid_updates_every_100_steps_unless_that_makes_fewer_than_5_updates():
    from mcwt_ext.experiments.methods import MIN_DST_UPDATES, dst_update_every

    for iterations in (12, 40, 300, 533, 534, 1_000, 1_500, 20_000, 30_000):
        every = dst_update_every(iterations)
        updates = DstConfig("rigl", update_every=every).update_steps(iterations)
        assert 1 <= every <= 100
        assert len(updates) >= MIN_DST_UPDATES, iterations
        assert every == 100 or len(DstConfig("rigl").update_steps(iterations)) < MIN_DST_UPDATES
    assert dst_update_every(300) == 56 and dst_update_every(20_000) == 100  # 300: end 225, 0-224


def _reference_control(method, total, end, freq):
    """google-research/rigl's control flow, transcribed (sparse_optimizers.py): the global step g
    counts optimiser steps; last_mask_update_step starts at -freq; is_mask_update_iter(g) =
    0 <= g <= end and last + freq <= g. RigL: cond(is_update, mask_update_op, apply_gradient_op),
    so an update iteration takes no optimiser step and leaves g; SET: the optimiser step, then
    cond(is_update, mask_update_op, no_op) on the incremented g. Events: ("update", g, drop
    fraction) and ("step", g) in order, until g == total."""
    g, last, events = 0, -freq, []

    def is_update(step):
        return 0 <= step <= end and last + freq <= step
    while g < total:
        if method == "rigl" and is_update(g):
            events.append(("update", g, _reference_drop_fraction(g, 0.3, end)))
            last = g
            continue
        events.append(("step", g))
        g += 1
        if method == "set" and is_update(g):
            events.append(("update", g, _reference_drop_fraction(g, 0.3, end)))
            last = g
    return events


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_the_control_flow_is_rigls(synthetic, method):
    """The order of optimiser steps and mask updates, and each update's drop fraction, equal the
    transcription of the reference's: RigL's first update at step 0 with the full fraction, and no
    optimiser step on an update iteration (the update's batch then trains the step)."""
    events = []

    class Logged(MaskSchedule):
        def update(self, step):
            g = step - 1 if method == "rigl" else step
            events.append(("update", g, drop_fraction(g, self.config.alpha, self.end)))
            super().update(step)

    model = synthetic_model()
    optimizer_step = torch.optim.Adam.step

    def logged_step(self, *a, **k):
        events.append(("step", sum(e[0] == "step" for e in events)))
        return optimizer_step(self, *a, **k)
    torch.optim.Adam.step = logged_step
    try:
        train(model, synthetic, random_start(model, 0.2, seed=0), _cfg(), progress=False,
              step_hook=Logged(_dst(method), 24))
    finally:
        torch.optim.Adam.step = optimizer_step
    want = _reference_control(method, 24, 18, 4)
    assert [e[:2] for e in events] == [e[:2] for e in want]
    assert [e[2] for e in events if e[0] == "update"] == pytest.approx([e[2] for e in want if e[0] == "update"])
    assert events[0] == (("update", 0, pytest.approx(0.3)) if method == "rigl" else ("step", 0))
