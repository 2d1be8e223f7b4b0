"""Fit: logistic models recovered from tickets drawn from a known model; JSON round trip."""
import json

import pytest
import torch

from conftest import DEVICES
from mcwt_ext.fit import LogisticFit, LogisticModel, fit_ticket, load_fit
from mcwt_ext.masks import random_masks
from mcwt_ext.models import build_model
from mcwt_ext.sample import sample_masks

TRUE = LogisticFit({
    "conv": {"magnitude": LogisticModel(2.0, 0.0, -3.0), "connectivity": LogisticModel(2.0, 1.5, -4.0)},
    "linear": {"magnitude": LogisticModel(1.5, 0.0, -3.0), "connectivity": LogisticModel(1.5, 1.0, -4.0)},
})


def _setup():
    model = build_model("conv2", in_channels=1, num_classes=10, image_size=8, seed=0)
    x = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return model, x


@pytest.mark.parametrize("connectivity", [False, True])
def test_recovers_known_slopes(connectivity):
    """Masks sampled from known slopes are fitted back to slopes near the truth."""
    model, x = _setup()
    masks = sample_masks(model, TRUE, x, sparsity=0.5, use_connectivity=connectivity, seed=1)
    fit = fit_ticket(model, masks, x)
    variant = "connectivity" if connectivity else "magnitude"
    for kind in ("conv", "linear"):
        got, want = fit.models[kind][variant], TRUE.models[kind][variant]
        assert got.u_mag == pytest.approx(want.u_mag, rel=0.15), kind
        if connectivity:
            assert got.u_conn == pytest.approx(want.u_conn, rel=0.3), kind
    # Diagnostics: magnitude ranks a magnitude-driven ticket well; random masks do not.
    assert all(info["auc"]["magnitude"] > 0.65 for info in fit.layers)
    assert {info["name"] for info in fit.layers} == set(masks)


def test_random_ticket_has_no_signal():
    model, x = _setup()
    rnd = fit_ticket(model, random_masks(model, 0.5, seed=0), x)
    assert all(abs(info["auc"]["magnitude"] - 0.5) < 0.05 for info in rnd.layers)
    assert all(abs(m.u_mag) < 0.3 for vs in rnd.models.values() for m in vs.values())


def test_json_round_trip(tmp_path):
    model, x = _setup()
    fit = fit_ticket(model, random_masks(model, 0.8, seed=0), x, max_weights_per_layer=5000)
    path = tmp_path / "fit.json"
    fit.save(path)
    back = load_fit(path)
    assert back.models == fit.models and back.layers == json.loads(path.read_text())["layers"]
    assert load_fit(back) is back


def test_errors(tmp_path):
    model, x = _setup()
    with pytest.raises(FileNotFoundError, match="fit"):
        load_fit(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="format"):
        load_fit(tmp_path / "bad.json")
    with pytest.raises(TypeError, match="fit"):
        load_fit(3)
    masks = random_masks(model, 0.8, seed=0)
    masks.pop("2.weight")
    with pytest.raises(ValueError, match="2.weight"):
        fit_ticket(model, masks, x)
    with pytest.raises(ValueError, match="no connectivity model for linear"):
        LogisticFit({"conv": TRUE.models["conv"], "linear": {}}).model("output", True)


@pytest.mark.parametrize("device", DEVICES)
def test_fit_measures_connectivity_on_the_given_device(device):
    model, x = _setup()
    masks = random_masks(model, 0.8, seed=0)
    here = fit_ticket(model, masks, x, max_weights_per_layer=5000)
    there = fit_ticket(model, masks, x, max_weights_per_layer=5000, device=device)
    assert next(model.parameters()).device.type == "cpu"  # the caller's model is not moved
    for kind, variants in here.models.items():
        for variant, m in variants.items():
            assert there.models[kind][variant].u_mag == pytest.approx(m.u_mag, rel=1e-4)
            assert there.models[kind][variant].u_conn == pytest.approx(m.u_conn, rel=1e-4, abs=1e-6)
