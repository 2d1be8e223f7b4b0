"""Issue 12's commands end to end on synthetic data: prune, ablate, fit --granularity/--device,
and sampling from the fit of another seed's ticket."""
import json

import pytest
import torch

from conftest import DEVICES
from mcwt_ext.cli import main
from mcwt_ext.masks import kept_count
from mcwt_ext.runs import RunDir, load_tensors

COMMON = ["--arch", "conv2", "--dataset", "synthetic", "--no-progress"]
SHORT = ["--iterations", "4", "--eval-every", "2"]


@pytest.fixture(scope="module")
def ticket(tmp_path_factory):
    """A seed-0 IMP ticket and its fit; tests read them, none writes them."""
    out = tmp_path_factory.mktemp("methods")
    assert main(["imp", *COMMON, "--seed", "0", *SHORT, "--rates", "conv=0.6,linear=0.6,output=0.6",
                 "--out", str(out / "imp")]) == 0
    assert main(["fit", "--ticket", str(out / "imp"), "--out", str(out / "fit.json")]) == 0
    return out


def _exact_counts(masks, sparsity=0.8):
    for name, mask in masks.items():
        assert int(mask.sum()) == kept_count(mask.numel(), 1 - sparsity), name


@pytest.mark.parametrize("method", ["magnitude", "snip", "grasp", "synflow"])
def test_prune_trains_and_records_its_time(method, tmp_path):
    out = tmp_path / "run"
    assert main(["prune", *COMMON, *SHORT, "--method", method, "--out", str(out)]) == 0
    rd = RunDir(out)
    assert rd.done() and rd.load_json(RunDir.CONSTRUCTION)["wall_time_s"] > 0
    _exact_counts(load_tensors(rd.masks_path))
    config = rd.load_json(RunDir.CONFIG)
    assert (config["prune_method"], config["allocation"]) == (method, "layer")
    assert main(["prune", *COMMON, *SHORT, "--method", method, "--out", str(out)]) == 0  # resumes


def test_prune_global_no_train(tmp_path):
    out = tmp_path / "run"
    assert main(["prune", *COMMON, "--method", "magnitude", "--allocation", "global", "--sparsity", "0.5",
                 "--no-train", "--out", str(out)]) == 0
    masks = load_tensors(RunDir(out).masks_path)
    kept, total = sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values())
    assert abs(kept - total / 2) <= len(masks)
    assert not RunDir(out).exists(RunDir.SUMMARY)


def test_prune_refuses_bad_method(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", *COMMON, "--method", "nope", "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and "--method" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["shuffle-mask", "reinit", "shuffle-values"])
def test_ablate_trains_like_a_ticket(ticket, kind, tmp_path):
    out = tmp_path / "run"
    assert main(["ablate", "--ticket", str(ticket / "imp"), "--kind", kind, *SHORT, "--no-progress",
                 "--out", str(out)]) == 0
    rd = RunDir(out)
    assert rd.done()
    wt_masks, wt_init = load_tensors(ticket / "imp" / "masks.safetensors"), load_tensors(ticket / "imp" / "init.safetensors")
    masks, init = load_tensors(rd.masks_path), load_tensors(rd.init_path)
    for name, m in wt_masks.items():
        assert int(masks[name].sum()) == int(m.sum())  # same per-layer density
        same_mask = torch.equal(masks[name], m)
        assert same_mask == (kind != "shuffle-mask")
        if kind == "shuffle-values":
            assert torch.equal(init[name][m].sort().values, wt_init[name][m].sort().values)
        assert torch.equal(init[name], wt_init[name]) == (kind == "shuffle-mask")
    assert rd.load_json(RunDir.CONFIG)["ablation_seed"] == (10_000 if kind == "reinit" else 0)


@pytest.mark.parametrize("granularity", ["kind", "layer", "pooled-raw"])
@pytest.mark.parametrize("device", DEVICES)
def test_fit_granularity_and_device(ticket, granularity, device, tmp_path):
    out = tmp_path / "fit.json"
    assert main(["fit", "--ticket", str(ticket / "imp"), "--granularity", granularity, "--device", device,
                 "--out", str(out)]) == 0
    fit = json.loads(out.read_text())
    groups = set(fit["models"])
    if granularity == "layer":
        assert groups == {layer["name"] for layer in fit["layers"]}
    else:
        assert groups == {"conv", "linear"}


def test_sample_from_another_seeds_fit(ticket, tmp_path):
    """One fit, many tickets: seed 1's net sampled from seed 0's fit keeps its own initial weights."""
    out = tmp_path / "sample"
    assert main(["sample", "--arch", "conv2", "--dataset", "synthetic", "--seed", "1", "--fit",
                 str(ticket / "fit.json"), "--exact", "--out", str(out)]) == 0
    rd = RunDir(out)
    _exact_counts(load_tensors(rd.masks_path))
    assert not torch.equal(load_tensors(rd.init_path)["0.weight"],
                           load_tensors(ticket / "imp" / "init.safetensors")["0.weight"])
    assert main(["train", *COMMON, "--seed", "1", *SHORT, "--masks", str(rd.masks_path),
                 "--out", str(tmp_path / "trained")]) == 0
