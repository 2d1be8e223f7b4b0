"""ERK distribution of the target sparsity (issue 21, item 2): a hand-computed case, exact total
counts, the uniform default unchanged, and `--distribution` through random, prune and sample."""
import math

import pytest
import torch
from torch import nn

from mcwt_ext.cli import main
from mcwt_ext.distribution import erk_counts, erk_densities, layer_sparsity
from mcwt_ext.masks import kept_count, random_masks
from mcwt_ext.models import arch_sparsity, build_model
from mcwt_ext.prune_at_init import prune_at_init
from mcwt_ext.runs import RunDir, load_tensors

MODEL = ["--arch", "conv2", "--dataset", "synthetic", "--quiet"]

# Three pooled layers (forward order): a 10x10 Linear, a 2x50 Linear, an 8x4x3x3 conv.
SHAPES = {"a": (10, 10), "b": (2, 50), "c": (8, 4, 3, 3)}


def test_erk_equals_a_hand_computed_case():
    """At sparsity 0.5 the uniform total is 50 + 50 + 144 = 244 weights.

    ERK's raw shares sum(shape) / prod(shape): a 20/100 = 0.2, b 52/100 = 0.52, c 18/288 = 0.0625;
    eps = 244 / (0.2*100 + 0.52*100 + 0.0625*288) = 244 / 90, and eps * 0.52 = 1.41 > 1: b is
    kept dense (100 weights) and eps solved again over a and c: eps = (244 - 100) / (20 + 18) =
    144 / 38. Then a keeps 0.2*100*144/38 = 75.79 and c 0.0625*288*144/38 = 68.21 weights: floors
    75 + 68 = 143, one short of 144, and the larger fraction (a's .79) takes it: 76 and 68.
    """
    assert 244 / 90 * 0.52 > 1 and 144 / 38 * 0.2 <= 1
    assert (math.floor(20 * 144 / 38), math.floor(18 * 144 / 38)) == (75, 68)
    assert erk_counts(SHAPES, 244) == {"a": 76, "b": 100, "c": 68}
    assert erk_densities(SHAPES, dict.fromkeys(SHAPES, 0.5)) == {"a": 0.76, "b": 1.0, "c": 68 / 288}


def test_erk_through_a_model_keeps_the_first_layer_dense():
    """The hand-computed layers behind a first conv, which stays dense and counts towards the total
    (issue 28: the net keeps what uniform keeps, 18 + 244 = 262, so the pool keeps 262 - 36 = 226);
    b as a 2 -> 50 Linear (its weight 50x2: the same size and raw share).

    eps = 226 / 90 and eps * 0.52 = 1.31 > 1: b dense (100), eps = 126 / 38; a keeps
    0.2*100*126/38 = 66.32 and c 0.0625*288*126/38 = 59.68: floors 66 + 59 = 125, one short of
    126, and c's larger fraction (.68) takes it: 66 and 60. Negative control: uniform gives every
    layer 0.5."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False),   # first: dense
                          nn.Conv2d(4, 8, 3, padding=1, bias=False),   # c
                          nn.Flatten(), nn.AdaptiveAvgPool1d(2),
                          nn.Linear(2, 50, bias=False),                # b
                          nn.AdaptiveAvgPool1d(10),
                          nn.Linear(10, 10, bias=False))               # a
    x = torch.zeros(1, 1, 5, 5)
    sparsity = layer_sparsity("conv2", model, x, 0.5, "erk")
    assert list(sparsity) == ["0.weight", "1.weight", "4.weight", "6.weight"]
    assert 226 / 90 * 0.52 > 1 and 126 / 38 * 0.2 <= 1
    assert (math.floor(20 * 126 / 38), math.floor(18 * 126 / 38)) == (66, 59)
    assert {n: kept_count(model.get_parameter(n).numel(), 1 - s) for n, s in sparsity.items()} == \
        {"0.weight": 36, "1.weight": 60, "4.weight": 100, "6.weight": 66}
    assert layer_sparsity("conv2", model, x, 0.5) == 0.5


@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.8, 0.95, 0.99])
def test_erk_counts_are_exact_and_capped(sparsity):
    """Conv-6 sized layers: the total is uniform's to the weight, no layer exceeds its size, the
    dense ones are those of highest raw share, and the rest keep eps * p_l * n_l rounded down or up."""
    model = build_model("conv6", 3, 10, 32, seed=0)
    names = [n for n, p in model.named_parameters() if p.dim() > 1]
    shapes = {n: tuple(model.get_parameter(n).shape) for n in names}
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(kept_count(n, 1 - sparsity) for n in sizes.values())
    counts = erk_counts(shapes, total)
    assert sum(counts.values()) == total and all(0 <= counts[n] <= sizes[n] for n in names)
    raw = {n: sum(s) / sizes[n] for n, s in shapes.items()}
    dense = [n for n in names if counts[n] == sizes[n]]
    assert all(raw[d] >= raw[n] for d in dense for n in names if n not in dense)
    rest = [n for n in names if n not in dense]
    if rest:
        eps = (total - sum(sizes[n] for n in dense)) / sum(raw[n] * sizes[n] for n in rest)
        for n in rest:
            assert abs(counts[n] - eps * raw[n] * sizes[n]) < 1 + 1e-9, n
    if sparsity == 0.8:  # negative control: not uniform's counts
        assert [counts[n] for n in names] != [kept_count(sizes[n], 0.2) for n in names]


def test_erk_refuses_what_it_cannot_allocate():
    with pytest.raises(ValueError, match="total"):
        erk_counts(SHAPES, 10**6)
    with pytest.raises(ValueError, match="distribution"):
        layer_sparsity("conv2", nn.Sequential(nn.Linear(4, 2)), torch.zeros(1, 4), 0.5, "erk")
    with pytest.raises(ValueError, match="distribution"):
        layer_sparsity("conv2", build_model("conv2", 3, 10, 8), torch.zeros(1, 3, 8, 8), 0.8, "normal")


@pytest.mark.parametrize("arch", ["conv2", "resnet20"])
def test_uniform_is_todays_sparsity(arch):
    model = build_model(arch, 3, 10, 8, seed=0)
    x = torch.zeros(1, 3, 8, 8)
    assert layer_sparsity(arch, model, x, 0.8) == arch_sparsity(arch, model, x, 0.8)


def _run(tmp_path, argv, name="run"):
    out = tmp_path / name
    assert main([*argv, *MODEL, "--out", str(out)]) == 0
    return RunDir(out).load_json(RunDir.CONFIG), load_tensors(out / RunDir.MASKS)


def _check_erk(masks, sparsity=0.8):
    """First layer whole; the net keeps uniform's total (the first layer counted, issue 28), not
    uniform's per-layer counts."""
    names = list(masks)
    assert bool(masks[names[0]].all())
    kept = {n: int(masks[n].sum()) for n in names}
    uniform = {n: kept_count(masks[n].numel(), 1 - sparsity) for n in names}
    assert sum(kept.values()) == sum(uniform.values()) and kept != uniform


def test_random_command(tmp_path):
    """Default: today's masks bit for bit (random_masks at the float sparsity) and "uniform" in
    config.json; erk: recorded, exact counts; erk with --like is refused."""
    config, masks = _run(tmp_path, ["random", "--no-train", "--seed", "3"])
    expected = random_masks(build_model("conv2", 3, 10, 8, seed=3), 0.8, 3)
    assert masks.keys() == expected.keys() and all(torch.equal(masks[n], expected[n]) for n in masks)
    assert config["distribution"] == "uniform"
    config, masks = _run(tmp_path, ["random", "--no-train", "--distribution", "erk"], "erk")
    assert config["distribution"] == "erk"
    _check_erk(masks)


def test_prune_command(tmp_path):
    config, masks = _run(tmp_path, ["prune", "--method", "magnitude", "--no-train"])
    expected = prune_at_init(build_model("conv2", 3, 10, 8, seed=0), "magnitude", sparsity=0.8)
    assert all(torch.equal(masks[n], expected[n]) for n in expected) and masks.keys() == expected.keys()
    assert config["distribution"] == "uniform"
    config, masks = _run(tmp_path, ["prune", "--method", "magnitude", "--no-train",
                                    "--distribution", "erk"], "erk")
    assert config["distribution"] == "erk"
    _check_erk(masks)


def test_sample_command(tmp_path, synthetic):
    """An ERK sample with --exact keeps ERK's counts (the fit: any masks of the net will do)."""
    from mcwt_ext.fit import fit_ticket

    model = build_model("conv2", 3, 10, 8, seed=0)
    fit = fit_ticket(model, random_masks(model, 0.5, 0), synthetic.train.tensors[0], max_samples=64)
    fit.save(tmp_path / "fit.json")
    config, masks = _run(tmp_path, ["sample", "--fit", str(tmp_path / "fit.json"), "--max-samples", "64",
                                    "--exact", "--distribution", "erk"])
    assert config["distribution"] == "erk"
    _check_erk(masks)
    sparsity = layer_sparsity("conv2", model, torch.zeros(1, 3, 8, 8), 0.8, "erk")
    assert {n: int(m.sum()) for n, m in masks.items()} == \
        {n: kept_count(m.numel(), 1 - sparsity[n]) for n, m in masks.items()}
