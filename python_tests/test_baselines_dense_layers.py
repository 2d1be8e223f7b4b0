"""Pruning-at-init baselines leave the layers an architecture keeps dense dense (issue 19: they
pruned resnet20's output layer to 20% while IMP, random and MCWT keep it whole), under layer and
global allocation, through the `prune` command and through the reproduce grid's cells."""
import pytest
import torch

from mcwt_ext.cli import main
from mcwt_ext.experiments import CELLS, PROTOCOLS
from mcwt_ext.experiments.grid import Cell, CellSettings
from mcwt_ext.masks import kept_count
from mcwt_ext.prune_at_init import prune_at_init
from mcwt_ext.runs import RunDir, load_tensors

METHODS = ("magnitude", "snip", "grasp", "synflow")
ALLOCATIONS = ("layer", "global")


def _check(masks, model_or_shapes, allocation):
    """fc whole; the 21 convs keep 20% each (layer) or 20% of their total (global)."""
    assert bool(masks["fc.weight"].all())
    conv = {k: m for k, m in masks.items() if k != "fc.weight"}
    assert len(conv) == 21
    kept = {k: int(m.sum()) for k, m in conv.items()}
    counts = {k: kept_count(m.numel(), 0.2) for k, m in conv.items()}
    if allocation == "layer":
        assert kept == counts
    else:
        assert sum(kept.values()) == sum(counts.values())


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m == "synflow" else m
                                    for m in METHODS])  # SynFlow's 100 rounds: ~10 s on 2 cores
def test_prune_command_keeps_resnet20s_output_layer(method, allocation, tmp_path):
    out = tmp_path / "p"
    assert main(["prune", "--arch", "resnet20", "--dataset", "digits", "--method", method,
                 "--allocation", allocation, "--no-train", "--no-progress", "--out", str(out)]) == 0
    _check(load_tensors(out / RunDir.MASKS), None, allocation)


def test_a_layer_at_sparsity_0_is_out_of_the_global_pool():
    """A 0 entry names a layer but keeps it whole: not scored, not pooled."""
    from mcwt_ext.models import build_model

    model = build_model("conv2", 1, 10, 8, seed=0)
    names = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    sparsity = {n: 0.0 if n == names[-1] else 0.8 for n in names}
    data = (torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(20) % 10)
    for method in METHODS:
        masks = prune_at_init(model, method, data, sparsity, allocation="global", rounds=3)
        assert list(masks) == names and bool(masks[names[-1]].all())
        assert sum(int(masks[n].sum()) for n in names[:-1]) == \
            sum(kept_count(masks[n].numel(), 0.2) for n in names[:-1])


@pytest.mark.slow
def test_grid_prune_cells_keep_resnet20s_output_layer(tmp_path, monkeypatch):
    """The cells make their masks (training is stubbed out: only the masks are checked here)."""
    monkeypatch.setattr(Cell, "train", lambda self, *args, **kwargs: None)
    settings = CellSettings("digits", None, PROTOCOLS["reduced"], str(tmp_path), iterations=2, eval_every=1)
    kinds = [k for k in CELLS if k.startswith("prune_")]
    assert {k.removeprefix("prune_").removesuffix("_global") for k in kinds} == set(METHODS)
    for kind in kinds:
        cell = Cell(kind, "resnet20", 0, settings)
        CELLS[kind].run(cell)
        config = cell.dir().load_json(RunDir.CONFIG)
        _check(cell.dir().load_tensors(RunDir.MASKS), None, config["allocation"])
