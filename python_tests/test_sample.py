"""The sampler: calibration, densities, determinism, greedy order, errors."""
import math

import pytest
import torch
from torch import nn

from conftest import DEVICES
from test_ops_cross_device import MAX_DISAGREEMENT
from mcwt_ext import ops, sample_masks
from mcwt_ext.data import load_dataset
from mcwt_ext.fit import LogisticFit, LogisticModel
from mcwt_ext.models import build_model
from mcwt_ext.sample import calibrate_bias, sample_ticket

FIT = LogisticFit({
    "conv": {"magnitude": LogisticModel(1.2, 0.0, -1.0), "connectivity": LogisticModel(1.2, 0.8, -2.0)},
    "linear": {"magnitude": LogisticModel(0.9, 0.0, -1.0), "connectivity": LogisticModel(0.9, 0.5, -2.0)},
})


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _model(ds, device="cpu", arch="conv2"):
    return build_model(arch, ds.in_channels, ds.num_classes, ds.image_size, seed=0).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.numerics
def test_calibration_hits_target(device):
    w = torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(0)).to(device)
    g = torch.rand(32, generator=torch.Generator().manual_seed(1)).to(device) + 0.5
    for density in (0.01, 0.2, 0.9):
        b = calibrate_bias(w, g, u_mag=2.0, u_conn=1.0, density=density)
        assert ops.expected_density(w, g, u_mag=2.0, u_conn=1.0, bias=b) == pytest.approx(density, abs=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.numerics
def test_densities_hit_target(digits, device, exact):
    model = _model(digits, device, "conv4")
    masks, draws = sample_ticket(model, FIT, digits.train.tensors[0].to(device), sparsity=0.8,
                                 exact=exact, seed=0)
    assert list(masks) == [f"{n}.weight" for n, m in model.named_children()
                           if isinstance(m, (nn.Conv2d, nn.Linear))]
    for d, (name, mask) in zip(draws, masks.items()):
        n = mask.numel()
        assert mask.dtype == torch.bool and mask.device.type == device
        assert d.expected_density == pytest.approx(0.2, abs=1e-6)
        if exact:
            assert int(mask.sum()) == round(0.2 * n)
        else:  # Bernoulli: within 5 binomial standard deviations of the target
            assert abs(int(mask.sum()) - 0.2 * n) <= 5 * math.sqrt(n * 0.2 * 0.8) + 1


@pytest.mark.numerics
def test_per_layer_sparsity_and_determinism(digits):
    model = _model(digits)
    x = digits.train.tensors[0]
    names = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    sparsity = {n: 0.5 + 0.1 * i for i, n in enumerate(names)}
    a = sample_masks(model, FIT, x, sparsity=sparsity, seed=7, exact=True)
    b = sample_masks(model, FIT, x, sparsity=sparsity, seed=7, exact=True)
    c = sample_masks(model, FIT, x, sparsity=sparsity, seed=8, exact=True)
    for i, n in enumerate(names):
        assert torch.equal(a[n], b[n])
        assert int(a[n].sum()) == round(a[n].numel() * (0.5 - 0.1 * i))
    assert any(not torch.equal(a[n], c[n]) for n in names)


def test_connectivity_changes_masks_and_magnitude_needs_no_data(digits):
    model = _model(digits)
    with_g = sample_masks(model, FIT, digits.train.tensors[0], seed=0)
    without = sample_masks(model, FIT, None, use_connectivity=False, seed=0)
    first = "0.weight"
    assert torch.equal(with_g[first], without[first])  # layer 1: magnitude alone in both
    assert not torch.equal(with_g["2.weight"], without["2.weight"])


def test_keep_probability_follows_magnitude(digits):
    model = _model(digits)
    masks = sample_masks(model, FIT, None, use_connectivity=False, seed=0)
    w = model[0].weight.detach().abs().flatten()
    kept = masks["0.weight"].flatten()
    assert w[kept].mean() > w[~kept].mean()


def test_dense_layers_and_strict_json_record(digits):
    import json

    from mcwt_ext.sample import sample_record

    model = _model(digits)
    masks, draws = sample_ticket(model, FIT, None, sparsity=0.0, use_connectivity=False)
    assert all(bool(m.all()) for m in masks.values())
    record = sample_record(draws, 1.0)
    json.dumps(record, allow_nan=False)  # raises on inf/nan
    assert all(layer["bias"] is None and layer["density"] == 1.0 for layer in record["layers"])


def test_fit_from_path(digits, tmp_path):
    model = _model(digits)
    FIT.save(tmp_path / "fit.json")
    a = sample_masks(model, tmp_path / "fit.json", digits.train.tensors[0], seed=3)
    b = sample_masks(model, FIT, digits.train.tensors[0], seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_errors(digits):
    model = _model(digits)
    x = digits.train.tensors[0]
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            sample_masks(model, FIT, x, sparsity=bad)
    with pytest.raises(ValueError, match="sparsity"):
        sample_masks(model, FIT, x, sparsity={"0.weight": 0.5})
    with pytest.raises(ValueError, match="data"):
        sample_masks(model, FIT, torch.rand(10, 3, 8, 8))
    with pytest.raises(ValueError, match="data"):
        sample_masks(model, FIT, None)
    conv_only = LogisticFit({"conv": FIT.models["conv"]})
    with pytest.raises(ValueError, match="linear"):
        sample_masks(model, conv_only, x)
    with pytest.raises(TypeError, match="seed"):
        sample_masks(model, FIT, x, seed=1.5)


@pytest.mark.needs_cuda
@pytest.mark.numerics
def test_same_masks_on_cpu_and_cuda(digits):
    x = digits.train.tensors[0]
    cpu = sample_masks(_model(digits), FIT, x, seed=5)
    cuda = sample_masks(_model(digits, "cuda"), FIT, x.cuda(), seed=5)
    # The sampling ops are bit-identical for identical inputs; connectivity is not (CPU and
    # cuDNN round convolutions differently), so the masks agree on all but a bounded
    # fraction of weights, the bound measured in test_ops_cross_device.py.
    differ = sum(int((cpu[name] != cuda[name].cpu()).sum()) for name in cpu)
    total = sum(m.numel() for m in cpu.values())
    assert differ / total <= MAX_DISAGREEMENT, f"{differ} of {total} weights differ"
