import math

import pytest
import torch
from torch import nn

from conftest import DEVICES
from mcwt_ext.masks import layer_kind, prunable_layers
from mcwt_ext.models import ARCHS, build_model, build_model_from_config, count_weights

CONV_ARCHS = sorted(a for a in ARCHS if ARCHS[a].family == "convnet")


@pytest.mark.parametrize("arch,weights", [("conv2", 4_300_992), ("conv4", 2_425_024), ("conv6", 2_261_184)])
def test_weight_counts_match_the_protocol(arch, weights):
    assert count_weights(build_model(arch)) == weights


@pytest.mark.parametrize("arch", CONV_ARCHS)
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


def test_resnet20_weight_count_and_layers():
    """F&C's CIFAR ResNet ("Resnet-18", He et al.'s ResNet-20): 270K conv weights, 1x1 shortcuts."""
    model = build_model("resnet20")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert count_weights(model) == 270_896
    assert sum(c.weight.numel() for c in convs) == 270_256
    assert len(convs) == 1 + 18 + 2 and all(c.bias is None for c in convs)
    assert sorted({c.out_channels for c in convs}) == [16, 32, 64]
    shortcuts = [c for c in convs if c.kernel_size == (1, 1)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in shortcuts] == [(16, 32, (2, 2)), (32, 64, (2, 2))]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 21


@pytest.mark.parametrize("device", DEVICES)
def test_resnet20_forward_shapes(device):
    model = build_model("resnet20", seed=1).to(device)
    assert model(torch.randn(3, 3, 32, 32, device=device)).shape == (3, 10)
    small = build_model("resnet20", in_channels=1, num_classes=7, image_size=8).to(device)
    assert small(torch.randn(2, 1, 8, 8, device=device)).shape == (2, 7)


def test_resnet20_layer_kinds_in_forward_order():
    """IMP's kinds: the first conv first, every other conv (shortcuts too) "conv", fc "output"."""
    model = build_model("resnet20")
    kinds = layer_kind(model, torch.randn(1, 3, 32, 32))
    names = list(kinds)
    assert names[0] == "conv.weight" and names[-1] == "fc.weight" and len(names) == 22
    assert kinds["fc.weight"] == "output"
    assert all(k == "conv" for n, k in kinds.items() if n != "fc.weight")
    assert names.index("blocks.3.conv2.weight") < names.index("blocks.3.shortcut.0.weight") \
        < names.index("blocks.4.conv1.weight")  # forward order: the shortcut runs after conv2
    sparsity = ARCHS["resnet20"].layer_sparsity(kinds, 0.8)
    assert sparsity["fc.weight"] == 0.0 and sparsity["conv.weight"] == 0.8
    assert [f"{n}.weight" for n, _ in prunable_layers(model, torch.randn(1, 3, 32, 32))] == names


def test_resnet20_init_is_seeded_with_fresh_batchnorm_statistics():
    """(Its distributions, open_lth's Kaiming init: test_resnet20.py.)"""
    state = torch.get_rng_state()
    a, b, c = build_model("resnet20", seed=5), build_model("resnet20", seed=5), build_model("resnet20", seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.conv.weight, c.conv.weight)
    for m in a.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert bool((m.running_mean == 0).all() and (m.running_var == 1).all())


def test_resnet20_protocol_schedule():
    """SGD momentum 0.9, batch 128, 30K steps; 0.03 warmed up over 20K, /10 at 20K and 25K."""
    spec = ARCHS["resnet20"]
    assert (spec.optimizer, spec.momentum, spec.batch_size, spec.iterations) == ("sgd", 0.9, 128, 30_000)
    assert spec.lr_at(0) == pytest.approx(0.03 / 20_000)
    assert spec.lr_at(9_999) == pytest.approx(0.015)
    assert spec.lr_at(19_999) == pytest.approx(0.03)
    assert spec.lr_at(20_000) == pytest.approx(0.003)
    assert spec.lr_at(25_000) == pytest.approx(0.0003)
    assert spec.lr_at(29_999, lr=0.1) == pytest.approx(0.001)
    assert spec.lr_factor(19_999) == pytest.approx(1.0)
    conv2 = ARCHS["conv2"]  # Adam at a constant rate
    assert conv2.optimizer == "adam" and conv2.lr_at(0) == conv2.lr_at(19_999) == 2e-4
    with pytest.raises(ValueError, match="step"):
        spec.lr_at(-1)
