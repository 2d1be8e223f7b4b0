"""A grid's state as one compact, portable bundle: masks as bits, metrics, summaries, configs.

IMP rewinds to the initial weights and the initial weights come from the seed, so a grid's
state is its masks plus its records. ``export_state(root, file)`` walks every run directory under
``root`` and writes a zip (LZMA) holding:

- every ``.json``, ``.csv``, ``.md`` and ``.txt`` file as it is (configs, summaries, metrics,
  fits, tables);
- every ``masks.safetensors`` (and ``final_masks.safetensors``, the masks dynamic sparse training
  ends with) as bits (``np.packbits``), each layer's bits in the order of
  decreasing initial magnitude (the init rebuilt from the nearest ``config.json``; kept weights
  cluster at the front, which LZMA turns into fewer bytes), in one of three encodings per layer: ``dense`` (all kept: no bits), ``nested`` (the layer's bits at the weights its parent
  set keeps, the parent being the previous IMP round, or the round a ticket copies: IMP only ever
  prunes further) and ``full``; and ``derived`` for a whole set the run's config re-derives (the
  random baseline's ``random_masks(model, sparsity, seed)``; MCWT without connectivity, sampled
  from the fit cell's ``fit.json`` and the seed), checked bit for bit at export;
- ``manifest.json``: format version, the files, each mask set's layers, shapes and encodings,
  and the run directories whose ``init.safetensors`` is rebuilt from their ``config.json``
  (checked equal at export).

Not in the bundle: trained weights (``final.safetensors``, snapshots), the checkpoints of
finished trainings, and figures; unfinished trainings' latest checkpoints only when asked
(``checkpoints=True``). ``import_state(file, root)`` writes the files back (atomically, through runs.py) and
rebuilds the initial weights, so a grid resumed there skips its finished cells: a finished
cell needs its summary, masks and initial weights, never its trained weights. A training that was
in progress resumes from its checkpoint if the bundle holds it, and starts over if not; a rewound
IMP cannot travel (its rewind weights are not derivable, so export refuses it).
"""
from __future__ import annotations

import io
import json
import os
import sys
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .errors import MissingFileError, UsageError
from .models import build_model_from_config
from .runs import RunDir, atomic_write, round_index, round_name

__all__ = ["export_state", "import_state", "FORMAT"]

FORMAT = "mcwt-state/1"
MANIFEST = "manifest.json"
TEXT_SUFFIXES = (".json", ".csv", ".md", ".txt")
SKIPPED = ("final.safetensors", "checkpoints", "figures")  # trained weights, resumable only locally
UNDERIVABLE = ("rewind.safetensors",)
MASK_FILES = (RunDir.MASKS, RunDir.FINAL_MASKS)


def _bits(mask: torch.Tensor) -> bytes:
    return np.packbits(mask.flatten().numpy()).tobytes()


def _unbits(data: bytes, n: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(np.frombuffer(data, np.uint8), count=n).astype(bool))


def _parent(rel: Path, have: Mapping[Path, dict]) -> Path | None:
    """The mask set ``rel`` nests in, if already encoded: IMP round r in round r-1; an IMP run's
    own ticket masks in its last round."""
    folder = rel.parent
    r = round_index(folder.name)
    if r is not None:
        prev = folder.parent / round_name(r - 1) / RunDir.MASKS if r > 0 else None
        return prev if prev in have else None
    rounds = sorted(p for p in have if p.parent.parent == folder and round_index(p.parent.name) is not None)
    return rounds[-1] if rounds else None


def _derive(rd: RunDir, kind: str, config: dict, sparsity: float) -> dict[str, torch.Tensor] | None:
    """The mask set a grid cell of ``kind`` re-derives from its config (and, for MCWT without
    connectivity, its sibling fit cell's ``fit.json``: no data needed), or None."""
    model = build_model_from_config(config)
    if kind == "random":
        from .masks import random_masks
        return random_masks(model, sparsity, config["seed"])
    if kind == "mcwt_magnitude" and config.get("use_connectivity") is False:
        from .sample import sample_ticket
        fit = rd.path.parent / "fit" / RunDir.FIT
        if not fit.is_file():
            return None
        return sample_ticket(model, fit, None, sparsity=sparsity, use_connectivity=False,
                             seed=config["seed"])[0]
    return None


def _derived(rd: RunDir, masks: Mapping[str, torch.Tensor]) -> dict | None:
    """``{"kind": ..., "sparsity": ...}`` when the run's config re-derives ``masks`` exactly
    (checked bit for bit): the random baseline (its seed) and MCWT without connectivity (the fit
    and the seed)."""
    if not rd.exists(RunDir.CONFIG):
        return None
    config = rd.load_json(RunDir.CONFIG)
    sparsity = (config.get("protocol") or {}).get("sparsity")
    kind = str(config.get("command", "")).removeprefix("reproduce:")
    if kind not in ("random", "mcwt_magnitude") or sparsity is None:
        return None
    try:
        derived = _derive(rd, kind, config, sparsity)
    except (ValueError, KeyError, FileNotFoundError):  # not derivable after all: store the bits
        return None
    same = derived is not None and derived.keys() == masks.keys() and \
        all(torch.equal(derived[k], masks[k]) for k in masks)
    return dict(kind=kind, sparsity=sparsity) if same else None


def _orders(config_path: Path | None, cache: dict) -> dict[str, torch.Tensor]:
    """Per weight: flat indices by decreasing initial magnitude (the init rebuilt from the
    run's config). Kept weights cluster at the front (WTs keep large initial weights, and MCWT
    samples them), so the bits packed in this order compress far better."""
    if config_path is None:
        return {}
    if config_path not in cache:
        model = build_model_from_config(json.loads(config_path.read_text()))
        cache[config_path] = {n: torch.sort(p.detach().abs().flatten(), descending=True, stable=True).indices
                              for n, p in model.named_parameters()}
    return cache[config_path]


def _config_for(folder: Path, root: Path) -> Path | None:
    """The nearest config.json at or above ``folder`` (within ``root``) that names a model."""
    for d in [folder, *folder.parents]:
        c = d / RunDir.CONFIG
        if c.is_file() and "arch" in json.loads(c.read_text()):
            return c
        if d == root:
            return None
    return None


def _encode_masks(rd: RunDir, rel: Path, masks: Mapping[str, torch.Tensor],
                  parents: Mapping[Path, dict], orders: Mapping[str, torch.Tensor]) -> tuple[dict, bytes]:
    derived = _derived(rd, masks)
    if derived is not None:
        return dict(derived=derived, layers={n: list(m.shape) for n, m in masks.items()}), b""
    parent_path = _parent(rel, parents)
    parent = parents.get(parent_path, {})
    layers, blob = {}, io.BytesIO()
    for name in sorted(masks):
        m = masks[name].to("cpu")
        order = orders.get(name)
        flat = m.flatten() if order is None or order.numel() != m.numel() else m.flatten()[order]
        p = parent.get(name)
        if bool(m.all()):
            enc, data = "dense", b""
        elif p is not None and p.shape == m.shape and not bool((m & ~p).any()):
            pf = p.flatten() if order is None or order.numel() != m.numel() else p.flatten()[order]
            enc, data = "nested", _bits(flat[pf])
        else:
            enc, data = "full", _bits(flat)
        layers[name] = dict(shape=list(m.shape), encoding=enc, offset=blob.tell(), bytes=len(data),
                            order="init_magnitude" if order is not None and order.numel() == m.numel() else "index")
        blob.write(data)
    entry = dict(layers=layers)
    if any(v["encoding"] == "nested" for v in layers.values()):
        entry["parent"] = parent_path.as_posix()
    return entry, blob.getvalue()


def _in_progress(root: Path) -> list[Path]:
    """The checkpoints of the trainings under ``root`` that have not finished (no summary)."""
    return sorted(p for p in root.rglob(RunDir.CHECKPOINT)
                  if not (p.parent.parent / RunDir.SUMMARY).exists()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def export_state(root_dir: str | os.PathLike, file: str | os.PathLike, *, checkpoints: bool = False) -> dict:
    """Write the state of every run directory under ``root_dir`` to the bundle ``file``
    (atomically: a reader sees the previous bundle or this one).

    ``checkpoints``: also the latest checkpoint of every unfinished training, stored as it is (a
    training resumed from the bundle then loses nothing; a Conv-2 checkpoint on CIFAR-10 is about
    50 MB). Returns the manifest. Raises a ValueError for state that cannot travel this way
    (rewind weights, initial weights that the run's config does not rebuild)."""
    root = Path(root_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"root_dir {str(root)!r} is not a directory")
    paths = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part in SKIPPED or part.startswith(".") for part in p.relative_to(root).parts))
    bad = [p for p in paths if p.name in UNDERIVABLE]
    if bad:
        raise UsageError(f"{bad[0]} holds trained weights (IMP rewound to an iteration > 0), which a "
                         f"state bundle cannot rebuild; export needs rewind_iteration = 0")
    manifest = dict(format=FORMAT, files=[], masks=[], inits=[], checkpoints=[])
    with zipfile.ZipFile(_tmp_path(file), "w", zipfile.ZIP_LZMA) as zf:
        for p in paths:
            if p.suffix in TEXT_SUFFIXES:
                zf.writestr(p.relative_to(root).as_posix(), p.read_bytes())
                manifest["files"].append(p.relative_to(root).as_posix())
        manifest["masks"] = _write_masks(zf, root, [p for p in paths if p.name in MASK_FILES])
        manifest["inits"] = [_check_init(p, root) for p in paths if p.name == RunDir.INIT]
        if checkpoints:
            manifest["checkpoints"] = _write_checkpoints(zf, root)
        zf.writestr(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(_tmp_path(file), file)
    return manifest


def _write_masks(zf: zipfile.ZipFile, root: Path, mask_paths: list[Path]) -> list[dict]:
    """Encode every mask file into ``zf``, parents first (an IMP run's round_00 < round_01 < ...
    < its ticket), so a mask is stored as its difference from the one it was pruned from."""
    def order(p):
        is_round = round_index(p.parent.name) is not None
        group = p.relative_to(root).parent.parent if is_round else p.relative_to(root).parent
        return group.as_posix(), not is_round, p.as_posix()
    entries, decoded, cache = [], {}, {}
    for p in sorted(mask_paths, key=order):
        rel, rd = p.relative_to(root), RunDir(p.parent)
        masks = rd.load_tensors(p.name)
        config = _config_for(p.parent, root)
        entry, blob = _encode_masks(rd, rel, masks, decoded, _orders(config, cache))
        decoded[rel] = masks
        if config is not None:
            entry["config"] = config.relative_to(root).as_posix()
        entries.append(dict(entry, path=rel.as_posix()))
        if blob:
            zf.writestr(rel.with_suffix(".bits").as_posix(), blob)
    return entries


def _check_init(p: Path, root: Path) -> str:
    """The run folder of the initial weights ``p``, which the bundle leaves out: its config.json
    must rebuild them bit for bit."""
    rd = RunDir(p.parent)
    if not rd.exists(RunDir.CONFIG):
        raise UsageError(f"{p}: no config.json beside it to rebuild the initial weights from")
    built = build_model_from_config(rd.load_json(RunDir.CONFIG)).state_dict()
    stored = rd.load_tensors(RunDir.INIT)
    if built.keys() != stored.keys() or not all(torch.equal(built[k], stored[k]) for k in built):
        raise UsageError(f"{p} differs from the initial weights its config.json builds; "
                         f"a state bundle can only rebuild seed-derived inits")
    return p.relative_to(root).parent.as_posix()


def _write_checkpoints(zf: zipfile.ZipFile, root: Path) -> list[str]:
    """Store the latest checkpoint of every unfinished training under ``root`` as it is."""
    written = []
    for p in _in_progress(root):
        try:
            data = p.read_bytes()
        except FileNotFoundError:  # finished meanwhile (another process): its summary is newer
            continue
        zf.writestr(p.relative_to(root).as_posix(), data, compress_type=zipfile.ZIP_STORED)  # floats
        written.append(p.relative_to(root).as_posix())
    return written


def _tmp_path(file) -> Path:
    file = Path(file)
    return file.with_name(f".{file.name}.{os.getpid()}.tmp")  # two writers never share one


def _decode_masks(entry: dict, blob: bytes, decoded: Mapping[str, dict], rd: RunDir,
                  orders: Mapping[str, torch.Tensor]) -> dict:
    if "derived" in entry:
        d = entry["derived"]
        masks = _derive(rd, d.get("kind", "random"), rd.load_json(RunDir.CONFIG), d["sparsity"])
        if masks is None:
            raise UsageError(f"mask set {entry['path']!r} is derived ({d}) but cannot be re-derived here")
        return masks
    parent = decoded.get(entry.get("parent"))
    if "parent" in entry and parent is None:
        raise UsageError(f"mask set {entry['path']!r} nests in {entry['parent']!r}, which the bundle lacks")
    masks = {}
    for name, layer in entry["layers"].items():
        shape, n = layer["shape"], int(np.prod(layer["shape"]))
        data = blob[layer["offset"]:layer["offset"] + layer["bytes"]]
        order = orders[name] if layer.get("order") == "init_magnitude" else torch.arange(n)
        flat = torch.zeros(n, dtype=torch.bool)
        if layer["encoding"] == "dense":
            flat[:] = True
        elif layer["encoding"] == "full":
            flat[order] = _unbits(data, n)
        elif layer["encoding"] == "nested":
            pf = parent[name].flatten()[order]
            kept = torch.zeros(n, dtype=torch.bool)
            kept[pf] = _unbits(data, int(pf.sum()))
            flat[order] = kept
        else:
            raise UsageError(f"unknown mask encoding {layer['encoding']!r} for {name!r}")
        masks[name] = flat.view(shape)
    return masks


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` unless it already holds exactly that; never overwrite other data."""
    if path.exists():
        if path.read_bytes() != data:
            raise UsageError(f"{path} exists with other contents than the bundle's; import into a "
                             f"fresh directory")
        return
    atomic_write(path, data)


def import_state(file: str | os.PathLike, root_dir: str | os.PathLike) -> dict:
    """Restore the bundle ``file`` (from :func:`export_state`) under ``root_dir``: text files,
    masks (bit-exact) and initial weights (rebuilt from each run's config.json). Files already
    there must match. Returns the manifest."""
    file, root = Path(file), Path(root_dir)
    if not file.is_file():
        raise MissingFileError(f"state bundle {str(file)!r} does not exist")
    try:
        zf = zipfile.ZipFile(file)
    except zipfile.BadZipFile:
        raise UsageError(f"{file} is not a state bundle (not a zip file)") from None
    with zf:
        try:
            manifest = json.loads(zf.read(MANIFEST))
        except KeyError:
            raise UsageError(f"{file} is not a state bundle (no {MANIFEST})") from None
        if manifest.get("format") != FORMAT:
            raise UsageError(f"{file} has format {manifest.get('format')!r}; this version reads {FORMAT!r}")
        for name in manifest["files"]:
            _safe(name)
            _write(root / name, zf.read(name))
        decoded: dict[str, dict] = {}
        cache: dict = {}
        for entry in manifest["masks"]:  # parents precede their children
            name = entry["path"]
            _safe(name)
            rel = Path(name)
            bits = rel.with_suffix(".bits").as_posix()
            blob = zf.read(bits) if bits in zf.namelist() else b""
            rd = RunDir(root / rel.parent)
            if "config" in entry:
                _safe(entry["config"])
            orders = _orders(root / entry["config"] if "config" in entry else None, cache)
            masks = _decode_masks(entry, blob, decoded, rd, orders)
            decoded[name] = masks
            if rd.exists(rel.name):
                there = rd.load_tensors(rel.name)
                if there.keys() != masks.keys() or not all(torch.equal(there[k], masks[k]) for k in masks):
                    raise UsageError(f"{rd.file(rel.name)} exists with other masks than the bundle's")
            else:
                rd.save_tensors(rel.name, masks)
        for name in manifest["inits"]:
            _safe(name)
            rd = RunDir(root / name)
            if not rd.exists(RunDir.INIT):
                rd.save_tensors(RunDir.INIT, build_model_from_config(rd.load_json(RunDir.CONFIG)).state_dict())
        for name in manifest.get("checkpoints", ()):  # a training resumes from it where it stopped
            _safe(name)
            _write(root / name, zf.read(name))
    return manifest


def _safe(name: str) -> None:
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise UsageError(f"state bundle entry {name!r} points outside the import directory")


class PeriodicExport:
    """The saver of ``mcwt reproduce --export-every-minutes``
    (:func:`mcwt_ext.supervision.saving_with`): at each saved point (a training's checkpoint, a
    cell's end) it rewrites the bundle ``file`` with ``root``'s state, checkpoints included, once
    ``minutes / 2`` have passed since its last write. The grid's trainings checkpoint at least every
    ``minutes / 2`` (:attr:`checkpoint_minutes`), so a bundle is at most ``minutes`` behind the
    training while trainings run, and a kill loses at most that much."""

    def __init__(self, root: str | os.PathLike, file: str | os.PathLike, minutes: float, clock=None):
        if not minutes > 0:
            raise UsageError(f"--export-every-minutes: must be positive, got {minutes!r}")
        self.root, self.file, self.minutes = Path(root), Path(file), float(minutes)
        self.clock = clock or time.monotonic
        self.last = self.clock()
        self.writes = 0

    @property
    def checkpoint_minutes(self) -> float:
        return self.minutes / 2

    def __call__(self) -> None:
        if self.clock() - self.last >= 60.0 * self.minutes / 2:
            self.write()

    def write(self) -> dict:
        began = self.clock()
        manifest = export_state(self.root, self.file, checkpoints=True)
        self.last, self.writes = self.clock(), self.writes + 1
        print(f"exported the state to {self.file} ({self.file.stat().st_size:,} bytes, "
              f"{len(manifest['checkpoints'])} unfinished trainings' checkpoints, "
              f"{self.last - began:.1f} s)", file=sys.stderr, flush=True)
        return manifest
