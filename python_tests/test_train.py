import pytest
import torch

import mcwt_ext.train as train_mod
from conftest import DEVICES, fake_clock, synthetic_model
from mcwt_ext.masks import random_masks
from mcwt_ext.runs import RunDir, snapshot_name
from mcwt_ext.train import BatchOrder, TrainConfig, train

CHECKPOINT = RunDir.CHECKPOINT


def _cfg(**kw):
    return TrainConfig(**{**dict(iterations=12, lr=1e-3, eval_every=3, checkpoint_every=4), **kw})


def _same_weights(a, b):
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_config_protocol_defaults_and_overrides():
    c2, c6 = TrainConfig.for_arch("conv2"), TrainConfig.for_arch("conv6")
    assert (c2.iterations, c2.lr, c2.batch_size, c2.eval_every) == (20_000, 2e-4, 60, 100)
    assert (c6.iterations, c6.lr) == (30_000, 3e-4)
    assert TrainConfig.for_arch("conv4", iterations=7, lr=None).iterations == 7
    with pytest.raises(TypeError, match="nesterov"):
        TrainConfig.for_arch("conv4", nesterov=True)
    with pytest.raises(ValueError, match="momentum"):  # momentum is SGD's
        TrainConfig.for_arch("conv4", momentum=0.9)
    assert (c2.optimizer, c2.momentum, c2.weight_decay, c2.warmup_iterations, c2.lr_milestones) == \
        ("adam", 0.0, 0.0, 0, [])
    r = TrainConfig.for_arch("resnet20")
    assert (r.optimizer, r.lr, r.momentum, r.weight_decay, r.batch_size, r.iterations) == \
        ("sgd", 0.03, 0.9, 1e-4, 128, 30_000)
    assert (r.warmup_iterations, r.lr_milestones, r.lr_gamma) == (20_000, [20_000, 25_000], 0.1)
    # the reduced protocol's schedule: warm-up and milestones scaled with the iterations
    small = r.scaled(1500)
    assert TrainConfig.for_arch("resnet20", iterations=1500) == small
    assert TrainConfig.for_arch("resnet20", iterations=1500, warmup_iterations=0).warmup_iterations == 0
    assert (small.iterations, small.warmup_iterations, small.lr_milestones) == (1500, 1000, [1000, 1250])
    assert small.lr_at(0) == pytest.approx(0.03 / 1000) and small.lr_at(999) == pytest.approx(0.03)
    assert small.lr_at(1000) == pytest.approx(0.003) and small.lr_at(1250) == pytest.approx(0.0003)


@pytest.mark.parametrize("field,value", [("iterations", 0), ("lr", -1.0), ("lr", float("nan")),
                                         ("batch_size", 0), ("eval_every", 0), ("checkpoint_every", -1),
                                         ("seed", -1), ("iterations", 2.5), ("device", "gpu0"),
                                         ("optimizer", "rmsprop"), ("momentum", 1.0),
                                         ("weight_decay", -1e-4), ("warmup_iterations", -1),
                                         ("lr_milestones", [5, 3]), ("lr_milestones", [0]),
                                         ("lr_gamma", -0.1), ("checkpoint_minutes", -1.0),
                                         ("checkpoint_minutes", float("inf"))])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        _cfg(**{field: value})


def test_batch_order_depends_only_on_seed_and_iteration():
    order = BatchOrder(100, 30, seed=5)  # 3 batches per epoch, 10 images skipped
    epoch = torch.cat([order.indices(i) for i in range(3)])
    assert len(set(epoch.tolist())) == 90
    later = order.indices(7)
    fresh = BatchOrder(100, 30, seed=5)
    assert torch.equal(fresh.indices(7), later) and torch.equal(fresh.indices(1), order.indices(1))
    assert not torch.equal(BatchOrder(100, 30, seed=6).indices(1), order.indices(1))
    assert not torch.equal(order.indices(0), order.indices(3))  # a new permutation each epoch
    with pytest.raises(ValueError, match="batch_size"):
        BatchOrder(10, 30, seed=0)


@pytest.mark.parametrize("device", DEVICES)
def test_pruned_weights_stay_exactly_zero_at_every_step(synthetic, device):
    model = synthetic_model()
    masks = random_masks(model, 0.8, seed=3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def check(module, inputs):  # runs before every forward: each step and each evaluation
        seen.append(all(torch.count_nonzero(module.get_parameter(n)[~m.to(device)]) == 0
                        for n, m in masks.items()))

    model.register_forward_pre_hook(check)
    result = train(model, synthetic, masks, _cfg(iterations=8, eval_every=4, device=device), progress=False)
    assert len(seen) > 8 and all(seen)
    for name, mask in masks.items():
        w = model.get_parameter(name).detach().cpu()
        assert torch.count_nonzero(w[~mask]) == 0
        assert not torch.equal(w[mask], start[name][mask])  # the kept weights did train
    assert result.summary["densities"]["0.weight"] == pytest.approx(0.2, abs=1e-3)


def test_history_summary_and_files(synthetic, tmp_path):
    rd = RunDir(tmp_path / "run")
    result = train(synthetic_model(), synthetic, None, _cfg(iterations=10, eval_every=3), rd, progress=False)
    assert [row["iteration"] for row in result.history] == [0, 3, 6, 9, 10]
    assert set(result.history[0]) == {"iteration", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc"}
    best = min(result.history, key=lambda r: r["val_loss"])
    s = result.summary
    assert (s["early_stop_iteration"], s["val_acc_early_stop"], s["test_acc_early_stop"]) == \
        (best["iteration"], best["val_acc"], best["test_acc"])
    assert (s["val_acc_final"], s["test_acc_final"]) == (result.history[-1]["val_acc"], result.history[-1]["test_acc"])
    assert s["min_val_loss"] == best["val_loss"] and s["wall_time_s"] > 0
    assert len(rd.load_csv("metrics.csv")) == 5
    assert rd.exists("final.safetensors") and rd.load_json("summary.json")["iterations"] == 10
    assert not rd.exists(CHECKPOINT)  # removed once the run is finished


@pytest.mark.numerics
def test_deterministic_for_a_seed(synthetic):
    a, b, c = synthetic_model(), synthetic_model(), synthetic_model()
    train(a, synthetic, None, _cfg(iterations=5), progress=False)
    train(b, synthetic, None, _cfg(iterations=5), progress=False)
    train(c, synthetic, None, _cfg(iterations=5, seed=1), progress=False)
    assert _same_weights(a, b) and not _same_weights(a, c)


class _Killed(Exception):
    pass


def _kill_at(monkeypatch, iteration):
    """Make training die when it asks for the batch of ``iteration`` (0-based)."""
    real = train_mod._batches

    def dying(train_set, order, start, stop, *args):
        for it, batch in zip(range(start, stop), real(train_set, order, start, stop, *args)):
            if it == iteration:
                raise _Killed
            yield batch
    monkeypatch.setattr(train_mod, "_batches", dying)


def kill_then_resume(monkeypatch, iteration, run, out, check_killed=lambda rd: None):
    """``run(model, out)`` on a fresh synthetic model, killed when it asks for the batch of
    ``iteration`` (``check_killed(RunDir(out))`` looks at what the kill left), then again on a
    fresh model, as a new process would: (that model, what the second run returned)."""
    _kill_at(monkeypatch, iteration)
    with pytest.raises(_Killed):
        run(synthetic_model(), out)
    check_killed(RunDir(out))
    monkeypatch.undo()
    resumed = synthetic_model()
    return resumed, run(resumed, out)


@pytest.mark.numerics
def test_resume_after_a_kill_is_bit_identical(synthetic, tmp_path, monkeypatch):
    masks = random_masks(synthetic_model(), 0.5, seed=0)
    whole = synthetic_model()
    expected = train(whole, synthetic, masks, _cfg(), tmp_path / "whole", progress=False)

    def killed(rd):
        assert torch.load(rd.file(CHECKPOINT), weights_only=True)["iteration"] == 8
        assert not rd.exists("summary.json")

    rd = RunDir(tmp_path / "killed")
    resumed, result = kill_then_resume(  # after the checkpoint at 8
        monkeypatch, 10, lambda m, out: train(m, synthetic, masks, _cfg(), out, progress=False), rd.path, killed)
    assert _same_weights(whole, resumed)
    assert repr(result.history) == repr(expected.history)  # repr: nan == nan
    assert rd.metrics_path.read_text() == RunDir(tmp_path / "whole").metrics_path.read_text()


def test_checkpoints_come_by_iterations_or_minutes_whichever_first():
    cfg = _cfg(checkpoint_every=4, checkpoint_minutes=0.5)
    assert cfg.checkpoint_due(4, 0.0) and cfg.checkpoint_due(3, 30.0) and not cfg.checkpoint_due(3, 29.9)
    assert not cfg.checkpoint_due(12, 1e9)  # the end: the final weights are saved instead
    steps_only, minutes_only = _cfg(checkpoint_minutes=0), _cfg(checkpoint_every=0)  # 0: that rule off
    assert steps_only.checkpoint_due(8, 0.0) and not steps_only.checkpoint_due(7, 1e9)
    assert not minutes_only.checkpoint_due(8, 299.0) and minutes_only.checkpoint_due(7, 300.0)  # default 5
    assert "checkpoint_minutes" not in cfg.identity()  # a runtime setting: not the run's identity


def test_a_checkpoint_by_the_clock_resumes_bit_identical(synthetic, tmp_path, monkeypatch):
    """No checkpoint by iterations; the clock's (30 s, each step 7 s later) is the one a kill
    resumes from, with other checkpoint minutes (a runtime setting), bit for bit."""
    masks = random_masks(synthetic_model(), 0.5, seed=0)
    whole = synthetic_model()
    expected = train(whole, synthetic, masks, _cfg(checkpoint_every=0), tmp_path / "whole", progress=False)

    fake_clock(monkeypatch, train_mod, 7.0)
    _kill_at(monkeypatch, 10)
    with pytest.raises(_Killed):
        train(synthetic_model(), synthetic, masks, _cfg(checkpoint_every=0, checkpoint_minutes=0.5),
              tmp_path / "killed", progress=False)
    rd = RunDir(tmp_path / "killed")
    at = torch.load(rd.file(CHECKPOINT), weights_only=True)["iteration"]
    assert at == 10  # the clock read once a step (and once a checkpoint): 35 s at steps 5 and 10
    monkeypatch.undo()

    resumed = synthetic_model()
    result = train(resumed, synthetic, masks, _cfg(checkpoint_every=0, checkpoint_minutes=5), rd,
                   progress=False)
    assert _same_weights(whole, resumed)
    assert repr(result.history) == repr(expected.history)


def test_finished_run_is_read_back_not_retrained(synthetic, tmp_path, monkeypatch):
    trained = synthetic_model()
    first = train(trained, synthetic, None, _cfg(iterations=4), tmp_path, progress=False)
    _kill_at(monkeypatch, 0)  # any training step would now fail
    again = synthetic_model()
    second = train(again, synthetic, None, _cfg(iterations=4), tmp_path, progress=False)
    assert _same_weights(trained, again)
    assert second.summary == first.summary and repr(second.history) == repr(first.history)


def test_resume_refuses_other_settings_or_masks(synthetic, tmp_path):
    train(synthetic_model(), synthetic, None, _cfg(iterations=4), tmp_path, progress=False)
    with pytest.raises(ValueError, match="iterations"):
        train(synthetic_model(), synthetic, None, _cfg(iterations=5), tmp_path, progress=False)
    with pytest.raises(ValueError, match="masks"):
        train(synthetic_model(), synthetic, random_masks(synthetic_model(), 0.5, 0), _cfg(iterations=4), tmp_path, progress=False)


@pytest.mark.numerics
def test_snapshot_equals_a_run_stopped_there(synthetic, tmp_path):
    train(synthetic_model(), synthetic, None, _cfg(iterations=6), tmp_path / "long", progress=False, snapshot_iterations=[3])
    short = synthetic_model()
    train(short, synthetic, None, _cfg(iterations=3), progress=False)
    snap = RunDir(tmp_path / "long").load_tensors(snapshot_name(3))
    assert all(torch.equal(snap[k], v) for k, v in short.state_dict().items())
    with pytest.raises(ValueError, match="run_dir"):
        train(synthetic_model(), synthetic, None, _cfg(iterations=6), progress=False, snapshot_iterations=[3])


@pytest.mark.numerics
def test_worker_processes_give_the_same_batches(synthetic):
    a, b = synthetic_model(), synthetic_model()
    train(a, synthetic, None, _cfg(iterations=4), progress=False)
    train(b, synthetic, None, _cfg(iterations=4, num_workers=1), progress=False)
    assert _same_weights(a, b)


def test_bad_arguments(synthetic):
    with pytest.raises(TypeError, match="TrainConfig"):
        train(synthetic_model(), synthetic, None, None)
    with pytest.raises(ValueError, match="names no"):
        train(synthetic_model(), synthetic, {"1.weight": torch.ones(1, dtype=torch.bool)}, _cfg(), progress=False)


def _sgd(**kw):
    return _cfg(**{**dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3,
                          warmup_iterations=4, lr_milestones=[7, 10], lr_gamma=0.5), **kw})


def test_sgd_steps_at_the_scheduled_learning_rate(synthetic, monkeypatch):
    """Each step runs SGD (momentum, weight decay) at scheduled_lr of its step number."""
    from mcwt_ext.models import scheduled_lr

    cfg = _sgd()
    rates = []
    real = train_mod._step

    def spy(model, optimizer, *args):
        assert isinstance(optimizer, torch.optim.SGD)
        group = optimizer.param_groups[0]
        assert (group["momentum"], group["weight_decay"]) == (0.9, 1e-3)
        rates.append(group["lr"])
        return real(model, optimizer, *args)
    monkeypatch.setattr(train_mod, "_step", spy)
    masks = random_masks(synthetic_model(), 0.5, seed=0)
    model = synthetic_model()
    train(model, synthetic, masks, cfg, progress=False)
    assert rates == [scheduled_lr(i, lr=0.05, warmup_iterations=4, milestones=(7, 10), gamma=0.5)
                     for i in range(12)]
    assert rates[0] == pytest.approx(0.0125) and rates[-1] == pytest.approx(0.0125)
    for name, mask in masks.items():  # weight decay and momentum leave pruned weights at zero
        assert torch.count_nonzero(model.get_parameter(name).detach()[~mask]) == 0


@pytest.mark.numerics
def test_sgd_resume_after_a_kill_is_bit_identical(synthetic, tmp_path, monkeypatch):
    masks = random_masks(synthetic_model(), 0.5, seed=0)
    whole = synthetic_model()
    train(whole, synthetic, masks, _sgd(), tmp_path / "whole", progress=False)
    resumed, _ = kill_then_resume(  # after the checkpoint at 8, past the warm-up and a milestone
        monkeypatch, 10, lambda m, out: train(m, synthetic, masks, _sgd(), out, progress=False), tmp_path / "killed")
    assert _same_weights(whole, resumed)
    with pytest.raises(ValueError, match="lr_milestones"):  # another schedule is another run
        train(synthetic_model(), synthetic, masks, _sgd(lr_milestones=[5]), tmp_path / "whole",
              progress=False)


def test_runs_made_before_the_optimizer_settings_still_resume(synthetic, tmp_path):
    """A summary or checkpoint without optimizer/schedule keys is an Adam run with no schedule."""
    from mcwt_ext.runs import ADDED_KEYS

    rd = RunDir(tmp_path / "old")
    train(synthetic_model(), synthetic, None, _cfg(), rd, progress=False)
    summary = rd.load_json("summary.json")
    for key in ADDED_KEYS:
        summary["config"].pop(key, None)  # (some are run identities' keys, not training's)
    rd.save_json("summary.json", summary)
    model = synthetic_model()
    assert train(model, synthetic, None, _cfg(), rd, progress=False).summary == summary
    with pytest.raises(ValueError, match="optimizer"):
        train(synthetic_model(), synthetic, None, _sgd(), rd, progress=False)


@pytest.mark.numerics
def test_torch_pruned_model_trains_its_own_masks(synthetic, tmp_path):
    """A model pruned with torch.nn.utils.prune trains like the unpruned model with its masks; its
    run directory holds plain weights that load into build_model's net."""
    from mcwt_ext.masks import from_torch_prune, to_torch_prune
    from mcwt_ext.runs import load_weights

    masks = random_masks(synthetic_model(), 0.6, seed=1)
    plain = synthetic_model()
    train(plain, synthetic, masks, _cfg(), tmp_path / "plain", progress=False)
    pruned = to_torch_prune(synthetic_model(), masks)
    result = train(pruned, synthetic, None, _cfg(), tmp_path / "pruned", progress=False)
    assert result.summary["masks_sha256"] == train_mod._masks_digest(masks)
    assert {k: torch.equal(v, masks[k]) for k, v in from_torch_prune(pruned).items()} == \
        {k: True for k in masks}
    final = RunDir(tmp_path / "pruned").load_tensors("final.safetensors")
    assert set(final) == set(plain.state_dict())
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6)
    loaded = synthetic_model()
    load_weights(loaded, tmp_path / "pruned" / "final.safetensors")
    # the finished run is read back into the pruned model, not retrained
    again = to_torch_prune(synthetic_model(), masks)
    train(again, synthetic, None, _cfg(), tmp_path / "pruned", progress=False)
    assert torch.equal(again.get_submodule("0").weight_orig, pruned.get_submodule("0").weight_orig)
    # given masks must agree with the model's
    train(to_torch_prune(synthetic_model(), masks), synthetic, masks, _cfg(iterations=1), progress=False)
    other = random_masks(synthetic_model(), 0.6, seed=2)
    with pytest.raises(ValueError, match="disagree.*0.weight"):
        train(to_torch_prune(synthetic_model(), masks), synthetic, other, _cfg(), progress=False)
