"""Fit: logistic models recovered from tickets drawn from a known model; JSON round trip."""
import json

import pytest
import torch

from conftest import DEVICES
from mcwt_ext.fit import LogisticFit, LogisticModel, fit_ticket, load_fit
from mcwt_ext.masks import random_masks
from mcwt_ext.models import build_model
from mcwt_ext.sample import sample_masks, sample_ticket

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


# --- granularities ------------------------------------------------------------------------------

M = LogisticModel
#: Distinct slopes per layer (on normalised features): a per-kind fit cannot express them.
TRUE_LAYER = LogisticFit({
    "0.weight": {"magnitude": M(3.0, 0.0, 0.0)},
    "2.weight": {"magnitude": M(1.0, 0.0, 0.0), "connectivity": M(1.0, 2.0, 0.0)},
    "6.weight": {"magnitude": M(2.5, 0.0, 0.0), "connectivity": M(2.5, 0.5, 0.0)},
    "8.weight": {"magnitude": M(1.5, 0.0, 0.0), "connectivity": M(1.5, 1.0, 0.0)},
    "10.weight": {"magnitude": M(0.5, 0.0, 0.0), "connectivity": M(0.5, 1.5, 0.0)},
}, granularity="layer")


@pytest.mark.parametrize("connectivity", [False, True])
def test_layer_granularity_recovers_per_layer_slopes(connectivity):
    model, x = _setup()
    masks = sample_masks(model, TRUE_LAYER, x, sparsity=0.5, use_connectivity=connectivity, seed=1)
    fit = fit_ticket(model, masks, x, granularity="layer")
    assert fit.granularity == "layer" and set(fit.models) == set(TRUE_LAYER.models)
    variant = "connectivity" if connectivity else "magnitude"
    for name, variants in TRUE_LAYER.models.items():
        if variant not in variants:  # the first layer has no connectivity
            assert variant not in fit.models[name]
            continue
        got, want = fit.models[name][variant], variants[variant]
        rel = 0.05 if masks[name].numel() > 10_000 else 0.2  # the statistics of 576 or 2,560 weights
        assert got.u_mag == pytest.approx(want.u_mag, rel=rel), name
        if connectivity:
            assert got.u_conn == pytest.approx(want.u_conn, rel=rel), name
    # A per-kind fit of the same ticket averages the linear layers' slopes away.
    kind = fit_ticket(model, masks, x)
    assert kind.model("linear", connectivity).u_mag == pytest.approx(
        fit.models["6.weight"][variant].u_mag, rel=0.5)
    assert kind.model("linear", connectivity).u_mag != pytest.approx(
        fit.models["10.weight"][variant].u_mag, rel=0.5)


def test_pooled_raw_is_the_kind_model_in_raw_units_for_one_layer_per_kind():
    """With one layer per kind, pooling changes nothing and the raw model is the normalised one
    rescaled: u_raw = u / std(w), u_conn_raw = u_conn / mean(g), the same bias."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10))
    _, x = _setup()
    truth = LogisticFit({"conv": {"magnitude": M(2.0, 0, 0)},
                         "linear": {"magnitude": M(1.5, 0, 0), "connectivity": M(1.5, 1.0, 0)}})
    masks = sample_masks(model, truth, x, sparsity=0.5, seed=2)
    kind = fit_ticket(model, masks, x)
    raw = fit_ticket(model, masks, x, granularity="pooled-raw")
    from mcwt_ext.connectivity import measure_connectivity
    g = measure_connectivity(model, masks, x)["3.weight"]
    for group, weight in (("conv", model[0].weight), ("linear", model[3].weight)):
        std = float(weight.detach().double().std())
        a, b = kind.models[group]["magnitude"], raw.models[group]["magnitude"]
        assert b.u_mag * std == pytest.approx(a.u_mag, rel=1e-2) and b.bias == pytest.approx(a.bias, rel=1e-2)
    a, b = kind.models["linear"]["connectivity"], raw.models["linear"]["connectivity"]
    assert b.u_conn * float(g.mean()) == pytest.approx(a.u_conn, rel=1e-2)
    # ...so both give the sampler the same slopes.
    for fit in (kind, raw):
        u_mag, u_conn = fit.slopes("3.weight", "output", model[3].weight, g)
        assert u_mag == pytest.approx(a.u_mag / float(model[3].weight.detach().double().std()), rel=1e-2)
        assert u_conn == pytest.approx(a.u_conn, rel=1e-2)


def test_pooled_raw_uses_one_raw_slope_per_kind():
    """Conv-2's layers differ in scale (Glorot std 0.04 to 0.09 among the linear layers), so their
    own slopes on raw |w| differ. One raw model pooled over a kind is a compromise between them,
    nearest the largest layer's (conv: 2.weight, 36,864 of 37,440 weights): too steep for the
    small output layer. The sampler applies that one slope to every layer of the kind, where the
    per-kind fit applies u / std(layer)."""
    model, x = _setup()
    masks = sample_masks(model, TRUE, x, sparsity=0.5, use_connectivity=False, seed=1)
    raw = fit_ticket(model, masks, x, granularity="pooled-raw")
    per_layer = fit_ticket(model, masks, x, granularity="layer")
    assert raw.to_json()["normalisation"]["magnitude"] == "|w|, raw"
    own = {n: per_layer.models[n]["magnitude"].u_mag / float(model.get_parameter(n).detach().double().std())
           for n in per_layer.models}
    layers = {"conv": ["0.weight", "2.weight"], "linear": ["6.weight", "8.weight", "10.weight"]}
    for kind, names in layers.items():
        pooled = raw.models[kind]["magnitude"].u_mag
        assert min(own[n] for n in names) < pooled < max(own[n] for n in names), kind
    pooled = raw.models["conv"]["magnitude"].u_mag
    assert abs(pooled - own["2.weight"]) < abs(pooled - own["0.weight"])
    assert raw.models["linear"]["magnitude"].u_mag > 1.5 * own["10.weight"]
    _, draws = sample_ticket(model, raw, x, sparsity=0.5, use_connectivity=False, seed=1)
    assert all(len({d.u_mag for d in draws if d.name in names}) == 1 for names in layers.values())
    _, kind_draws = sample_ticket(model, TRUE, x, sparsity=0.5, use_connectivity=False, seed=1)
    assert len({d.u_mag for d in kind_draws if d.name in layers["linear"]}) == 3


def test_granularity_json(tmp_path):
    model, x = _setup()
    masks = random_masks(model, 0.8, seed=0)
    fit = fit_ticket(model, masks, x, max_weights_per_layer=2000, granularity="layer")
    fit.save(tmp_path / "fit.json")
    back = load_fit(tmp_path / "fit.json")
    assert back.granularity == "layer" and back.models == fit.models
    assert back.model_for("6.weight", "linear", True) == fit.models["6.weight"]["connectivity"]
    with pytest.raises(ValueError, match="per layer"):
        back.model("linear", True)
    with pytest.raises(ValueError, match="layer '7.weight'"):
        back.model_for("7.weight", "linear", True)
    # A file written before granularities existed is a per-kind fit.
    old = TRUE.to_json()
    old.pop("granularity")
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert load_fit(tmp_path / "old.json").granularity == "kind"
    with pytest.raises(ValueError, match="granularity"):
        fit_ticket(model, masks, x, granularity="net")
    with pytest.raises(ValueError, match="granularity"):
        LogisticFit({}, granularity="pooled")
