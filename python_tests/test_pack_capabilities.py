"""What a pack cannot train is declared in one place (issue 27): each capability of
:data:`mcwt_ext.lockstep.PACK_CAPABILITIES` is checked here (a net that needs it is refused with
its reason, by the check and by train_pack; one that does not is packable), the reproduce grid
trains such nets alone (as with --pack 1, said once) instead of refusing them, and the package's
imports form no cycle.

The bound of the grid comparisons: a cell the pack cannot take trains in its cell thread with the
very call ``--pack 1`` makes (train() on the same model, masks, TrainConfig and run directory, in
the same process with the same torch threads), so its arithmetic is the same, operation for
operation: the bound is zero, and table.csv must be equal byte for byte. (Only nets a pack does
train differ from --pack 1, by float rounding: test_grid_packs.py bounds those.)
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import mcwt_ext.distributed as distributed_mod
import mcwt_ext.precision as precision_mod
from conftest import IMPORT_ROOT, synthetic_model
from mcwt_ext.cli import main
from mcwt_ext.experiments import Budget, BudgetSpent, Grid
from mcwt_ext.lockstep import PACK_CAPABILITIES, PackNet, PackOptions, pack_refusal, pack_refusals, train_pack
from mcwt_ext.models import build_model
from mcwt_ext.runs import RunDir
from mcwt_ext.train import TrainConfig


def _cfg(**kw):
    return TrainConfig(**{**dict(iterations=2, lr=1e-3, eval_every=1), **kw})


class _Buffered(nn.Sequential):
    """Conv-2 for synthetic with one buffer that is not batch norm's."""

    def __init__(self):
        super().__init__(*synthetic_model())
        self.register_buffer("scale", torch.ones(()))


class _NotSequential(nn.Module):
    """A parameter-only net the grouped forward cannot run (vmap can)."""

    def __init__(self):
        super().__init__()
        self.net = synthetic_model()

    def forward(self, x):
        return self.net(x)


#: Per capability: (model, config, options, words of the reason) of nets that need it. The base
#: case, synthetic Conv-2 with Adam at a constant rate under PackOptions(), needs none.
NEEDS = {
    "buffers": [(lambda: build_model("resnet20", 3, 10, 8, seed=0), _cfg(), None, "batch-norm buffers"),
                (_Buffered, _cfg(), None, "buffers (1 of them, e.g. 'scale')")],
    "optimizer": [(synthetic_model, _cfg(optimizer="sgd"), None, "'optimizer': 'sgd'"),
                  (synthetic_model, _cfg(weight_decay=1e-4), None, "'weight_decay': 0.0001"),
                  (synthetic_model, _cfg(warmup_iterations=1), None, "'warmup_iterations': 1"),
                  (synthetic_model, _cfg(lr_milestones=[1]), None, "'lr_milestones': [1]")],
    "augment": [(synthetic_model, _cfg(augment="flip-crop"), None, "augment 'flip-crop'")],
    "precision": [(synthetic_model, _cfg(precision="bf16"), None, "--precision bf16")],
    "num_workers": [(synthetic_model, _cfg(num_workers=2), None, "num_workers 2")],
    "processes": [(synthetic_model, _cfg(), None, "torchrun")],
    "layout": [(_NotSequential, _cfg(), None, "nn.Sequential"),
               (lambda: nn.Sequential(*synthetic_model()[:-1], nn.Tanh()), _cfg(), None, "Tanh")],
}
#: What each capability's negative control changes so that the same kind of net is packable.
PACKABLE = {"buffers": (synthetic_model, _cfg(), None), "optimizer": (synthetic_model, _cfg(), None),
            "augment": (synthetic_model, _cfg(augment="none"), None),
            "precision": (synthetic_model, _cfg(precision="fp32"), None),
            "num_workers": (synthetic_model, _cfg(num_workers=0), None),
            "processes": (synthetic_model, _cfg(), None),
            "layout": (_NotSequential, _cfg(), PackOptions(impl="vmap"))}


def test_every_declared_capability_is_tested_here():
    names = [c.name for c in PACK_CAPABILITIES]
    assert len(set(names)) == len(names) and set(names) == set(NEEDS) == set(PACKABLE)
    assert all(c.doc for c in PACK_CAPABILITIES)


@pytest.mark.parametrize("name, case", [(n, i) for n, cases in NEEDS.items() for i in range(len(cases))])
def test_a_net_that_needs_a_capability_is_refused_with_its_reason(name, case, synthetic, monkeypatch):
    make, cfg, options, words = NEEDS[name][case]
    if name == "processes":
        monkeypatch.setattr(distributed_mod, "active", lambda: True)
    model = make()
    refusals = pack_refusals(model, cfg, options)
    assert name in refusals and words in refusals[name], refusals
    if not isinstance(model, type(build_model("resnet20", 3, 10, 8))):  # which also has SGD, flip-crop...
        assert list(refusals) == [name], refusals
    first = pack_refusal(model, cfg, options)
    assert first == next(iter(refusals.values()))
    # train_pack refuses it with the same (first) reason, before anything trains
    with pytest.raises(ValueError, match=re.escape(first)):
        train_pack([PackNet(model, None, cfg)], synthetic, options or PackOptions(), progress=False)


@pytest.mark.parametrize("name", list(PACKABLE))
def test_a_net_without_it_is_packable(name, synthetic):
    make, cfg, options = PACKABLE[name]
    assert pack_refusals(make(), cfg, options) == {} and pack_refusal(make(), cfg, options) is None
    [result] = train_pack([PackNet(make(), None, cfg)], synthetic, options or PackOptions(), progress=False)
    assert result.summary["lockstep"]["pack_size"] == 1


# --- the grid trains what a pack cannot take alone, saying so once ------------------------------

def _trained(root: Path) -> list[dict]:
    """The summaries of the trainings under ``root`` (IMP's own summary is not one)."""
    return [json.loads(p.read_text()) for p in sorted(root.rglob(RunDir.SUMMARY))
            if (p.parent / RunDir.METRICS).exists()]


def _alone_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "cells train one at a time" in line]


def test_a_grid_packs_what_it_can_and_trains_the_rest_alone_saying_so_once(tmp_path, capsys):
    g = Grid(archs=["conv2", "resnet20"], seeds=[0, 1], dataset="synthetic", out=tmp_path / "g", iterations=2,
             eval_every=1, pack=2, methods="random", progress=False)
    g.run()
    assert g.done()
    lines = _alone_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("reproduce: --pack 2: resnet20 cells train one at a time, "
                                                   "as with --pack 1 (the pack trains parameter-only nets; "), lines
    for c in g.cells:
        summaries = _trained(c.dir().path)
        assert summaries, c.key
        for s in summaries:  # conv2 in packs (of 2: one per seed), resnet20 alone
            assert ("lockstep" in s) == (c.arch == "conv2"), c.key
            if c.arch == "conv2":
                assert s["lockstep"]["pack_size"] == 2


def test_a_training_alone_under_packs_stops_at_the_time_budget(tmp_path, capsys):
    """Packs are picked to fit the budget; a training no pack takes stops at its deadline, as a
    cell-by-cell training does (here: spent before it starts, so nothing trains)."""
    g = Grid(archs=["resnet20"], seeds=[0], dataset="synthetic", out=tmp_path / "g", iterations=2, eval_every=1,
             pack=2, methods="random", progress=False, budget=Budget(0))
    with pytest.raises(BudgetSpent, match="ran out before"):
        g.run()
    assert _trained(g.out) == [] and len(_alone_lines(capsys.readouterr().err)) == 1


# --- reproduce --pack 2 equals --pack 1 where the pack cannot train ---------------------------------

REPRODUCE = ["reproduce", "--dataset", "digits", "--seeds", "1", "--iterations", "2", "--eval-every", "1",
             "--methods", "random,wt", "--no-progress"]


def _configs(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in out.rglob(RunDir.CONFIG)
            if p.parent != out}


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("argv, arch, words", [
    (["--arch", "resnet20"], "resnet20", "batch-norm buffers"),
    (["--arch", "conv2", "--augment", "flip-crop"], "conv2", "augment 'flip-crop'"),
    (["--arch", "conv2", "--precision", "bf16"], "conv2", "--precision bf16"),
], ids=["resnet20", "flip-crop", "bf16"])
def test_reproduce_with_pack_2_gives_the_table_of_pack_1(argv, arch, words, tmp_path, capsys, monkeypatch):
    """Nothing is refused because of packing, and the cells the pack cannot take are the very
    runs of --pack 1: the same table (bound zero, module doc), the same run configs, no pack.
    bf16: this CPU may lack bfloat16 instructions, where --precision bf16 is refused for speed
    (test_precision.py); the arithmetic is the same emulated, so it is declared native here."""
    if "bf16" in argv:
        monkeypatch.setattr(precision_mod, "native_bf16", lambda: True)
    outs = {}
    for pack in ("2", "1"):
        outs[pack] = tmp_path / f"pack{pack}"
        assert main([*REPRODUCE, *argv, "--pack", pack, "--out", str(outs[pack])]) == 0
        lines = _alone_lines(capsys.readouterr().err)
        if pack == "2":
            assert len(lines) == 1 and lines[0].startswith(f"reproduce: --pack 2: {arch} cells train one at a "
                                                           f"time") and words in lines[0], lines
        else:
            assert lines == []
    assert (outs["2"] / "table.csv").read_text() == (outs["1"] / "table.csv").read_text()
    assert _configs(outs["2"]) == _configs(outs["1"])  # the same runs: either resumes the other
    summaries = _trained(outs["2"])
    assert len(summaries) >= 3 and not any("lockstep" in s for s in summaries)


# --- the package's imports form no cycle ----------------------------------------------------------

PACKAGE = Path(IMPORT_ROOT) / "mcwt_ext"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {module of mcwt_ext it imports: line}} for every import statement anywhere in
    the module (top level, functions, ``if TYPE_CHECKING:``), relative or absolute."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges = graph.setdefault(mod, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                # `from pkg import sub` imports the submodule pkg.sub where there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                t = known(t) if t.split(".")[0] == "mcwt_ext" else None
                if t is not None and t != mod:
                    edges.setdefault(t, node.lineno)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v):
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        path.pop()
        state[v] = 2
        return None
    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


#: Edges left out of the check, each with why (none).
EXEMPT: set = set()


def _checked_graph() -> dict[str, dict[str, int]]:
    return {a: {b: line for b, line in out.items() if (a, b) not in EXEMPT} for a, out in import_graph().items()}


def test_the_import_graph_is_read_and_a_cycle_is_found():
    """The negative control: the reader sees function-level and TYPE_CHECKING imports, and the
    search finds a planted cycle."""
    graph = _checked_graph()
    assert "mcwt_ext.experiments.ray_executor" in graph["mcwt_ext.experiments.grid"]  # module level
    assert "mcwt_ext.lockstep" in graph["mcwt_ext.experiments.packer"]  # inside a function
    assert "mcwt_ext.train" in graph["mcwt_ext.lockstep.nets"]  # relative, two levels
    assert "mcwt_ext.train_config" in graph["mcwt_ext.lockstep.capabilities"]
    planted = {k: dict(v) for k, v in graph.items()}
    planted["mcwt_ext.experiments.ray_executor"]["mcwt_ext.experiments.grid"] = 1
    cycle = find_cycle(planted)
    assert cycle and cycle[0] == cycle[-1]
    assert ("mcwt_ext.experiments.ray_executor", "mcwt_ext.experiments.grid") in set(zip(cycle, cycle[1:])), cycle


def test_the_package_imports_form_no_cycle():
    """Every import of mcwt_ext's modules, top level or inside functions or ``if TYPE_CHECKING``:
    no cycle (grid, ray_executor and shards used to import one another inside functions)."""
    graph = _checked_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(
        f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"
