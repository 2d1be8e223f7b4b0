"""The run layer: one identity check, one save-or-check of tensors, load_ticket."""
import pytest
import torch

from conftest import synthetic_model
from mcwt_ext.masks import random_masks
from mcwt_ext.runs import RunDir, check_identity, grid_cell, load_ticket, round_name, snapshot_name

CONFIG = dict(command="train", arch="conv2", dataset="synthetic", in_channels=3, image_size=8,
              num_classes=10, seed=0, data_root=None, train=dict(lr=0.1, iterations=4, device="cpu"))


def test_open_creates_then_resumes_the_same_run(tmp_path):
    rd = RunDir.open(tmp_path / "run", CONFIG)
    assert rd.load_json(RunDir.CONFIG) == CONFIG
    moved = {**CONFIG, "data_root": "/elsewhere", "train": {**CONFIG["train"], "device": "cuda:1"}}
    RunDir.open(tmp_path / "run", moved)  # runtime keys may change, and take their new values
    assert rd.load_json(RunDir.CONFIG)["train"]["device"] == "cuda:1"


def test_open_refuses_another_run_naming_every_difference(tmp_path):
    RunDir.open(tmp_path, CONFIG)
    other = {**CONFIG, "seed": 1, "train": {**CONFIG["train"], "lr": 0.2}, "extra": True}
    with pytest.raises(ValueError) as e:
        RunDir.open(tmp_path, other)
    msg = str(e.value)
    assert "seed 0 there, 1 now" in msg and "train.lr 0.1 there, 0.2 now" in msg
    assert "extra None there, True now" in msg and "config.json" in msg


def test_open_adds_or_keeps_an_optional_step(tmp_path):
    """A run of masks only (``train`` None, --no-train) resumes into its training, and a rerun of masks
    only keeps the training it has; the step's settings and the other keys are still compared."""
    masks_only = {**CONFIG, "train": None}
    RunDir.open(tmp_path, masks_only, optional=("train",))
    RunDir.open(tmp_path, CONFIG, optional=("train",))
    RunDir.open(tmp_path, masks_only, optional=("train",))
    assert RunDir(tmp_path).load_json(RunDir.CONFIG) == CONFIG
    with pytest.raises(ValueError, match="train.lr 0.1 there, 0.2 now"):
        RunDir.open(tmp_path, {**CONFIG, "train": {**CONFIG["train"], "lr": 0.2}}, optional=("train",))
    with pytest.raises(ValueError, match="seed 0 there, 1 now"):
        RunDir.open(tmp_path, {**masks_only, "seed": 1}, optional=("train",))
    with pytest.raises(ValueError, match="train.lr 0.1 there, None now"):
        RunDir.open(tmp_path, masks_only)  # not optional: another run


def test_check_identity_mutable_keys():
    check_identity({"a": 1, "archs": ["conv2"]}, {"a": 1, "archs": ["conv4"]}, "x", mutable={"archs"})
    with pytest.raises(ValueError, match="archs"):
        check_identity({"a": 1, "archs": ["conv2"]}, {"a": 1, "archs": ["conv4"]}, "x")


def test_save_or_check_tensors(tmp_path):
    rd = RunDir(tmp_path)
    a = {"w": torch.arange(4.0)}
    rd.save_or_check_tensors("t.safetensors", a, "weights")
    rd.save_or_check_tensors("t.safetensors", {"w": torch.arange(4.0)}, "weights")  # the same: fine
    with pytest.raises(ValueError, match="holds other weights"):
        rd.save_or_check_tensors("t.safetensors", {"w": torch.ones(4)}, "weights")
    with pytest.raises(ValueError, match="holds other weights"):
        rd.save_or_check_tensors("t.safetensors", {"v": torch.arange(4.0)}, "weights")


def test_load_ticket_rebuilds_the_model_at_init(tmp_path):
    model = synthetic_model(seed=3)
    masks = random_masks(model, 0.5, seed=0)
    rd = RunDir.open(tmp_path, {**CONFIG, "seed": 3})
    with pytest.raises(FileNotFoundError, match="init.safetensors does not exist"):
        load_ticket(tmp_path)
    rd.save_tensors(RunDir.INIT, model.state_dict())
    with pytest.raises(ValueError, match="masks.safetensors"):
        load_ticket(tmp_path)
    rd.save_tensors(RunDir.MASKS, masks)
    ticket = load_ticket(tmp_path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ticket.model.state_dict().items())
    assert all(torch.equal(v, masks[k]) for k, v in ticket.masks.items())
    with pytest.raises(ValueError, match="not a run directory"):
        load_ticket(tmp_path / "nothing")
    rd.save_tensors(RunDir.MASKS, {k: v.float() for k, v in masks.items()})
    with pytest.raises(ValueError, match="bool"):
        load_ticket(tmp_path)


def test_names():
    assert snapshot_name(12) == "weights_000012.safetensors" and round_name(3) == "round_03"
    assert grid_cell("/g", "conv2", 1, "imp").path.as_posix() == "/g/conv2/seed_1/imp"
