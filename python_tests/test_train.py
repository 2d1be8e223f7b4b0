import pytest
import torch

import mcwt_ext.train as train_mod
from conftest import DEVICES, synthetic_model
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
    with pytest.raises(TypeError, match="momentum"):
        TrainConfig.for_arch("conv4", momentum=0.9)


@pytest.mark.parametrize("field,value", [("iterations", 0), ("lr", -1.0), ("lr", float("nan")),
                                         ("batch_size", 0), ("eval_every", 0), ("checkpoint_every", -1),
                                         ("seed", -1), ("iterations", 2.5), ("device", "gpu0")])
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


def test_resume_after_a_kill_is_bit_identical(synthetic, tmp_path, monkeypatch):
    masks = random_masks(synthetic_model(), 0.5, seed=0)
    whole = synthetic_model()
    expected = train(whole, synthetic, masks, _cfg(), tmp_path / "whole", progress=False)

    _kill_at(monkeypatch, 10)  # after the checkpoint at 8
    with pytest.raises(_Killed):
        train(synthetic_model(), synthetic, masks, _cfg(), tmp_path / "killed", progress=False)
    rd = RunDir(tmp_path / "killed")
    assert torch.load(rd.file(CHECKPOINT), weights_only=True)["iteration"] == 8
    assert not rd.exists("summary.json")
    monkeypatch.undo()

    resumed = synthetic_model()  # a fresh process would start from a fresh model
    result = train(resumed, synthetic, masks, _cfg(), rd, progress=False)
    assert _same_weights(whole, resumed)
    assert repr(result.history) == repr(expected.history)  # repr: nan == nan
    assert rd.metrics_path.read_text() == RunDir(tmp_path / "whole").metrics_path.read_text()


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


def test_snapshot_equals_a_run_stopped_there(synthetic, tmp_path):
    train(synthetic_model(), synthetic, None, _cfg(iterations=6), tmp_path / "long", progress=False, snapshot_iterations=[3])
    short = synthetic_model()
    train(short, synthetic, None, _cfg(iterations=3), progress=False)
    snap = RunDir(tmp_path / "long").load_tensors(snapshot_name(3))
    assert all(torch.equal(snap[k], v) for k, v in short.state_dict().items())
    with pytest.raises(ValueError, match="run_dir"):
        train(synthetic_model(), synthetic, None, _cfg(iterations=6), progress=False, snapshot_iterations=[3])


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
