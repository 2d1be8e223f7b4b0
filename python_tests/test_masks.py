import pytest
import torch
from torch import nn

from conftest import DEVICES
from mcwt_ext.masks import (apply_masks, check_masks, dense_masks, densities, kept_count, layer_kind,
                            magnitude_prune, masked_parameters, prunable_layers, random_masks)
from mcwt_ext.models import build_model


class _OutOfOrder(nn.Module):
    """Registers its layers in another order than it calls them."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_prunable_layers_in_forward_order():
    model = build_model("conv2", 1, 10, 8)
    assert [n for n, _ in prunable_layers(model)] == ["0", "2", "6", "8", "10"]
    assert layer_kind(model) == {"0.weight": "conv", "2.weight": "conv", "6.weight": "linear",
                                 "8.weight": "linear", "10.weight": "output"}
    custom = _OutOfOrder()
    assert [n for n, _ in prunable_layers(custom)] == ["head", "conv", "unused"]
    with pytest.raises(ValueError, match="unused"):
        prunable_layers(custom, example_input=torch.zeros(1, 2, 2, 2))
    del custom.unused
    assert layer_kind(custom, example_input=torch.zeros(1, 2, 2, 2)) == {"conv.weight": "conv",
                                                                        "head.weight": "output"}


@pytest.mark.parametrize("device", DEVICES)
def test_apply_masks_zeroes_exactly_the_pruned_weights(device):
    model = build_model("conv2", 1, 10, 8).to(device)
    masks = random_masks(model, 0.7, seed=0)
    before = {k: model.get_parameter(k).detach().clone() for k in masks}
    apply_masks(model, masks)
    for name, mask in masks.items():
        w = model.get_parameter(name)
        assert torch.count_nonzero(w[~mask.to(device)]) == 0
        assert torch.equal(w[mask.to(device)], before[name][mask.to(device)])
    pairs = list(masked_parameters(model, masks))
    assert len(pairs) == 5 and all(m.device == p.device for p, m in pairs)


def test_check_masks_names_the_problem():
    model = build_model("conv2", 1, 10, 8)
    good = dense_masks(model)
    with pytest.raises(ValueError, match="7.weight"):
        check_masks(model, {"7.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        check_masks(model, {"0.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="bool"):
        check_masks(model, {"0.weight": good["0.weight"].float()})


def test_densities_and_kept_count():
    masks = {"a": torch.tensor([True, False, False, True]), "b": torch.ones(3, dtype=torch.bool)}
    assert densities(masks) == {"a": 0.5, "b": 1.0}
    assert kept_count(4194304, 1 - 0.8) == 838861
    with pytest.raises(ValueError):
        kept_count(10, 1.5)


def test_magnitude_prune_keeps_the_largest_remaining_weights():
    w = torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2, 9.0, 1.0, -4.0, 0.3, 0.05])
    mask = torch.ones(10, dtype=torch.bool)
    mask[5] = False  # the largest weight is already pruned and must stay pruned
    new = magnitude_prune({"w": w}, {"w": mask}, {"w": 1 / 3}, {"w": 0.1})["w"]
    # 9 kept, a third pruned -> 6 kept: |w| = 4, 3, 2, 1, 0.5, 0.3
    assert new.tolist() == [True, True, False, True, False, False, True, True, True, False]
    assert not (new & ~mask).any()


def test_magnitude_prune_lands_exactly_on_the_target_and_stops():
    w = {"w": torch.randn(1000)}
    masks = {"w": torch.ones(1000, dtype=torch.bool)}
    counts = []
    for _ in range(20):
        masks = magnitude_prune(w, masks, {"w": 0.2}, {"w": 0.2})
        counts.append(int(masks["w"].sum()))
    # 1000 -> 800 -> 640 -> 512 -> 410 -> 328 -> 262 -> 210 -> 200 (would overshoot to 168), then stays
    assert counts[:9] == [800, 640, 512, 410, 328, 262, 210, 200, 200]
    assert set(counts[8:]) == {200}


def test_magnitude_prune_always_makes_progress_on_tiny_layers():
    w, masks = {"w": torch.arange(1.0, 5.0)}, {"w": torch.ones(4, dtype=torch.bool)}
    masks = magnitude_prune(w, masks, {"w": 0.1}, {"w": 0.5})  # round(4 * 0.9) = 4: prune 1 anyway
    assert masks["w"].tolist() == [False, True, True, True]


def test_magnitude_prune_needs_a_rate_and_a_target_per_layer():
    w, masks = {"w": torch.ones(4)}, {"w": torch.ones(4, dtype=torch.bool)}
    with pytest.raises(ValueError, match="rates"):
        magnitude_prune(w, masks, {}, {"w": 0.5})
    with pytest.raises(ValueError, match="rate"):
        magnitude_prune(w, masks, {"w": 1.0}, {"w": 0.5})


def test_imp_schedule_for_conv2_reaches_every_target_exactly():
    model = build_model("conv2", 1, 10, 8)
    kinds = layer_kind(model)
    rates = {n: {"conv": 0.1, "linear": 0.2, "output": 0.1}[k] for n, k in kinds.items()}
    targets = {n: 0.2 for n in kinds}
    weights, masks = dict(model.state_dict()), dense_masks(model)
    rounds = 0
    while any(int(m.sum()) > kept_count(m.numel(), 0.2) for m in masks.values()):
        masks = magnitude_prune(weights, masks, rates, targets)
        rounds += 1
    assert rounds == 16  # 0.9 ** 15 > 0.2 > 0.9 ** 16
    for name, m in masks.items():
        assert int(m.sum()) == kept_count(m.numel(), 0.2)


def test_random_masks_exact_per_layer_density_and_seeded():
    model = build_model("conv4", 1, 10, 8)
    a, b, c = random_masks(model, 0.8, seed=1), random_masks(model, 0.8, seed=1), random_masks(model, 0.8, seed=2)
    assert a.keys() == layer_kind(model).keys()
    for name, m in a.items():
        assert int(m.sum()) == kept_count(m.numel(), 1 - 0.8)
        assert torch.equal(m, b[name])
        assert not torch.equal(m, c[name])
    per_layer = random_masks(model, {"0.weight": 0.5, "15.weight": 0.9}, seed=0)
    assert per_layer.keys() == {"0.weight", "15.weight"}
    assert int(per_layer["15.weight"].sum()) == kept_count(2560, 0.1)


def test_random_masks_bad_sparsity():
    model = build_model("conv2", 1, 10, 8)
    with pytest.raises(ValueError, match="sparsity"):
        random_masks(model, 1.0, seed=0)
    with pytest.raises(ValueError, match="unknown layers"):
        random_masks(model, {"9.weight": 0.5}, seed=0)
    with pytest.raises(TypeError, match="sparsity"):
        random_masks(model, "0.8", seed=0)
