"""Connectivity: the fused, streamed measurement against the hook-based reference."""
import pytest
import torch
from torch import nn

from conftest import DEVICES
from mcwt_ext._reference.connectivity import measure_connectivity as reference
from mcwt_ext.connectivity import ActivationStream, measure_connectivity, split_stages
from mcwt_ext.masks import random_masks
from mcwt_ext.models import build_model

pytestmark = pytest.mark.numerics  # compares computation paths (conftest.py)


def _net(device, arch="conv4", seed=0):
    return build_model(arch, in_channels=1, num_classes=10, image_size=8, seed=seed).to(device)


def _data(device, n=37):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_bytes", [0, 1 << 30])  # recompute from the input / cache every stage
def test_matches_hook_reference(device, cache_bytes):
    model, x = _net(device), _data(device)
    masks = {k: v.to(device) for k, v in random_masks(model, 0.7, seed=3).items()}
    got = measure_connectivity(model, masks, x, batch_size=10, cache_bytes=cache_bytes)
    want = reference(model, masks, x)
    assert got.keys() == want.keys() and len(got) == 6
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)


def test_generic_stages_match_reference():
    """A user's net whose stages the fused ops do not cover goes module by module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Conv2d(4, 5, 1, bias=False),
                          nn.ReLU(), nn.Flatten(), nn.Linear(5 * 3 * 3, 7), nn.Sigmoid(), nn.Linear(7, 3))
    x = torch.randn(20, 2, 8, 8)
    masks = random_masks(model, 0.5, seed=0)
    assert [s.fused_kind() for s in split_stages(model)] == [None, "conv", None, None]
    got, want = measure_connectivity(model, masks, x), reference(model, masks, x)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)


def test_max_samples_and_input_forms():
    model, x = _net("cpu"), _data("cpu", 50)
    masks = random_masks(model, 0.5, seed=0)
    want = reference(model, masks, x[:20])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(50)), batch_size=7)
    for data in (x, loader, [(b, None) for b in x.split(9)]):
        got = measure_connectivity(model, masks, data, max_samples=20)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)


def test_greedy_order_layer1_mask_changes_layer2_connectivity():
    model, x = _net("cpu"), _data("cpu")
    first = "0.weight"
    stream_a = ActivationStream(model, x)
    stream_b = ActivationStream(model, x)
    mask_a = torch.ones_like(model[0].weight, dtype=torch.bool)
    mask_b = mask_a.clone()
    mask_b[: mask_b.shape[0] // 2] = False  # prune half of layer 1's output channels
    g_a, g_b = stream_a.advance(mask_a), stream_b.advance(mask_b)
    second = "2.weight"  # the next prunable layer: its connectivity is what advance() measured
    torch.testing.assert_close(g_a, reference(model, {first: mask_a}, x)[second], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_b, reference(model, {first: mask_b}, x)[second], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(g_a, g_b)
    assert torch.all(g_b[: mask_b.shape[0] // 2] == 0)  # dead channels: relu(0 + zero bias) = 0


def test_errors():
    model = _net("cpu")
    with pytest.raises(ValueError, match="data"):
        measure_connectivity(model, {}, torch.rand(4, 3, 8, 8))  # 3 channels into a 1-channel net
    with pytest.raises(ValueError, match="max_samples"):
        measure_connectivity(model, {}, _data("cpu"), max_samples=0)
    with pytest.raises(ValueError, match="no samples"):
        measure_connectivity(model, {}, torch.rand(0, 1, 8, 8))
    with pytest.raises(ValueError, match="forward"):  # not callable: no forward pass to hook
        measure_connectivity(nn.ModuleList([nn.Linear(2, 2)]), {}, torch.rand(3, 2))
    with pytest.raises(ValueError, match="'9.weight'"):
        measure_connectivity(model, {"9.weight": torch.ones(1, dtype=torch.bool)}, _data("cpu"))
    stream = ActivationStream(model, _data("cpu"))
    with pytest.raises(ValueError, match="shape"):
        stream.advance(torch.ones(3, 3, dtype=torch.bool))
