import json
import zipfile

import pytest
import torch

from conftest import synthetic_model
from mcwt_ext.masks import dense_masks, magnitude_prune, random_masks
from mcwt_ext.runs import RunDir
from mcwt_ext.state import export_state, import_state

_CONFIG = dict(arch="conv2", dataset="synthetic", in_channels=3, image_size=8, num_classes=10,
               protocol=dict(sparsity=0.8))


def _fake_grid(root, seed=0, rounds=4):
    """What a reproduce grid leaves for one seed: IMP rounds (nested masks), a random and an
    MCWT-like cell, configs, metrics, summaries, trained weights and a checkpoint."""
    model = synthetic_model(seed)
    init = model.state_dict()
    base = RunDir(root / "conv2" / f"seed_{seed}")
    imp = base.subdir("imp")
    imp.save_json("config.json", dict(_CONFIG, command="reproduce:imp", seed=seed))
    imp.save_tensors("init.safetensors", init)
    g = torch.Generator().manual_seed(seed)
    masks = dense_masks(model)
    rates = {n: 0.5 for n in masks}
    for r in range(rounds):
        rd = imp.subdir(f"round_{r:02d}")
        rd.save_tensors("masks.safetensors", masks)
        trained = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in init.items()}
        rd.save_tensors("final.safetensors", trained)
        rd.save_csv("metrics.csv", [dict(iteration=i, val_acc=torch.rand(1, generator=g).item()) for i in range(5)])
        rd.save_json("summary.json", dict(round=r, val_acc_final=0.5))
        masks = magnitude_prune(trained, masks, rates, {n: 0.2 for n in masks})
    imp.save_tensors("masks.safetensors", imp.subdir(f"round_{rounds - 1:02d}").load_tensors("masks.safetensors"))
    imp.save_json("summary.json", dict(rounds=rounds))
    rnd = base.subdir("random")
    rnd.save_json("config.json", dict(_CONFIG, command="reproduce:random", seed=seed))
    rnd.save_tensors("init.safetensors", init)
    rnd.save_tensors("masks.safetensors", random_masks(model, 0.8, seed))
    rnd.save_tensors("checkpoints/last.pt", init)  # an unfinished training's checkpoint
    rnd.save_csv("metrics.csv", [dict(iteration=0, val_acc=0.1)])
    mcwt = base.subdir("mcwt_connectivity")
    mcwt.save_json("config.json", dict(_CONFIG, command="reproduce:mcwt_connectivity", seed=seed))
    mcwt.save_tensors("masks.safetensors", random_masks(model, 0.7, seed + 100))
    mcwt.save_json("sample.json", dict(wall_time_s=1.0))
    RunDir(root).write_text("table.md", "| a | b |\n")
    return base


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_round_trip_restores_masks_bit_exact_and_records_verbatim(tmp_path):
    for seed in (0, 1):
        _fake_grid(tmp_path / "grid", seed)
    bundle = tmp_path / "state.zip"
    manifest = export_state(tmp_path / "grid", bundle)
    import_state(bundle, tmp_path / "fresh")
    old, new = tmp_path / "grid", tmp_path / "fresh"
    expected = [f for f in _files(old) if "final.safetensors" not in f and "checkpoints/" not in f]
    assert _files(new) == expected
    for f in expected:
        if f.endswith("masks.safetensors"):
            a, b = RunDir((old / f).parent).load_tensors("masks.safetensors"), RunDir((new / f).parent).load_tensors("masks.safetensors")
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        elif f.endswith("init.safetensors"):  # rebuilt from the seed
            a, b = RunDir((old / f).parent).load_tensors("init.safetensors"), RunDir((new / f).parent).load_tensors("init.safetensors")
            assert all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert (old / f).read_bytes() == (new / f).read_bytes(), f
    enc = {e["path"]: e for e in manifest["masks"]}
    assert {v["encoding"] for v in enc["conv2/seed_0/imp/round_00/masks.safetensors"]["layers"].values()} == {"dense"}
    assert {v["encoding"] for v in enc["conv2/seed_0/imp/round_02/masks.safetensors"]["layers"].values()} == {"nested"}
    assert enc["conv2/seed_0/imp/masks.safetensors"]["parent"] == "conv2/seed_0/imp/round_03/masks.safetensors"
    assert enc["conv2/seed_0/random/masks.safetensors"]["derived"]["kind"] == "random"
    assert {v["encoding"] for v in enc["conv2/seed_0/mcwt_connectivity/masks.safetensors"]["layers"].values()} == {"full"}
    # A second import into the same directory is a no-op; one over other data is refused.
    import_state(bundle, new)
    (new / "table.md").write_text("other\n")
    with pytest.raises(ValueError, match="table.md"):
        import_state(bundle, new)


def test_masks_travel_as_bits(tmp_path):
    _fake_grid(tmp_path / "grid")
    bundle = tmp_path / "state.zip"
    export_state(tmp_path / "grid", bundle)
    mask_bytes = sum(p.stat().st_size for p in (tmp_path / "grid").rglob("masks.safetensors"))
    with zipfile.ZipFile(bundle) as zf:
        bits = sum(i.file_size for i in zf.infolist() if i.filename.endswith(".bits"))
    assert bits < mask_bytes / 8  # a byte per weight in safetensors, under a bit in the bundle


def test_state_that_cannot_travel_is_refused(tmp_path):
    base = _fake_grid(tmp_path / "grid")
    base.subdir("imp").save_tensors("init.safetensors", synthetic_model(5).state_dict())
    with pytest.raises(ValueError, match="initial weights"):
        export_state(tmp_path / "grid", tmp_path / "s.zip")
    base.subdir("imp").save_tensors("rewind.safetensors", synthetic_model(0).state_dict())
    with pytest.raises(ValueError, match="rewind"):
        export_state(tmp_path / "grid", tmp_path / "s.zip")
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a state bundle"):
        import_state(tmp_path / "junk.zip", tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        import_state(tmp_path / "missing.zip", tmp_path / "x")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("manifest.json", json.dumps(dict(format="mcwt-state/1", files=["../x.json"], masks=[], inits=[])))
    with pytest.raises(ValueError, match="outside"):
        import_state(evil, tmp_path / "x")


@pytest.mark.slow
def test_imported_grid_finishes_without_redoing_finished_cells(tmp_path, monkeypatch):
    """A digits grid with IMP and random finished moves through a bundle to a fresh directory,
    where reproduce trains only the rest."""
    import mcwt_ext.experiments.grid as grid_mod
    from mcwt_ext.experiments import Grid, run_cell

    def grid(out):
        return Grid(archs=["conv2"], seeds=[0], dataset="synthetic", out=out, protocol="reduced", iterations=6, eval_every=3,
                    progress=False)
    first = grid(tmp_path / "a")
    first.open()
    for cell in first.cells:
        if cell.kind in ("imp", "random"):
            run_cell(cell)
    export_state(tmp_path / "a", tmp_path / "state.zip")
    import_state(tmp_path / "state.zip", tmp_path / "b")
    ran = []
    real = grid_mod.run_cell

    def counting(cell):
        ran.append(cell.kind)
        return real(cell)
    monkeypatch.setattr(grid_mod, "run_cell", counting)
    second = grid(tmp_path / "b")
    second.run()
    assert sorted(ran) == ["fit", "mcwt_connectivity", "mcwt_magnitude"]
    for kind in ("imp", "random"):
        assert (tmp_path / "a" / "conv2" / "seed_0" / kind / "summary.json").read_text() == \
            (tmp_path / "b" / "conv2" / "seed_0" / kind / "summary.json").read_text()
    assert all(c.done() for c in second.cells)
