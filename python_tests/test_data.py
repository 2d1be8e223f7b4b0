import os
import pickle

import numpy as np
import pytest
import torch

from mcwt_ext.data import _split, load_dataset


def test_digits_sizes_shape_and_normalisation():
    ds = load_dataset("digits")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1350, 150, 297)
    assert (ds.in_channels, ds.image_size, ds.num_classes) == (1, 8, 10)
    x = ds.train.tensors[0]
    assert x.shape == (1350, 1, 8, 8) and x.dtype == torch.float32
    assert x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert x.std(correction=0).item() == pytest.approx(1.0, abs=1e-4)
    assert ds.train.tensors[1].dtype == torch.int64
    assert set(ds.test.tensors[1].tolist()) == set(range(10))


def test_split_is_seeded_disjoint_and_covers_the_training_images():
    a, b = load_dataset("synthetic", split_seed=1), load_dataset("synthetic", split_seed=1)
    c = load_dataset("synthetic", split_seed=2)
    assert torch.equal(a.val.tensors[0], b.val.tensors[0]) and torch.equal(a.train.tensors[1], b.train.tensors[1])

    # compare raw (un-normalised) images: each split normalises with its own train statistics
    def raw(ds, split):
        mean, std = torch.tensor(ds.mean)[:, None, None], torch.tensor(ds.std)[:, None, None]
        return (getattr(ds, split).tensors[0] * std + mean).flatten(1)

    def matches(x, y):  # how many rows of x have a copy in y
        dist = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
        return int((dist.min(dim=1).values < 1e-3).sum())

    tr, va = raw(a, "train"), raw(a, "val")
    assert (len(tr), len(va)) == (450, 50) and matches(va, tr) == 0
    pool_a, pool_c = torch.cat([tr, va]), torch.cat([raw(c, "train"), raw(c, "val")])
    assert matches(pool_c, pool_a) == 500
    assert matches(raw(c, "val"), va) < 50
    assert torch.allclose(raw(a, "test"), raw(c, "test"), atol=1e-5)  # the test set does not move


def test_split_sizes_for_cifar_scale():
    train, val = _split(50_000, None, split_seed=0)
    assert len(train) == 45_000 and len(val) == 5_000
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(50_000))
    assert torch.equal(_split(50_000, None, 0)[1], val)
    assert not torch.equal(_split(50_000, None, 1)[1], val)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dataset"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="data_root"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("synthetic", val_size=500)
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("synthetic", val_size=0)


# --- CIFAR-10 in the standard layout, written by the test ----------------------------------------

def _write_batch(path, data, labels, str_keys=False):
    batch = {b"batch_label": b"test", b"data": data, b"labels": labels,
             b"filenames": [b"x.png"] * len(labels)}
    if str_keys:
        batch = {k.decode(): v for k, v in batch.items()}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


@pytest.fixture
def tiny_cifar(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (12, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, 12)]
        _write_batch(folder / name, data, labels, str_keys=i == 2)
        batches[name] = (data, labels)
    return tmp_path, batches


def test_cifar_loader_reads_the_standard_layout(tiny_cifar):
    root, batches = tiny_cifar
    ds = load_dataset("cifar10", root, val_size=6)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (54, 6, 12)
    assert (ds.in_channels, ds.image_size, ds.num_classes) == (3, 32, 10)
    # test images: 1024 red values, then green, then blue, row-major
    data, labels = batches["test_batch"]
    mean, std = torch.tensor(ds.mean)[:, None, None], torch.tensor(ds.std)[:, None, None]
    pixels = (ds.test.tensors[0] * std + mean) * 255
    assert torch.allclose(pixels, torch.from_numpy(data.reshape(12, 3, 32, 32)).float(), atol=1e-3)
    assert ds.test.tensors[1].tolist() == labels
    all_labels = sorted(sum((batches[f"data_batch_{j}"][1] for j in range(1, 6)), []))
    assert sorted(ds.train.tensors[1].tolist() + ds.val.tensors[1].tolist()) == all_labels
    # data_root may also be the cifar-10-batches-py folder itself
    again = load_dataset("cifar10", root / "cifar-10-batches-py", val_size=6)
    assert torch.equal(again.train.tensors[0], ds.train.tensors[0])


def test_cifar_missing_files_say_where_to_put_them(tiny_cifar):
    root, _ = tiny_cifar
    os.unlink(root / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(FileNotFoundError, match="test_batch.*cifar-10-batches-py"):
        load_dataset("cifar10", root, val_size=6)


@pytest.mark.parametrize("data,labels,match", [
    (np.zeros((12, 3071), np.uint8), [0] * 12, "shape"),
    (np.zeros((12, 3072), np.float32), [0] * 12, "uint8"),
    (np.zeros((12, 3072), np.uint8), [0] * 11, "labels"),
    (np.zeros((12, 3072), np.uint8), [0] * 11 + [10], "0..9"),
    (np.zeros((12, 3072), np.uint8), [-1] + [0] * 11, "0..9"),
])
def test_cifar_bad_batches_are_refused(tiny_cifar, data, labels, match):
    root, _ = tiny_cifar
    _write_batch(root / "cifar-10-batches-py" / "data_batch_3", data, labels)
    with pytest.raises(ValueError, match=match):
        load_dataset("cifar10", root, val_size=6)


def test_cifar_unexpected_keys_are_refused(tiny_cifar):
    root, _ = tiny_cifar
    with open(root / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((12, 3072), np.uint8), b"labels": [0] * 12, b"extra": 1}, f)
    with pytest.raises(ValueError, match="extra"):
        load_dataset("cifar10", root, val_size=6)


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_cifar_pickle_cannot_run_code(tiny_cifar):
    root, _ = tiny_cifar
    victim = root / "created_by_pickle"
    with open(root / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Exploit(str(victim)), b"labels": [0]}, f)
    with pytest.raises(ValueError, match="refusing"):
        load_dataset("cifar10", root, val_size=6)
    assert not victim.exists()


@pytest.mark.skipif(not os.environ.get("MCWT_CIFAR_ROOT"), reason="set MCWT_CIFAR_ROOT to the real CIFAR-10")
def test_real_cifar10_split():
    ds = load_dataset("cifar10", os.environ["MCWT_CIFAR_ROOT"])
    assert (len(ds.train), len(ds.val), len(ds.test)) == (45_000, 5_000, 10_000)
    assert torch.bincount(ds.test.tensors[1]).tolist() == [1000] * 10
    assert ds.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=3e-3)
