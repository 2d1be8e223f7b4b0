"""ERK matched to the uniform total, and ERK's control (issue 28): on the Conv-2 shapes of digits and
CIFAR-10, random (ERK), random with ERK's dense layers (the control) and random (uniform) keep the
same total; the control's dense layers are ERK's; the table header names them; a run directory made
under the earlier ERK total (first layer outside it) is another run."""
import json

import pytest
import torch
from torch import nn

from mcwt_ext.cli import main
from mcwt_ext.distribution import ERK_TOTAL, identity_entry, layer_counts, layer_sparsity
from mcwt_ext.experiments import METHODS, Grid
from mcwt_ext.experiments.methods import CELLS, cells_for
from mcwt_ext.experiments.report import dense_layers_markdown, layer_rows
from mcwt_ext.masks import kept_count, random_masks
from mcwt_ext.models import build_model
from mcwt_ext.runs import RunDir, grid_cell

DISTRIBUTIONS = ("uniform", "erk", "uniform-erk-dense")

#: (in_channels, image_size) of each dataset; its Conv-2: conv1 0.weight (64x c x3x3), conv2
#: 2.weight (64x64x3x3), fc1 6.weight (256 x 64*(s/2)^2), fc2 8.weight (256x256), fc3 10.weight (10x256)
SHAPES = {"digits": (1, 8), "cifar10": (3, 32)}
#: what uniform keeps at 80%, per layer, round(0.2 n): the total every distribution keeps
UNIFORM = {"digits": [115, 7373, 52429, 13107, 512], "cifar10": [346, 7373, 838861, 13107, 512]}
#: what rigl's total (the first layer dense on top of it) kept beyond uniform: conv1's size less
#: its uniform count (576 - 115, 1728 - 346)
RIGL_EXCESS = {"digits": 461, "cifar10": 1382}


def _conv2(dataset):
    c, s = SHAPES[dataset]
    return build_model("conv2", c, 10, s, seed=0), torch.zeros(1, c, s, s)


def _masks_kept(model, x, distribution):
    """Per-layer kept counts of the masks random pruning makes under ``distribution``."""
    masks = random_masks(model, layer_sparsity("conv2", model, x, 0.8, distribution), seed=0)
    return {n: int(m.sum()) for n, m in masks.items()}


@pytest.mark.parametrize("dataset", list(SHAPES))
def test_erk_control_and_uniform_keep_one_total(dataset):
    model, x = _conv2(dataset)
    counts = {d: layer_counts("conv2", model, x, 0.8, d) for d in DISTRIBUTIONS}
    assert [c.kept for c in counts["uniform"]] == UNIFORM[dataset]
    total = sum(UNIFORM[dataset])
    for d in DISTRIBUTIONS:
        kept = _masks_kept(model, x, d)  # the masks themselves, not only the rule
        assert kept == {c.name: c.kept for c in counts[d]}, d
        assert sum(kept.values()) == total, d
    # negative control: rigl's total (the first layer outside it) keeps more than uniform
    first = counts["erk"][0]
    assert first.kept == first.size and first.size - UNIFORM[dataset][0] == RIGL_EXCESS[dataset]


@pytest.mark.parametrize("dataset", list(SHAPES))
def test_the_control_keeps_erks_dense_layers_and_one_share_elsewhere(dataset):
    """ERK keeps conv1 whole (the first layer) and fc3 (its cap at 80%); so does the control, whose
    other layers keep one share of what is left; uniform keeps no layer whole."""
    model, x = _conv2(dataset)
    erk, control, uniform = (layer_counts("conv2", model, x, 0.8, d) for d in ("erk", "uniform-erk-dense", "uniform"))
    dense = lambda counts: {c.name: c.dense for c in counts if c.kept == c.size}  # noqa: E731
    assert dense(erk) == dense(control) == {"0.weight": "first", "10.weight": "cap"}
    assert dense(uniform) == {}
    rest = [c for c in control if c.dense is None]
    share = sum(c.kept for c in rest) / sum(c.size for c in rest)
    assert all(abs(c.kept - share * c.size) < 1 for c in rest)
    assert [c.kept for c in erk] != [c.kept for c in control]  # the allocation differs


def test_a_first_layer_larger_than_the_total_is_refused():
    """A first layer of 10,000 weights dense within uniform's 2,040 at 80%: nothing left."""
    model = nn.Sequential(nn.Linear(100, 100, bias=False), nn.Linear(100, 2, bias=False))
    for distribution in ("erk", "uniform-erk-dense"):
        with pytest.raises(ValueError, match="first layer"):
            layer_sparsity("conv2", model, torch.zeros(1, 100), 0.8, distribution)
    assert layer_sparsity("conv2", model, torch.zeros(1, 100), 0.8) == 0.8


def test_the_control_is_a_row_of_all():
    m = METHODS["random_erk_dense"]
    assert (m.label, m.group, m.distribution) == ("Randomly pruned network (ERK's dense layers)", "baseline",
                                                  "uniform-erk-dense")
    assert cells_for(["random_erk_dense"]) == ["random_erk_dense"] and "random_erk_dense" in CELLS
    assert (METHODS["random_erk"].distribution, METHODS["rigl_erk"].distribution) == ("erk", "erk")
    assert {k for k, m in METHODS.items() if m.distribution != "uniform"} == {"random_erk", "random_erk_dense",
                                                                                "rigl_erk"}


def _cell_config(root, arch, dataset):
    """A cell's config.json as a grid writes it (the header reads the model's shapes from it)."""
    c, s = SHAPES[dataset]
    RunDir(grid_cell(root, arch, 0, "random").path).save_json(
        RunDir.CONFIG, dict(arch=arch, in_channels=c, image_size=s, num_classes=10, seed=0))


@pytest.mark.parametrize("dataset", list(SHAPES))
def test_the_header_names_the_dense_layers(tmp_path, dataset):
    _cell_config(tmp_path, "conv2", dataset)
    g = Grid(archs=["conv2"], seeds=[0], dataset=dataset, out=tmp_path, methods="all", progress=False)
    rows = layer_rows(g)
    text = dense_layers_markdown(rows)
    lines = {line.split(" (", 1)[0]: line for line in text.splitlines() if line.startswith("- ")}
    assert set(lines) == {"- conv2, uniform rows", "- conv2, ERK rows", "- conv2, ERK's control"}
    assert "dense layers: none;" in lines["- conv2, uniform rows"]
    for key in ("- conv2, ERK rows", "- conv2, ERK's control"):
        assert "dense layers: conv1 `0.weight` (first layer), fc3 `10.weight` (ERK's cap);" in lines[key]
    assert METHODS["random_erk"].label in lines["- conv2, ERK rows"]
    assert METHODS["random_erk_dense"].label in lines["- conv2, ERK's control"]
    total = f"{sum(UNIFORM[dataset]):,} of "
    assert all(total in line for line in lines.values())
    by = {(r["distribution"], r["weight"]): r for r in rows}  # layers.csv: every layer's count
    assert [by[("uniform", n)]["kept"] for n in ("0.weight", "2.weight", "6.weight", "8.weight", "10.weight")] \
        == UNIFORM[dataset]
    assert by[("uniform-erk-dense", "10.weight")]["dense"] == "ERK's cap"
    paper = Grid(archs=["conv2"], seeds=[0], dataset=dataset, out=tmp_path / "p", progress=False)
    _cell_config(tmp_path / "p", "conv2", dataset)
    assert "ERK" not in dense_layers_markdown(layer_rows(paper))  # the paper's rows: uniform only


def test_an_old_erk_cell_is_another_run(tmp_path, monkeypatch):
    """A random (ERK) cell made under the earlier total (its config without erk_total) does not
    resume; one made now does; the uniform random cell's identity records no erk_total."""
    from mcwt_ext.experiments import CellSettings
    from mcwt_ext.experiments.grid import Cell
    from mcwt_ext.experiments.protocol import PROTOCOLS

    trained = []
    monkeypatch.setattr(Cell, "train", lambda self, *args, **kwargs: trained.append(self.kind))
    settings = CellSettings("synthetic", None, PROTOCOLS["reduced"], str(tmp_path))
    for kind in ("random", "random_erk", "random_erk_dense"):
        CELLS[kind].run(Cell(kind, "conv2", 0, settings))
    assert trained == ["random", "random_erk", "random_erk_dense"]
    configs = {k: grid_cell(tmp_path, "conv2", 0, k).load_json(RunDir.CONFIG) for k in trained}
    assert "erk_total" not in configs["random"] and "distribution" not in configs["random"]
    assert configs["random_erk"]["erk_total"] == configs["random_erk_dense"]["erk_total"] == ERK_TOTAL
    assert identity_entry("uniform") == {}
    CELLS["random_erk"].run(Cell("random_erk", "conv2", 0, settings))  # made now: resumes
    old = dict(configs["random_erk"])
    del old["erk_total"]  # what the earlier code wrote
    grid_cell(tmp_path, "conv2", 0, "random_erk").save_json(RunDir.CONFIG, old)
    with pytest.raises(ValueError, match="erk_total"):
        CELLS["random_erk"].run(Cell("random_erk", "conv2", 0, settings))
    assert trained.count("random_erk") == 2


def test_an_old_erk_command_run_is_another_run(tmp_path, capsys):
    """`mcwt random --distribution erk` records erk_total; an old run directory lacks it and is refused."""
    out = tmp_path / "run"
    argv = ["random", "--arch", "conv2", "--dataset", "synthetic", "--quiet", "--no-train",
            "--distribution", "erk", "--out", str(out)]
    assert main(argv) == 0
    config = json.loads((out / RunDir.CONFIG).read_text())
    assert config["erk_total"] == ERK_TOTAL
    assert main(argv) == 0  # the same run
    del config["erk_total"]
    (out / RunDir.CONFIG).write_text(json.dumps(config))
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "erk_total" in capsys.readouterr().err
    uniform = tmp_path / "uniform"
    assert main([*argv[:-4], "--out", str(uniform)]) == 0
    assert "erk_total" not in json.loads((uniform / RunDir.CONFIG).read_text())


def test_resnet20_keeps_its_dense_output_under_every_distribution():
    """The architecture's dense layer (resnet20's fc) stays whole and the totals still agree."""
    model, x = build_model("resnet20", 3, 10, 32, seed=0), torch.zeros(1, 3, 32, 32)
    counts = {d: layer_counts("resnet20", model, x, 0.8, d) for d in DISTRIBUTIONS}
    totals = {d: sum(c.kept for c in cs) for d, cs in counts.items()}
    assert len(set(totals.values())) == 1
    for d, cs in counts.items():
        fc = next(c for c in cs if c.name == "fc.weight")
        assert (fc.kept, fc.dense) == (fc.size, "arch"), d
    sizes = {c.name: c.size for c in counts["uniform"]}
    assert totals["uniform"] == sum(kept_count(n, 0.2) if name != "fc.weight" else n for name, n in sizes.items())
