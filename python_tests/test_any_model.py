"""The sampler and connectivity on models that are not flat Sequentials (hook stream)."""
import hashlib

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from conftest import DEVICES
from mcwt_ext import sample_masks
from mcwt_ext._reference.connectivity import measure_connectivity as reference
from mcwt_ext.connectivity import HookStream, measure_connectivity, open_stream
from mcwt_ext.data import load_dataset
from mcwt_ext.masks import random_masks
from mcwt_ext.models import build_model
from mcwt_ext.sample import sample_ticket
from test_sample import FIT


def resnet18_32(num_classes=10):
    """torchvision's resnet18 for 32x32 inputs: 3x3 stride-1 first conv, no max-pool."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


@pytest.fixture(scope="module")
def resnet():
    return resnet18_32()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _digest(masks):
    h = hashlib.sha256()
    for k in sorted(masks):
        h.update(k.encode())
        h.update(np.packbits(masks[k].cpu().flatten().numpy()).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.numerics
def test_resnet18_matches_hook_reference(resnet, images):
    """BatchNorm, residual adds, in-place ReLU and adaptive pooling: the reference's one
    full forward pass and the stream's prefix passes give the same means."""
    masks = random_masks(resnet, 0.8, seed=3)
    got = measure_connectivity(resnet, masks, images, batch_size=2)
    want = reference(resnet, masks, images)
    assert list(got) == list(want) and len(got) == 20  # 21 layers: conv1 has no connectivity
    assert list(got)[-1] == "fc.weight" and got["fc.weight"].shape == (512,)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-9)


@pytest.mark.numerics
def test_prefix_cache_gives_the_same_numbers_and_replays(resnet):
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))  # small: the
    masks = random_masks(resnet, 0.5, seed=0)  # uncached walk recomputes every prefix
    uncached = measure_connectivity(resnet, masks, images, batch_size=1, cache_bytes=0)
    stream = open_stream(resnet, images, batch_size=1)
    assert isinstance(stream, HookStream)
    names = [f"{n}.weight" for n, _ in stream.layers]
    for cur, nxt in zip(names, names[1:]):
        assert torch.equal(stream.advance(masks[cur]), uncached[nxt])
    # at the last layer everything before it is replayed from the outermost finished modules
    assert {"conv1", "bn1", "layer1", "layer2", "layer3"} <= set(stream._cache)
    assert not any(n.startswith("layer1.") for n in stream._cache)


@pytest.mark.numerics
def test_generic_path_matches_fused_path_on_conv2(digits):
    model = build_model("conv2", 1, 10, 8, seed=0)
    x = digits.train.tensors[0]
    masks = random_masks(model, 0.8, seed=1)
    fused = measure_connectivity(model, masks, x)
    hooks = measure_connectivity(model, masks, x, fused=False)
    assert list(fused) == list(hooks)
    for name in fused:
        torch.testing.assert_close(hooks[name], fused[name], rtol=1e-6, atol=1e-9)
    a, _ = sample_ticket(model, FIT, x, seed=0)
    b, _ = sample_ticket(model, FIT, x, seed=0, fused=False)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kw,digest", [
    (dict(seed=0), "f0eeaa6d0bd3d852"),
    (dict(seed=3, exact=True), "124a0887c9b48faf"),
    (dict(seed=1, use_connectivity=False), "8948ac6212508902"),
])
@pytest.mark.numerics
def test_conv2_digits_sample_is_unchanged(digits, kw, digest):
    """The masks the fused path drew before the sampler took any nn.Module (the digits table)."""
    model = build_model("conv2", 1, 10, 8, seed=0)
    assert _digest(sample_masks(model, FIT, digits.train.tensors[0], **kw)) == digest


@pytest.mark.parametrize("device", DEVICES)
def test_sample_resnet18(resnet, images, device):
    model = resnet.to(device)
    bn_state = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    masks, draws = sample_ticket(model, FIT, images.to(device), sparsity=0.8, exact=True, seed=2,
                                 batch_size=2)
    assert model.training and all(m.training for m in model.modules())  # mode restored
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in bn_state.items())  # stats untouched
    assert list(masks)[:3] == ["conv1.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight"]
    assert list(masks)[-1] == "fc.weight" and len(masks) == 21
    assert "layer2.0.downsample.0.weight" in masks
    assert [d.kind for d in draws][-1] == "output"
    for name, mask in masks.items():
        assert mask.device.type == device and int(mask.sum()) == round(0.2 * mask.numel()), name
    resnet.to("cpu")


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.a(self.a(x)))


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_errors_name_the_layer():
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"'a'.*reached more than once"):
        sample_masks(_Twice(), FIT, x)
    with pytest.raises(ValueError, match="'a' and 'b' share one weight"):
        sample_masks(_Shared(), FIT, x)
    with pytest.raises(ValueError, match="Sequential has no prunable"):
        sample_masks(nn.Sequential(nn.ReLU(), nn.Flatten()), FIT, x)
    with pytest.raises(ValueError, match="never called"):
        measure_connectivity(_WithUnused(), {}, x)
    with pytest.raises(ValueError, match="nope.weight"):
        sample_masks(resnet18_32(), FIT, torch.randn(2, 3, 32, 32), sparsity={"nope.weight": 0.5})
    with pytest.raises(ValueError, match="data"):
        sample_masks(resnet18_32(), FIT, torch.randn(2, 1, 32, 32))


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.unused = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(2, 2)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.numerics
def test_linear_on_sequences_averages_over_all_but_the_feature_dim():
    """A Linear's input features are its last dim, whatever the rank of its input."""
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 2))  # LayerNorm: hook path
    x = torch.randn(4, 7, 3)
    got = measure_connectivity(model, {}, x)
    want = nn.functional.layer_norm(model[0](x), (5,), model[1].weight, model[1].bias).double().mean((0, 1))
    torch.testing.assert_close(got["2.weight"], want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("fused", [True, False])
def test_dropout_is_off_while_measuring(fused):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    x = torch.rand(30, 6)
    got = measure_connectivity(model, {}, x, fused=fused)["3.weight"]
    torch.testing.assert_close(got, torch.relu(model[0](x)).detach().double().mean(0), rtol=1e-6, atol=1e-9)
    assert model.training and model[2].training
