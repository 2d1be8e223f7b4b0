"""The MCWT chain on digits through the CLI: imp -> fit -> sample (both variants) -> train -> plot."""
import json

import pytest
import torch

from mcwt_ext.cli import main
from mcwt_ext.runs import load_tensors

COMMON = ["--arch", "conv2", "--dataset", "digits", "--seed", "0", "--no-progress"]
SHORT = ["--iterations", "6", "--eval-every", "3"]


@pytest.fixture(scope="module")
def ticket(tmp_path_factory):
    out = tmp_path_factory.mktemp("chain")
    assert main(["imp", *COMMON, *SHORT, "--rates", "conv=0.6,linear=0.6,output=0.6",
                 "--out", str(out / "imp")]) == 0
    assert main(["fit", "--ticket", str(out / "imp"), "--out", str(out / "fit.json")]) == 0
    return out


@pytest.mark.parametrize("variant", [[], ["--no-connectivity"], ["--exact"]])
def test_sample_then_train(ticket, variant, capsys):
    name = "sample" + "".join(v.strip("-") for v in variant)
    out = ticket / name
    assert main(["sample", *COMMON[:-1], "--fit", str(ticket / "fit.json"), "--init",
                 str(ticket / "imp" / "init.safetensors"), *variant, "--out", str(out)]) == 0
    masks = load_tensors(out / "masks.safetensors")
    for mask in masks.values():
        if "--exact" in variant:
            assert int(mask.sum()) == round(0.2 * mask.numel())
        else:
            assert abs(mask.double().mean().item() - 0.2) < 5 * (0.16 / mask.numel()) ** 0.5 + 1e-3
    init = load_tensors(ticket / "imp" / "init.safetensors")
    assert all(torch.equal(init[k], v) for k, v in load_tensors(out / "init.safetensors").items())
    assert main(["train", *COMMON, *SHORT, "--masks", str(out / "masks.safetensors"),
                 "--out", str(ticket / f"{name}_trained")]) == 0
    summary = json.loads((ticket / f"{name}_trained" / "summary.json").read_text())
    assert summary["densities"] == pytest.approx({k: v.double().mean().item() for k, v in masks.items()})


def test_fit_json_has_four_models_and_diagnostics(ticket):
    fit = json.loads((ticket / "fit.json").read_text())
    assert set(fit["models"]) == {"conv", "linear"}
    assert all(set(v) == {"magnitude", "connectivity"} for v in fit["models"].values())
    assert [layer["keep_rate"] for layer in fit["layers"]] == pytest.approx([0.2] * 5, abs=1e-3)


def test_plot(ticket):
    out = ticket / "figs"
    sample = ticket / "sample"
    if not (sample / "masks.safetensors").exists():
        main(["sample", *COMMON[:-1], "--fit", str(ticket / "fit.json"), "--out", str(sample)])
    assert main(["plot", "--ticket", str(ticket / "imp"), "--mcwt", str(sample), "--out", str(out)]) == 0
    for name in ("fig1_initial_weights", "fig2b_connectivity"):
        assert (out / f"{name}.png").stat().st_size > 1000
        numbers = json.loads((out / f"{name}.json").read_text())
        assert numbers["histograms"]


def test_errors(ticket, tmp_path, capsys):
    cases = [
        (["fit", "--ticket", str(tmp_path), "--out", str(tmp_path / "f.json")], "not a run directory"),
        (["sample", *COMMON[:-1], "--fit", str(tmp_path / "none.json"), "--out", str(tmp_path / "s")],
         "is not a file"),
        (["sample", *COMMON[:-1], "--fit", str(ticket / "fit.json"), "--sparsity", "1.5",
          "--out", str(tmp_path / "s")], "not in [0, 1)"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
