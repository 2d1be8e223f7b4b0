"""--precision: bf16 autocasts the forward pass and the loss while weights, gradients and Adam
state stay float32 and masks stay exact; it is part of the run's identity, resumes bit for bit,
and is refused (one line naming the flag) where oneDNN has no bfloat16 instructions; with --pack
its cells train alone (test_pack_capabilities.py).

bf16 runs anywhere (emulated where the CPU lacks bfloat16 instructions, as under CI's
``ONEDNN_MAX_CPU_ISA=SSE41``), so the tests that train in it declare it native (``bf16_allowed``)."""
import subprocess
import sys

import pytest
import torch

import mcwt_ext.precision as precision_mod
from conftest import DEVICES, child_env, synthetic_model
from mcwt_ext.cli import main
from mcwt_ext.masks import random_masks
from mcwt_ext.runs import RunDir
from mcwt_ext.train import TrainConfig, _MaskEnforcer, _step, make_optimizer, train
from test_train import _cfg, _kill_at, _Killed, _same_weights


@pytest.fixture
def bf16_allowed(monkeypatch):
    monkeypatch.setattr(precision_mod, "native_bf16", lambda: True)


@pytest.mark.parametrize("device", DEVICES)
def test_a_bf16_step_computes_in_bf16_and_keeps_float32_state(synthetic, device, bf16_allowed):
    x, y = (t[:60].to(device) for t in synthetic.train.tensors)
    seen = {}
    for precision in ("fp32", "bf16"):
        model = synthetic_model().to(device)
        masks = random_masks(model, 0.8, seed=0)
        enforcer = _MaskEnforcer(model, masks)
        enforcer.weights()
        optimizer = make_optimizer(model, 1e-3)
        conv = model[0]
        hooks = [conv.register_forward_pre_hook(lambda m, a: seen.__setitem__((precision, "in"), a[0])),
                 conv.register_forward_hook(lambda m, a, out: seen.__setitem__((precision, "out"), out))]
        loss = _step(model, optimizer, enforcer, x, y, precision)
        for h in hooks:
            h.remove()
        seen[precision, "loss"] = loss
        assert loss.dtype == torch.float32
        for name, p in model.named_parameters():
            state = optimizer.state[p]
            assert p.dtype == p.grad.dtype == state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
            assert p.is_contiguous()  # the weights keep their layout: saved files are unchanged
            if name in masks:
                assert torch.count_nonzero(p.detach()[~masks[name].to(device)]) == 0
    # negative control: fp32 computes in float32 on contiguous images, bf16 does not
    assert seen["fp32", "out"].dtype == torch.float32 and seen["fp32", "in"].is_contiguous()
    assert seen["bf16", "out"].dtype == torch.bfloat16
    assert seen["bf16", "in"].is_contiguous(memory_format=torch.channels_last)
    assert seen["fp32", "loss"] != seen["bf16", "loss"]


@pytest.mark.slow
@pytest.mark.numerics
def test_bf16_is_recorded_and_resumes_bit_identical(synthetic, tmp_path, monkeypatch, bf16_allowed):
    masks = random_masks(synthetic_model(), 0.5, seed=0)
    cfg = _cfg(precision="bf16")
    whole = synthetic_model()
    expected = train(whole, synthetic, masks, cfg, tmp_path / "whole", progress=False)
    assert expected.summary["config"]["precision"] == "bf16"
    fp32 = synthetic_model()
    train(fp32, synthetic, masks, _cfg(), progress=False)
    assert not _same_weights(whole, fp32)  # negative control: the precision changed the result

    _kill_at(monkeypatch, 10)  # after the checkpoint at 8
    with pytest.raises(_Killed):
        train(synthetic_model(), synthetic, masks, cfg, tmp_path / "killed", progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(precision_mod, "native_bf16", lambda: True)
    rd = RunDir(tmp_path / "killed")
    with pytest.raises(ValueError, match="precision 'bf16' there, 'fp32' now"):
        train(synthetic_model(), synthetic, masks, _cfg(), rd, progress=False)
    resumed = synthetic_model()
    result = train(resumed, synthetic, masks, cfg, rd, progress=False)
    assert _same_weights(whole, resumed)
    assert repr(result.history) == repr(expected.history)


def test_bf16_without_bfloat16_instructions_is_refused(synthetic, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision_mod, "native_bf16", lambda: False)
    with pytest.raises(ValueError, match="--precision bf16"):
        train(synthetic_model(), synthetic, None, _cfg(precision="bf16"), tmp_path / "lib", progress=False)
    assert not (tmp_path / "lib").exists()
    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--arch", "conv2", "--dataset", "synthetic", "--iterations", "2", "--quiet",
              "--precision", "bf16", "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "--precision bf16" in err, err
    assert not out.exists()
    train(synthetic_model(), synthetic, None, _cfg(iterations=2), progress=False)  # fp32 is unaffected


def test_native_bf16_follows_onednn_isa_cap():
    """oneDNN capped below AVX-512 has no bfloat16 instructions on any CPU."""
    code = "import mcwt_ext.precision as p; print(p.native_bf16())"
    capped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env=child_env(ONEDNN_MAX_CPU_ISA="AVX2")).stdout.split()
    assert capped == ["False"]
    flags = open("/proc/cpuinfo").read().split() if sys.platform == "linux" else []
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        env = child_env()
        env.pop("ONEDNN_MAX_CPU_ISA", None)
        free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env=env).stdout.split()
        assert free == ["True"]


def test_config_and_packs_take_precision(synthetic, bf16_allowed):
    from mcwt_ext.lockstep import PackNet, train_pack

    with pytest.raises(ValueError, match="precision"):
        TrainConfig(iterations=1, lr=1e-3, precision="fp16")
    assert TrainConfig(iterations=1, lr=1e-3).identity()["precision"] == "fp32"
    net = PackNet(synthetic_model(), None, _cfg(iterations=2, precision="bf16"))
    with pytest.raises(ValueError, match="--precision bf16"):
        train_pack([net], synthetic, progress=False)


def _bf16_grid(out, **kw):
    from mcwt_ext.experiments import Grid

    return Grid(archs=["conv2"], seeds=[0], dataset="synthetic", iterations=4, eval_every=2, progress=False,
                out=out, **kw)


def test_reproduce_trains_every_cell_in_bf16_and_leaves_fp32_grids_as_they_were(tmp_path, bf16_allowed):
    from mcwt_ext.experiments import report

    g = _bf16_grid(tmp_path / "g", precision="bf16")
    g.run()
    report(g)
    trained = [c for c in g.cells if c.kind != "fit"]
    assert {c.kind for c in trained} == {"imp", "random", "mcwt_magnitude", "mcwt_connectivity"}
    for c in trained:
        assert c.dir().load_json(RunDir.CONFIG)["train"]["precision"] == "bf16", c.key
    assert '"precision": "bf16"' in (g.out / "table.md").read_text()
    fp32 = _bf16_grid(tmp_path / "g")
    assert "precision" not in fp32.settings()  # grids made before --precision keep their identity
    with pytest.raises(ValueError):  # and a grid does not mix the two
        fp32.run()


def test_reproduce_in_bf16_without_bfloat16_instructions_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(precision_mod, "native_bf16", lambda: False)
    with pytest.raises(ValueError, match="--precision bf16: this CPU has no bfloat16 instructions"):
        _bf16_grid(tmp_path / "g", precision="bf16")
    assert not (tmp_path / "g").exists()


def test_bf16_note_names_where_bf16_was_measured_to_pay(capsys):
    """issue 25 item 4: bf16 chosen for inputs smaller than where it was measured to pay (CPU: the
    3x32x32 Conv-2 step) gets one line, once per process for each device kind and image size."""
    from mcwt_ext import precision

    assert precision.bf16_note("fp32", "cpu", 8) is None
    assert precision.bf16_note("bf16", "cpu", 32) is None
    note = precision.bf16_note("bf16", "cpu", 8)
    assert "measured to pay on 32x32 images" in note and "not on these 8x8" in note and "--shapes digits,cifar10" in note
    assert "not measured to pay on cuda" in precision.bf16_note("bf16", "cuda", 32)
    precision._said.clear()
    for _ in range(3):
        precision.say_bf16_note("bf16", "cpu", 8)
    precision.say_bf16_note("bf16", "cpu", 32)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"mcwt: note: {note}"]
    precision._said.clear()


def test_train_says_the_bf16_note(monkeypatch, capsys):
    """train() says the note where bf16 runs on small images (bf16 itself forced: this test is
    about the line, and the hardware check is tested above)."""
    from mcwt_ext import precision
    from mcwt_ext import train as train_module
    from mcwt_ext.data import load_dataset
    from mcwt_ext.models import build_model
    from mcwt_ext.train import TrainConfig, train

    monkeypatch.setattr(train_module, "check_precision", lambda *a: None)
    precision._said.clear()
    ds = load_dataset("digits")
    model = build_model("conv2", ds.in_channels, ds.num_classes, ds.image_size, seed=0)
    train(model, ds, None, TrainConfig(iterations=1, lr=1e-3, eval_every=1, precision="bf16"), progress=False)
    assert "mcwt: note: --precision bf16: measured to pay on 32x32 images" in capsys.readouterr().err
    precision._said.clear()
