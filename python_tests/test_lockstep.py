import dataclasses
import shutil

import pytest
import torch

import mcwt_ext.lockstep as lockstep_mod
from conftest import DEVICES, fake_clock, synthetic_model
from mcwt_ext.data import load_dataset
from mcwt_ext.lockstep import IMPLS, PackNet, PackOptions, pack_forward, train_pack
from mcwt_ext.masks import random_masks
from mcwt_ext.models import build_model
from mcwt_ext.runs import RunDir
from mcwt_ext.train import BatchOrder, TrainConfig, train
from numerics import U64, first_step_violations, float64_drift_bound, max_diff, sum_rounding

CHECKPOINT = RunDir.CHECKPOINT
#: Terms of the longest sum in a gradient of these Conv-2s: batch 60 x 8 x 8 positions.
TERMS = 60 * 8 * 8


def _cfg(seed=0, **kw):
    return TrainConfig(**{**dict(iterations=12, lr=1e-3, eval_every=3, checkpoint_every=4, seed=seed), **kw})


def _bound(steps=12, lr=1e-3):
    """How far two float64 paths of ``steps`` Adam steps may drift apart (numerics.py)."""
    return float64_drift_bound(steps, lr, TERMS)


def _same_weights(a, b):
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _model(seed, dtype=torch.float32):
    return synthetic_model(seed).to(dtype)


def _nets(seeds, root=None, dtype=torch.float32, **kw):
    return [PackNet(_model(s, dtype), random_masks(synthetic_model(s), 0.8, seed=s), _cfg(s, **kw),
                    None if root is None else root / f"net_{s}") for s in seeds]


@pytest.fixture(scope="module")
def synthetic64(synthetic):
    return synthetic.astype(torch.float64)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.numerics
@pytest.mark.parametrize("impl", IMPLS)
def test_forward_matches_each_net(impl):
    models = [_model(s, torch.float64) for s in range(3)]
    params = {n: torch.stack([m.get_parameter(n) for m in models]).detach() for n, _ in models[0].named_parameters()}
    x = torch.randn(3, 5, 3, 8, 8, dtype=torch.float64)
    out = pack_forward(impl, models[0], params, x)
    shared = pack_forward(impl, models[0], params, x[0], shared_input=True)
    # float64: each of the 5 layers sums at most 1,024 terms (fc1's inputs), each below 10 here
    tol = 5 * sum_rounding(1024, 10.0, U64)
    for k, m in enumerate(models):
        torch.testing.assert_close(out[k], m(x[k]), rtol=0, atol=tol)
        torch.testing.assert_close(shared[k], m(x[0]), rtol=0, atol=tol)


def _digits_conv2():
    return build_model("conv2", 1, 10, 8, seed=3)


@pytest.mark.numerics
@pytest.mark.parametrize("impl", IMPLS)
def test_one_step_matches_train_to_float32_rounding(digits, impl):
    """float32, one Adam step: every weight within numerics.adam_step_tolerance of train()'s, and
    the same check sees a pack that trained on another batch."""
    masks = random_masks(_digits_conv2(), 0.8, seed=3)
    cfg = TrainConfig(iterations=1, lr=2e-4, eval_every=1, seed=3)
    alone = _digits_conv2()
    train(alone, digits, masks, cfg, progress=False)
    nets = [PackNet(_digits_conv2(), masks, cfg), PackNet(_digits_conv2(), masks, dataclasses.replace(cfg, seed=4))]
    train_pack(nets[:1], digits, PackOptions(impl=impl), progress=False)
    train_pack(nets[1:], digits, PackOptions(impl=impl), progress=False)  # the wrong batch
    x, y = digits.train.tensors
    idx = BatchOrder(len(y), cfg.batch_size, cfg.seed).indices(0)
    check = [first_step_violations(_digits_conv2(), masks, x[idx], y[idx], cfg.lr, alone, n.model) for n in nets]
    assert check[0] == 0
    assert check[1] > 10_000  # of the 73,000 kept weights: most move the other way
    for name, mask in masks.items():  # pruned weights exactly zero
        assert torch.count_nonzero(nets[0].model.get_parameter(name).detach()[~mask]) == 0


@pytest.mark.numerics
@pytest.mark.parametrize("impl", IMPLS)
def test_one_net_matches_train_after_100_steps(digits, impl):
    """float64, 100 Adam steps: within numerics.float64_drift_bound of train() (measured 2e-15)."""
    def fresh():
        return _digits_conv2().double()
    digits64 = digits.astype(torch.float64)
    masks = random_masks(fresh(), 0.8, seed=3)
    cfg = TrainConfig(iterations=100, lr=2e-4, eval_every=50, seed=3)
    alone = fresh()
    expected = train(alone, digits64, masks, cfg, progress=False)
    net = PackNet(fresh(), masks, cfg)
    [result] = train_pack([net], digits64, PackOptions(impl=impl), progress=False)
    assert max_diff(alone, net.model) <= _bound(100, cfg.lr)
    assert [r["iteration"] for r in result.history] == [r["iteration"] for r in expected.history]
    for got, want in zip(result.history, expected.history):
        assert got["val_acc"] == want["val_acc"]  # a flip needs two logits within ~1e-12
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-9)
    for name, mask in masks.items():  # pruned weights exactly zero
        assert torch.count_nonzero(net.model.get_parameter(name).detach()[~mask]) == 0


@pytest.mark.numerics
@pytest.mark.parametrize("wrong", ["adam_moment", "skipped_batch"])
def test_the_float64_bound_sees_a_real_difference(synthetic64, tmp_path, monkeypatch, wrong):
    """A pack resumed from a checkpoint with its first Adam moment off by 0.1%, or one batch
    skipped, ends far beyond the bound the float64 comparisons allow."""
    _kill_at(monkeypatch, 5)  # checkpoint at 4
    with pytest.raises(_Killed):
        train_pack(_nets([0], tmp_path, torch.float64), synthetic64, progress=False)
    monkeypatch.undo()
    path = RunDir(tmp_path / "net_0").file(CHECKPOINT)
    ckpt = torch.load(path, weights_only=True)
    if wrong == "adam_moment":
        for state in ckpt["optimizer"]["state"].values():
            state["exp_avg"] *= 1.001
    else:
        ckpt["iteration"] += 1
    torch.save(ckpt, path)
    [net] = _nets([0], tmp_path, torch.float64)
    train_pack([net], synthetic64, progress=False)
    alone = _model(0, torch.float64)
    train(alone, synthetic64, net.masks, net.config, progress=False)
    assert max_diff(alone, net.model) > 100 * _bound()


@pytest.mark.slow
@pytest.mark.numerics
def test_pack_matches_independent_runs_on_digits(digits):
    """Four nets (two seeds, dense and pruned) in lockstep against four train() runs, float64."""
    def fresh(seed):
        return build_model("conv2", 1, 10, 8, seed=seed).double()
    digits64 = digits.astype(torch.float64)
    specs = [(s, random_masks(fresh(s), 0.8, seed=s) if pruned else None) for s in (0, 1) for pruned in (0, 1)]
    cfg = dict(iterations=60, lr=2e-4, eval_every=20)
    nets, alone, models = [], [], []
    for s, masks in specs:
        models.append(fresh(s))
        alone.append(train(models[-1], digits64, masks, TrainConfig(seed=s, **cfg), progress=False))
        nets.append(PackNet(fresh(s), masks, TrainConfig(seed=s, **cfg)))
    results = train_pack(nets, digits64, progress=False)
    for got, want, net, model in zip(results, alone, nets, models):
        assert max_diff(net.model, model) <= _bound(60, 2e-4)
        for key in ("val_acc_final", "test_acc_final", "val_acc_early_stop", "val_acc_max", "early_stop_iteration"):
            assert got.summary[key] == want.summary[key], key


def test_files_match_train_and_summary_records_the_pack(synthetic, tmp_path):
    alone = RunDir(tmp_path / "alone")
    train(synthetic_model(0), synthetic, random_masks(synthetic_model(0), 0.8, seed=0), _cfg(0), alone, progress=False)
    nets = _nets([0, 1], tmp_path)
    results = train_pack(nets, synthetic, progress=False)
    rd = RunDir(tmp_path / "net_0")
    assert sorted(p.name for p in rd.path.iterdir()) == sorted(p.name for p in alone.path.iterdir())
    ours, theirs = rd.load_json("summary.json"), alone.load_json("summary.json")
    assert set(ours) - set(theirs) == {"lockstep"} and ours["config"] == theirs["config"]
    assert ours["masks_sha256"] == theirs["masks_sha256"]
    lock = ours["lockstep"]
    assert (lock["pack_size"], lock["impl"], lock["precision"], lock["cuda_graph"]) == (2, "grouped", "float32", False)
    assert rd.load_csv("metrics.csv")[0].keys() == alone.load_csv("metrics.csv")[0].keys()
    assert [int(r["iteration"]) for r in rd.load_csv("metrics.csv")] == [0, 3, 6, 9, 12]
    s = results[1].summary
    best = max(results[1].history, key=lambda r: (r["val_acc"], -r["iteration"]))
    assert (s["val_acc_max"], s["val_acc_max_iteration"]) == (best["val_acc"], best["iteration"])
    assert theirs["val_acc_max"] >= theirs["val_acc_early_stop"]  # train() reports it too


def test_own_evaluation_and_checkpoint_schedules(synthetic, tmp_path):
    nets = [PackNet(synthetic_model(0), None, _cfg(0, eval_every=5, checkpoint_every=0), tmp_path / "a"),
            PackNet(synthetic_model(1), None, _cfg(1, eval_every=4), tmp_path / "b")]
    a, b = train_pack(nets, synthetic, progress=False)
    assert [r["iteration"] for r in a.history] == [0, 5, 10, 12]
    assert [r["iteration"] for r in b.history] == [0, 4, 8, 12]


class _Killed(Exception):
    pass


def _kill_at(monkeypatch, iteration):
    """Make the pack die when it starts step ``iteration`` (1-based steps done after it)."""
    real, seen = lockstep_mod._Pack.step, []

    def dying(self, idx):
        seen.append(1)
        if len(seen) == iteration:
            raise _Killed
        return real(self, idx)
    monkeypatch.setattr(lockstep_mod._Pack, "step", dying)


def test_killed_pack_resumes_bit_identical(synthetic, tmp_path, monkeypatch):
    whole = _nets([0, 1, 2], tmp_path / "whole")
    expected = train_pack(whole, synthetic, progress=False)
    _kill_at(monkeypatch, 11)  # after the checkpoints at 8
    with pytest.raises(_Killed):
        train_pack(_nets([0, 1, 2], tmp_path / "killed"), synthetic, progress=False)
    monkeypatch.undo()
    for s in range(3):
        rd = RunDir(tmp_path / "killed" / f"net_{s}")
        assert torch.load(rd.file(CHECKPOINT), weights_only=True)["iteration"] == 8
        assert not rd.exists("summary.json")
    resumed = _nets([0, 1, 2], tmp_path / "killed")  # fresh models, as a new process has
    results = train_pack(resumed, synthetic, progress=False)
    for s, (w, r, e, got) in enumerate(zip(whole, resumed, expected, results)):
        assert _same_weights(w.model, r.model)
        assert repr(got.history) == repr(e.history)
        assert (tmp_path / "killed" / f"net_{s}" / "metrics.csv").read_text() == \
            (tmp_path / "whole" / f"net_{s}" / "metrics.csv").read_text()
        assert not RunDir(tmp_path / "killed" / f"net_{s}").exists(CHECKPOINT)


def test_killed_pack_resumes_from_its_checkpoints_by_the_clock(synthetic, tmp_path, monkeypatch):
    whole = _nets([0, 1], tmp_path / "whole", checkpoint_every=0)
    train_pack(whole, synthetic, progress=False)
    fake_clock(monkeypatch, lockstep_mod, 7.0)  # each step 7 s later: 30 s pass by step 5
    _kill_at(monkeypatch, 7)
    with pytest.raises(_Killed):
        train_pack(_nets([0, 1], tmp_path / "killed", checkpoint_every=0, checkpoint_minutes=0.5),
                   synthetic, progress=False)
    monkeypatch.undo()
    for s in range(2):
        rd = RunDir(tmp_path / "killed" / f"net_{s}")
        assert 0 < torch.load(rd.file(CHECKPOINT), weights_only=True)["iteration"] < 7
    resumed = _nets([0, 1], tmp_path / "killed", checkpoint_every=0)
    train_pack(resumed, synthetic, progress=False)
    assert all(_same_weights(w.model, r.model) for w, r in zip(whole, resumed))


@pytest.mark.numerics
def test_pack_resumes_net_by_net_and_in_stages(synthetic64, tmp_path, monkeypatch):
    """Each net's checkpoint is train()'s: one net finishes alone with train(), the others resume
    in the pack, one of them from scratch (a stage of its own until it reaches the others).
    float64, against uninterrupted train() runs."""
    _kill_at(monkeypatch, 11)
    with pytest.raises(_Killed):
        train_pack(_nets([0, 1, 2], tmp_path, torch.float64), synthetic64, progress=False)
    monkeypatch.undo()
    net1 = _nets([1], tmp_path, torch.float64)[0]
    train(net1.model, synthetic64, net1.masks, net1.config, net1.run_dir, progress=False)  # net 1 alone
    shutil.rmtree(tmp_path / "net_2")  # net 2 lost everything: starts over
    resumed = _nets([0, 1, 2], tmp_path, torch.float64)
    results = train_pack(resumed, synthetic64, progress=False)
    assert "lockstep" not in results[1].summary  # read back, as train() finished it
    for s, (net, result) in enumerate(zip(resumed, results)):
        alone = _model(s, torch.float64)
        expected = train(alone, synthetic64, net.masks, net.config, progress=False)
        assert max_diff(alone, net.model) <= _bound()
        assert [r["iteration"] for r in result.history] == [r["iteration"] for r in expected.history]
        assert result.history[-1]["val_acc"] == expected.history[-1]["val_acc"]


@pytest.mark.numerics
def test_train_resumes_a_pack_checkpoint(synthetic64, tmp_path, monkeypatch):
    _kill_at(monkeypatch, 11)
    with pytest.raises(_Killed):
        train_pack(_nets([0, 1], tmp_path, torch.float64), synthetic64, progress=False)
    monkeypatch.undo()
    net = _nets([0], tmp_path, torch.float64)[0]
    result = train(net.model, synthetic64, net.masks, net.config, net.run_dir, progress=False)
    alone = _model(0, torch.float64)
    train(alone, synthetic64, net.masks, net.config, progress=False)
    assert max_diff(alone, net.model) <= _bound() and result.summary["iterations"] == 12


def test_snapshots_and_finished_runs_read_back(synthetic, tmp_path, monkeypatch):
    nets = _nets([0, 1], tmp_path)
    nets[0].snapshot_iterations = [0, 5]
    first = train_pack(nets, synthetic, progress=False)
    assert RunDir(tmp_path / "net_0").exists("weights_000005.safetensors")
    _kill_at(monkeypatch, 1)  # no step may run now
    again = _nets([0, 1], tmp_path)
    second = train_pack(again, synthetic, progress=False)
    assert [r.summary for r in second] == [r.summary for r in first]
    assert all(_same_weights(a.model, b.model) for a, b in zip(nets, again))


def test_bad_packs_are_refused(synthetic, tmp_path):
    nets = _nets([0, 1])
    with pytest.raises(ValueError, match="lr"):
        train_pack([nets[0], PackNet(synthetic_model(1), None, _cfg(1, lr=2e-3))], synthetic, progress=False)
    with pytest.raises(ValueError, match="architecture"):
        train_pack([nets[0], PackNet(build_model("conv4", 3, 10, 8), None, _cfg(1))], synthetic, progress=False)
    with pytest.raises(ValueError, match="run directory"):
        train_pack([PackNet(synthetic_model(s), None, _cfg(s), tmp_path) for s in range(2)], synthetic, progress=False)
    with pytest.raises(ValueError, match="impl"):
        PackOptions(impl="loop")
    with pytest.raises(ValueError, match="precision"):
        PackOptions(precision="int8")
    with pytest.raises(ValueError, match="cuda_graph"):
        train_pack(nets, synthetic, PackOptions(cuda_graph=True), progress=False)
    with pytest.raises(ValueError, match="at least one"):
        train_pack([], synthetic)


def test_summary_records_the_fp32_settings_set_through_the_per_op_api(synthetic):
    """The ieee_fp32 fixture's setting (cuDNN conv to IEEE alone) made the old allow_tf32 getter
    raise inside train_pack (issue 18); the per-op values are recorded instead."""
    cudnn, cuda = torch.backends.cudnn, torch.backends.cuda
    old = cudnn.conv.fp32_precision
    cudnn.conv.fp32_precision = "ieee"
    try:
        [result] = train_pack(_nets([0], iterations=2), synthetic, progress=False)
    finally:
        cudnn.conv.fp32_precision = old
    pack = result.summary["lockstep"]
    assert pack["cudnn_conv_fp32_precision"] == "ieee"
    assert pack["cuda_matmul_fp32_precision"] == cuda.matmul.fp32_precision
    assert "cudnn_allow_tf32" not in pack


def test_precision_is_recorded_and_never_mixed_on_resume(synthetic, tmp_path):
    nets = _nets([0], tmp_path, iterations=4)
    [result] = train_pack(nets, synthetic, PackOptions(precision="bfloat16"), progress=False)
    assert result.summary["lockstep"]["precision"] == result.summary["config"]["precision"] == "bfloat16"
    with pytest.raises(ValueError, match="bfloat16"):
        train_pack(_nets([0], tmp_path, iterations=4), synthetic, progress=False)
    with pytest.raises(ValueError, match="precision"):  # train() refuses it as well
        net = _nets([0], tmp_path, iterations=4)[0]
        train(net.model, synthetic, net.masks, net.config, net.run_dir, progress=False)


@pytest.mark.needs_cuda
@pytest.mark.numerics
@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_graph_matches_eager(synthetic64, tmp_path, impl):
    eager = _nets([0, 1, 2], tmp_path / "eager", torch.float64, device="cuda")
    graphed = _nets([0, 1, 2], tmp_path / "graphed", torch.float64, device="cuda")
    want = train_pack(eager, synthetic64, PackOptions(impl=impl), progress=False)
    got = train_pack(graphed, synthetic64, PackOptions(impl=impl, cuda_graph=True), progress=False)
    for a, b, ra, rb in zip(eager, graphed, want, got):
        assert max_diff(a.model, b.model) <= _bound()
        assert [r["iteration"] for r in ra.history] == [r["iteration"] for r in rb.history]
        assert rb.summary["lockstep"]["cuda_graph"] is True


@pytest.mark.needs_cuda
@pytest.mark.numerics
def test_cuda_graph_pack_resumes(synthetic64, tmp_path, monkeypatch):
    whole = _nets([0, 1], tmp_path / "whole", torch.float64, device="cuda")
    train_pack(whole, synthetic64, PackOptions(cuda_graph=True), progress=False)
    _kill_at(monkeypatch, 11)
    with pytest.raises(_Killed):
        train_pack(_nets([0, 1], tmp_path / "killed", torch.float64, device="cuda"), synthetic64,
                   PackOptions(cuda_graph=True), progress=False)
    monkeypatch.undo()
    resumed = _nets([0, 1], tmp_path / "killed", torch.float64, device="cuda")
    train_pack(resumed, synthetic64, PackOptions(cuda_graph=True), progress=False)
    for a, b in zip(whole, resumed):
        assert max_diff(a.model, b.model) <= _bound()


@pytest.mark.numerics
@pytest.mark.parametrize("device", DEVICES)
def test_pack_on_each_device_matches_train(synthetic64, device):
    """float64: a pack on each device against train() on that device."""
    nets = _nets([0, 1], dtype=torch.float64, device=device)
    train_pack(nets, synthetic64, progress=False)
    for s, net in enumerate(nets):
        alone = _model(s, torch.float64)
        train(alone, synthetic64, net.masks, net.config, progress=False)
        assert max_diff(alone, net.model) <= _bound()
