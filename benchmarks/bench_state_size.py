"""Size of the state bundle (``mcwt_ext.state.export_state``) of a whole full-protocol grid.

Builds, in a temporary directory, what ``mcwt reproduce --protocol full`` leaves per
architecture and seed, at CIFAR-10 shapes: IMP's mask sets at the protocol's rates until every
layer is at 80% pruned (the stopping rule of ``mcwt_ext.imp``; the "trained" weights that rank
each round are the initial weights plus Gaussian noise), the ticket, the random cell (derived
from its seed), an MCWT-with-connectivity-like mask set (Bernoulli draws at density 0.2 favouring
large initial weights), one metrics.csv per training (an evaluation every 100 iterations, six float columns),
summaries and configs. MCWT without connectivity is sampled for real from a fit on the simulated
ticket (connectivity measured on random inputs), so the bundle re-derives it as it does in a grid.
Then it exports the grid and reports the bundle's size by part.

    .venv/bin/python benchmarks/bench_state_size.py [--archs conv2,conv4,conv6] [--seeds 3]
"""
from __future__ import annotations

import argparse
import datetime
import random
import tempfile
import zipfile
from pathlib import Path

import torch

from mcwt_ext.masks import dense_masks, kept_count, layer_kind, magnitude_prune, random_masks
from mcwt_ext.models import arch_spec, build_model
from mcwt_ext.fit import fit_ticket
from mcwt_ext.runs import RunDir
from mcwt_ext.sample import sample_ticket
from mcwt_ext.state import export_state
from mcwt_ext.train import METRICS_FIELDS


def _metrics(rd: RunDir, iterations: int, rng: random.Random) -> None:
    rows = [{k: (i if k == "iteration" else rng.random()) for k in METRICS_FIELDS}
            for i in list(range(0, iterations, 100)) + [iterations]]
    rd.save_csv(RunDir.METRICS, rows, METRICS_FIELDS)
    rd.save_json(RunDir.SUMMARY, {"iterations": iterations, "val_acc_final": rows[-1]["val_acc"],
                                  "val_acc_early_stop": rng.random(), "wall_time_s": rng.random() * 100})


def build_grid(root: Path, archs: list[str], seeds: int) -> dict[str, int]:
    rounds = {}
    for arch in archs:
        spec = arch_spec(arch)
        for seed in range(seeds):
            rng = random.Random(seed)
            model = build_model(arch, seed=seed)
            init = model.state_dict()
            base = RunDir(root / arch / f"seed_{seed}")
            config = dict(arch=arch, dataset="cifar10", in_channels=3, image_size=32, num_classes=10,
                          seed=seed, protocol=dict(name="full", sparsity=0.8))
            kinds = layer_kind(model, torch.zeros(1, 3, 32, 32))
            rate = {"conv": spec.conv_prune_rate, "linear": spec.linear_prune_rate, "output": spec.output_prune_rate}
            rates = {n: rate[k] for n, k in kinds.items()}
            targets = {n: 0.2 for n in kinds}
            imp = base.subdir("imp")
            imp.save_json(RunDir.CONFIG, dict(config, command="reproduce:imp"))
            imp.save_tensors(RunDir.INIT, init)
            masks, g = dense_masks(model), torch.Generator().manual_seed(seed)
            for r in range(100):
                rd = imp.subdir(f"round_{r:02d}")
                rd.save_tensors(RunDir.MASKS, masks)
                _metrics(rd, spec.iterations, rng)
                if all(int(m.sum()) <= kept_count(m.numel(), 0.2) for m in masks.values()):
                    break
                trained = {k: v + v.std() * torch.randn(v.shape, generator=g) for k, v in init.items()}
                masks = magnitude_prune(trained, masks, rates, targets)
            rounds[arch] = r + 1
            imp.save_tensors(RunDir.MASKS, masks)
            imp.save_json(RunDir.SUMMARY, dict(rounds=[dict(round=i) for i in range(r + 1)]))
            rnd = base.subdir("random")
            rnd.save_json(RunDir.CONFIG, dict(config, command="reproduce:random"))
            rnd.save_tensors(RunDir.INIT, init)
            rnd.save_tensors(RunDir.MASKS, random_masks(model, 0.8, seed))
            _metrics(rnd, spec.iterations, rng)
            # The fit on the (simulated) ticket, connectivity on random inputs; MCWT without
            # connectivity sampled from it as the grid does (the bundle re-derives it).
            fit = fit_ticket(model, masks, torch.randn(64, 3, 32, 32, generator=g), seed=seed,
                             max_weights_per_layer=20_000)
            fit.save(base.subdir("fit").file(RunDir.FIT))
            for kind in ("mcwt_magnitude", "mcwt_connectivity"):
                rd = base.subdir(kind)
                rd.save_json(RunDir.CONFIG, dict(config, command=f"reproduce:{kind}",
                                                 use_connectivity=kind == "mcwt_connectivity"))
                rd.save_tensors(RunDir.INIT, init)
                if kind == "mcwt_magnitude":
                    sampled = sample_ticket(model, fit, None, sparsity=0.8, use_connectivity=False, seed=seed)[0]
                else:
                    sampled = {}
                    for n in kinds:
                        w = init[n].abs() / init[n].std()
                        p = torch.sigmoid(2.0 * w - 2.5)
                        p = (p * (0.2 / p.mean())).clamp(0, 1)
                        sampled[n] = torch.bernoulli(p, generator=g).bool()
                rd.save_tensors(RunDir.MASKS, sampled)
                rd.save_json("sample.json", dict(wall_time_s=rng.random()))
                _metrics(rd, spec.iterations, rng)
    return rounds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="conv2,conv4,conv6")
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args(argv)
    archs = a.archs.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "grid"
        rounds = build_grid(root, archs, a.seeds)
        bundle = Path(tmp) / "state.zip"
        export_state(root, bundle)
        with zipfile.ZipFile(bundle) as zf:
            parts = {"masks (.bits)": 0, "metrics.csv": 0, "other text": 0}
            raw = dict(parts)
            for i in zf.infolist():
                key = "masks (.bits)" if i.filename.endswith(".bits") else \
                    "metrics.csv" if i.filename.endswith("metrics.csv") else "other text"
                parts[key] += i.compress_size
                raw[key] += i.file_size
        disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        print(f"# bench_state_size {datetime.date.today()} | {', '.join(archs)} x {a.seeds} seeds, full protocol")
        print(f"IMP trainings per seed (dense round included): {rounds}")
        print(f"grid on disk (masks as safetensors, inits): {disk / 2**20:.1f} MiB")
        for k in parts:
            print(f"{k:>14}: {raw[k] / 2**20:7.2f} MiB before LZMA, {parts[k] / 2**20:7.2f} MiB in the bundle")
        print(f"bundle: {bundle.stat().st_size / 2**20:.2f} MiB ({bundle.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
