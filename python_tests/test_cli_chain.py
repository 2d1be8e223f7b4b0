"""The MCWT chain on digits through the CLI: imp -> fit -> sample (both variants) -> train -> plot."""
import json

import numpy as np
import pytest
import torch

from mcwt_ext.cli import main
from mcwt_ext.runs import RunDir, load_tensors

COMMON = ["--arch", "conv2", "--dataset", "digits", "--seed", "0", "--no-progress"]
SHORT = ["--iterations", "6", "--eval-every", "3"]


@pytest.fixture(scope="module")
def ticket(tmp_path_factory):
    """An IMP ticket, its fit and one default sample; every test reads these, none writes them."""
    out = tmp_path_factory.mktemp("chain")
    assert main(["imp", *COMMON, *SHORT, "--rates", "conv=0.6,linear=0.6,output=0.6",
                 "--out", str(out / "imp")]) == 0
    assert main(["fit", "--ticket", str(out / "imp"), "--out", str(out / "fit.json")]) == 0
    assert main(["sample", *COMMON[:-1], "--fit", str(out / "fit.json"), "--out", str(out / "sample")]) == 0
    return out


@pytest.mark.parametrize("variant", [[], ["--no-connectivity"], ["--exact"]])
def test_sample_then_train(ticket, variant, tmp_path):
    out = tmp_path / "sample"
    assert main(["sample", *COMMON[:-1], "--fit", str(ticket / "fit.json"), "--init",
                 str(ticket / "imp" / "init.safetensors"), *variant, "--out", str(out)]) == 0
    assert RunDir(out).load_json("config.json")["use_connectivity"] == ("--no-connectivity" not in variant)
    masks = load_tensors(out / "masks.safetensors")
    for mask in masks.values():
        if "--exact" in variant:
            assert int(mask.sum()) == round(0.2 * mask.numel())
        else:
            assert abs(mask.double().mean().item() - 0.2) < 5 * (0.16 / mask.numel()) ** 0.5 + 1e-3
    init = load_tensors(ticket / "imp" / "init.safetensors")
    assert all(torch.equal(init[k], v) for k, v in load_tensors(out / "init.safetensors").items())
    assert main(["train", *COMMON, *SHORT, "--masks", str(out / "masks.safetensors"),
                 "--out", str(tmp_path / "trained")]) == 0
    summary = json.loads((tmp_path / "trained" / "summary.json").read_text())
    assert summary["densities"] == pytest.approx({k: v.double().mean().item() for k, v in masks.items()})


def test_fit_json_has_four_models_and_diagnostics(ticket):
    fit = json.loads((ticket / "fit.json").read_text())
    assert set(fit["models"]) == {"conv", "linear"}
    assert all(set(v) == {"magnitude", "connectivity"} for v in fit["models"].values())
    assert [layer["keep_rate"] for layer in fit["layers"]] == pytest.approx([0.2] * 5, abs=1e-3)


def test_plot(ticket, tmp_path):
    out = tmp_path / "figs"
    assert main(["plot", "--ticket", str(ticket / "imp"), "--mcwt", str(ticket / "sample"),
                 "--out", str(out)]) == 0
    fig1 = json.loads((out / "fig1_initial_weights.json").read_text())
    fig2b = json.loads((out / "fig2b_connectivity.json").read_text())
    assert (out / "fig1_initial_weights.png").stat().st_size > 1000
    assert (out / "fig2b_connectivity.png").stat().st_size > 1000
    bins = np.asarray(fig1["bins"])
    width, centre = np.diff(bins), (bins[1:] + bins[:-1]) / 2
    assert set(fig1["histograms"]) == {"conv", "linear"}
    for kind, per in fig1["histograms"].items():
        assert set(per) == {"dense", "WT", "MCWT"}  # Fig. 1: no random
        tail = {m: float(np.sum((np.asarray(h) * width)[np.abs(centre) > 1])) for m, h in per.items()}
        # the paper's Fig. 1: tickets (and samples fitted to them) keep large initial weights
        assert tail["WT"] > tail["dense"] and tail["MCWT"] > tail["dense"], (kind, tail)
    assert set(fig2b["histograms"]) == {"conv", "linear"}
    for kind, per in fig2b["histograms"].items():
        assert set(per) == {"WT", "MCWT", "random"}
        assert all(float(np.dot(h, np.diff(fig2b["bins"]))) == pytest.approx(1.0) for h in per.values())


def test_errors(ticket, tmp_path, capsys):
    cases = [
        (["fit", "--ticket", str(tmp_path), "--out", str(tmp_path / "f.json")], "not a run directory"),
        (["sample", *COMMON[:-1], "--fit", str(tmp_path / "none.json"), "--out", str(tmp_path / "s")],
         "is not a file"),
        (["sample", *COMMON[:-1], "--fit", str(ticket / "fit.json"), "--sparsity", "1.5",
          "--out", str(tmp_path / "s")], "must lie in [0, 1)"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
