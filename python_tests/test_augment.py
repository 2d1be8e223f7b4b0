"""Training-batch augmentation (issue 19: F&C and open_lth train ResNet-20 on flipped, padded and
cropped images): the transform against a hand-made reference, draws that depend on (seed,
iteration) alone, a kill-resume that stays bit-identical, and where it is on by default."""
import numpy as np
import pytest
import torch

from conftest import synthetic_model
from test_train import _same_weights, kill_then_resume
from mcwt_ext.augment import PAD, Augment, flip_crop
from mcwt_ext.lockstep import PackNet, train_pack
from mcwt_ext.masks import random_masks
from mcwt_ext.runs import RunDir
from mcwt_ext.train import TrainConfig, train


def _reference(x, flip, dy, dx, fill):
    """open_lth's order on one image at a time: flip, pad with ``fill``, crop at (dy, dx)."""
    out = []
    for img, f, i, j in zip(x.numpy(), flip.tolist(), dy.tolist(), dx.tolist()):
        img = img[:, :, ::-1] if f else img
        c, h, w = img.shape
        padded = np.broadcast_to(fill.numpy()[:, None, None], (c, h + 2 * PAD, w + 2 * PAD)).copy()
        padded[:, PAD:PAD + h, PAD:PAD + w] = img
        out.append(padded[:, i:i + h, j:j + w])
    return torch.from_numpy(np.stack(out))


def test_flip_crop_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 8, 8, generator=g)
    flip = torch.arange(40) % 2 == 0
    dy, dx = torch.arange(40) % 9, (torch.arange(40) // 3) % 9  # every offset, flipped or not
    fill = torch.tensor([-1.5, 0.25, 2.0])
    assert torch.equal(flip_crop(x, flip, dy, dx, fill), _reference(x, flip, dy, dx, fill))
    centre = torch.full((40,), PAD)
    assert torch.equal(flip_crop(x, torch.zeros(40, dtype=torch.bool), centre, centre, fill), x)
    assert torch.equal(flip_crop(x, torch.ones(40, dtype=torch.bool), centre, centre, fill), x.flip(-1))


def test_draws_depend_on_seed_and_iteration_only():
    a, b, c = (Augment("flip-crop", s, 4000, (0.5,), (0.25,)) for s in (3, 3, 4))
    for it in (0, 7):
        assert all(torch.equal(p, q) for p, q in zip(a.draws(it), b.draws(it)))
    assert not torch.equal(a.draws(0)[1], c.draws(0)[1]) and not torch.equal(a.draws(0)[1], a.draws(1)[1])
    flip, dy, dx = a.draws(0)
    # fair flips and every offset 0..8: 4000 draws, 5 sigma of a binomial share
    assert abs(flip.float().mean().item() - 0.5) < 5 * (0.25 / 4000) ** 0.5
    assert set(dy.tolist()) == set(dx.tolist()) == set(range(2 * PAD + 1))
    assert torch.equal(a.fill, torch.tensor([-2.0]))  # black: (0 - mean) / std
    x = torch.randn(4000, 1, 8, 8)
    assert torch.equal(Augment("none", 3, 4000, (0.5,), (0.25,))(x, 0), x)
    # a torchrun rank augments its slice of the global batch as the whole batch would be
    whole = a(x, 5)
    assert torch.equal(torch.cat([a(x[r * 1000:(r + 1) * 1000], 5, (r, 4)) for r in range(4)]), whole)


def _cfg(**kw):
    return TrainConfig(**{**dict(iterations=12, lr=1e-3, eval_every=3, checkpoint_every=4,
                                 augment="flip-crop"), **kw})


def test_augmented_training_resumes_bit_identically(synthetic, tmp_path, monkeypatch):
    masks = random_masks(synthetic_model(), 0.5, seed=0)
    whole = synthetic_model()
    train(whole, synthetic, masks, _cfg(), tmp_path / "whole", progress=False)
    plain = synthetic_model()
    train(plain, synthetic, masks, _cfg(augment="none"), progress=False)
    assert not _same_weights(whole, plain)  # the augmentation is applied
    resumed, _ = kill_then_resume(  # after the checkpoint at 8
        monkeypatch, 10, lambda m, out: train(m, synthetic, masks, _cfg(), out, progress=False), tmp_path / "killed")
    assert _same_weights(whole, resumed)
    assert RunDir(tmp_path / "killed").load_json("summary.json")["config"]["augment"] == "flip-crop"
    with pytest.raises(ValueError, match="augment"):  # another augmentation is another run
        train(synthetic_model(), synthetic, masks, _cfg(augment="none"), tmp_path / "whole", progress=False)


def test_packs_refuse_augmentation(synthetic):
    net = PackNet(synthetic_model(), None, _cfg(iterations=2, checkpoint_every=0))
    with pytest.raises(ValueError, match="augment"):
        train_pack([net], synthetic, progress=False)


def test_defaults_per_architecture():
    assert TrainConfig.for_arch("resnet20").augment == "flip-crop"
    assert all(TrainConfig.for_arch(a).augment == "none" for a in ("conv2", "conv4", "conv6"))
    assert TrainConfig.for_arch("resnet20", augment="none").augment == "none"
    with pytest.raises(ValueError, match="augment"):
        _cfg(augment="mixup")
