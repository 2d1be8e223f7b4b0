import math

import pytest
import torch
from torch import nn

from conftest import DEVICES
from mcwt_ext.models import ARCHS, build_model, build_model_from_config, count_weights


@pytest.mark.parametrize("arch,weights", [("conv2", 4_300_992), ("conv4", 2_425_024), ("conv6", 2_261_184)])
def test_weight_counts_match_the_protocol(arch, weights):
    assert count_weights(build_model(arch)) == weights


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_flat_sequential_of_standard_modules(arch):
    model = build_model(arch)
    assert type(model) is nn.Sequential
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == list(ARCHS[arch].conv_widths)
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    kinds = [type(m).__name__ for m in model]
    # conv, ReLU, conv, ReLU, 2x2 max-pool per pair; then Flatten and three Linear layers
    body = kinds[:kinds.index("Flatten")]
    assert body == ["Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d"] * (len(convs) // 2)
    assert all(m.kernel_size == 2 for m in model if isinstance(m, nn.MaxPool2d))
    head = kinds[kinds.index("Flatten"):]
    assert head == ["Flatten", "Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [256, 256, 10]


def test_glorot_normal_weights_and_zero_biases():
    model = build_model("conv2", seed=3)
    w = model[6].weight  # 16384 -> 256 linear: 4M draws, the std is tight
    assert w.std().item() == pytest.approx(math.sqrt(2.0 / (16384 + 256)), rel=0.01)
    assert abs(w.mean().item()) < 1e-4
    for m in model:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert torch.count_nonzero(m.bias) == 0


def test_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = build_model("conv4", seed=7), build_model("conv4", seed=7), build_model("conv4", seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    for (_, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a[0].weight, c[0].weight)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_builds_for_digits_sized_input(arch, device):
    model = build_model(arch, in_channels=1, num_classes=10, image_size=8).to(device)
    assert model(torch.randn(5, 1, 8, 8, device=device)).shape == (5, 10)


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="arch"):
        build_model("conv8")
    with pytest.raises(ValueError, match="image_size"):
        build_model("conv6", image_size=4)
    with pytest.raises(ValueError, match="in_channels"):
        build_model("conv2", in_channels=0)
    with pytest.raises(TypeError, match="seed"):
        build_model("conv2", seed=1.5)


def test_build_from_a_run_config():
    cfg = dict(arch="conv2", in_channels=1, num_classes=10, image_size=8, seed=4, dataset="digits")
    a, b = build_model_from_config(cfg), build_model("conv2", 1, 10, 8, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="seed"):
        build_model_from_config({k: v for k, v in cfg.items() if k != "seed"})
