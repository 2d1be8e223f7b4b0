"""Training step time: masked vs dense (the mask must cost <= 5%), and the cost of evaluation.

Conv-2 (or --arch) on CIFAR-sized random input (3x32x32, 10 classes), batch 60, Adam, the same
step as ``mcwt_ext.train.train``. Dense and masked (80% pruned per layer, random) steps alternate
one by one in one process, so a load change on a shared machine hits both alike; medians (and
the median of the paired differences) are compared. The mask's added work (two fused multiplies)
is also timed alone, right after real steps.

    .venv/bin/python benchmarks/bench_training.py [--arch conv2] [--threads 2] [--steps 100]

With ``--nets K[,K...]`` it measures packs instead (``mcwt_ext.lockstep``): net-steps/s of K
masked nets trained in lockstep in one process (grouped convolutions, and ``torch.func.vmap``),
beside the same K nets stepped one after another with train()'s own step, for each architecture
of ``--archs``. K separate processes are not timed: on a shared 2-core CPU they would measure the
scheduler; on a GPU, issue 10 measured them (time-slicing, ~540 net-steps/s for 6 Conv-2
processes on an H100). The three variants take turns step by step, so load changes hit all alike;
ratios are within one run. ``--tiny``: 8x8 images, 3 timed steps (a smoke test).
``--cuda-graph`` adds the pack under a CUDA graph (CUDA only).

    .venv/bin/python benchmarks/bench_training.py --nets 1,2,4,8,16 --archs conv2,conv4,conv6 --device cuda

With ``--precision-compare`` it times train()'s masked step in each arithmetic (``--precision``,
:mod:`mcwt_ext.precision`): fp32, fp32 with model and images channels-last, bf16 autocast on
contiguous images, and bf16 as train() runs it (channels-last images), taking turns step by step;
then evaluation per image in fp32 and bf16. The arithmetic floor of a step is its FLOPs (forward
and backward, counted by ``torch.utils.flop_counter``) divided by the peak rate of the step's
dtype, measured here as the fastest of square matrix products and 1x1 convolutions
(``--peak-size``) in that dtype;
the floor's share of the median and of the fastest step is shown. ``--shapes digits,cifar10`` times
both datasets' image shapes (1x8x8, 3x32x32) and sets their speed-ups side by side. ``--tiny``: 3
timed steps.

    .venv/bin/python benchmarks/bench_training.py --precision-compare [--arch conv2] [--threads 2]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import platform
import statistics
import time
import unittest.mock

import torch
from torch.utils.data import TensorDataset

import mcwt_ext.train as train_module
from mcwt_ext.masks import random_masks
from mcwt_ext.models import ARCHS, build_model
from mcwt_ext.train import BatchOrder, TrainConfig, _MaskEnforcer, _step, evaluate, make_optimizer


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_step(fn, device, times):
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    times.append(time.perf_counter() - t0)


def bench_packs(a, device):
    """Net-steps/s of packs of K nets against K nets stepped one by one, per architecture."""
    from torch.utils.data import TensorDataset

    from mcwt_ext.data import Dataset
    from mcwt_ext.lockstep import PackNet, PackOptions, _open, _Pack

    size = 8 if a.tiny else 32
    n = 600 if a.tiny else 6000
    g = torch.Generator().manual_seed(0)
    split = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(10, (n,), generator=g))
    ds = Dataset("random", split, split, split, 3, size, 10, (0.0,) * 3, (1.0,) * 3)
    x, y = (t.to(device) for t in split.tensors)
    steps, warmup = (3, 1) if a.tiny else (a.steps, a.warmup)
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {a.threads} threads"
    print(f"# bench_training --nets {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | "
          f"{what} | torch {torch.__version__}")
    print(f"{size}x{size} inputs, batch {a.batch_size}, sparsity {a.sparsity}, {steps} timed steps "
          f"(after {warmup}), medians; net-steps/s = K / step time\n")
    variants = ["separate", "grouped", "vmap"] + (["grouped+graph"] if a.cuda_graph else [])
    print("| arch | K | " + " | ".join(f"{v} net-steps/s" for v in variants) +
          " | grouped / separate | vmap / separate |" + (" graph / separate |" if a.cuda_graph else ""))
    print("|---|---|" + "---|" * (len(variants) + 2 + a.cuda_graph))
    for arch in a.archs.split(","):
        for k in [int(v) for v in a.nets.split(",")]:
            cfg = [TrainConfig.for_arch(arch, seed=s, batch_size=a.batch_size, device=str(device)) for s in range(k)]
            models = [build_model(arch, 3, 10, size, seed=s) for s in range(k)]
            masks = [random_masks(m, a.sparsity, seed=s) for s, m in enumerate(models)]
            runs = {}
            sep = []
            for m, mk, c in zip(models, masks, cfg):
                m = build_model(arch, 3, 10, size, seed=c.seed).to(device)
                enf = _MaskEnforcer(m, mk)
                enf.weights()
                sep.append((m, make_optimizer(m, c.lr), enf, BatchOrder(n, a.batch_size, c.seed)))

            def separate(it=[0]):
                for m, opt, enf, order in sep:
                    idx = order.indices(it[0]).to(device)
                    _step(m, opt, enf, x[idx], y[idx])
                it[0] += 1
            runs["separate"] = separate
            for v in variants[1:]:
                opts = PackOptions(impl="vmap" if v == "vmap" else "grouped", cuda_graph=v.endswith("graph"))
                states = [_open(PackNet(build_model(arch, 3, 10, size, seed=c.seed), mk, c), opts, device)
                          for mk, c in zip(masks, cfg)]
                pack = _Pack(states, ds, opts, device)
                idx = pack.batch_indices(0, steps + warmup)

                def packed(pack=pack, idx=idx, it=[0]):
                    pack.step(idx[it[0] % len(idx)])
                    it[0] += 1
                runs[v] = packed
            times = {v: [] for v in variants}
            for i in range(steps + warmup):
                for v in (variants if i % 2 else variants[::-1]):
                    _median_step(runs[v], device, times[v] if i >= warmup else [])
            rate = {v: k / statistics.median(times[v]) for v in variants}
            cells = " | ".join(f"{rate[v]:.1f}" for v in variants)
            ratios = " | ".join(f"{rate[v] / rate['separate']:.2f}x" for v in variants[1:])
            print(f"| {arch} | {k} | {cells} | {ratios} |", flush=True)


def _peak_flops(dtypes, device, size, repeats):
    """The best FLOP/s in each of ``dtypes`` of two dense kernels: a ``size``-square matrix
    product and a 1x1 convolution of the same work (channels-last, oneDNN's GEMM on a CPU; the
    matrix product may take a BLAS that runs float32 far slower on some CPUs). Each is timed
    ``repeats`` times, taking turns; on a shared machine the fastest is the undisturbed one."""
    side = max(1, math.isqrt(size // 64))  # the 1x1 conv: a (64 * side^2) x size by size x size product
    kernels = {}
    for d in dtypes:
        a, b = (torch.randn(size, size, device=device).to(d) for _ in range(2))
        x = torch.randn(64, size, side, side, device=device).to(d).contiguous(memory_format=torch.channels_last)
        w = torch.randn(size, size, 1, 1, device=device).to(d).contiguous(memory_format=torch.channels_last)
        kernels[d, "matmul"] = (lambda a=a, b=b: torch.mm(a, b), 2 * size ** 3)
        kernels[d, "conv1x1"] = (lambda x=x, w=w: torch.nn.functional.conv2d(x, w), 2 * 64 * side * side * size ** 2)
    times = {k: [] for k in kernels}
    for i in range(repeats + 1):  # the first round warms up
        for k, (fn, _) in kernels.items():
            _median_step(fn, device, times[k] if i else [])
    return {d: max(work / min(times[d, kind]) for (dd, kind), (_, work) in kernels.items() if dd == d)
            for d in dtypes}


#: --shapes: the images of each dataset, (channels, side)
SHAPES = {"digits": (1, 8), "cifar10": (3, 32)}


def bench_precisions(a, device):
    """:func:`bench_precision` for every shape of ``--shapes``, then their speed-ups side by side."""
    shapes = [s.strip() for s in a.shapes.split(",")]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: {unknown[0]!r} is not one of {', '.join(SHAPES)}")
    rows = {s: bench_precision(a, device, *SHAPES[s]) for s in shapes}
    print("\n| inputs | fp32 step ms (median) | bf16 step ms (median) | bf16 speed-up, paired median | "
          "bf16 evaluation speed-up |")
    print("|---|---|---|---|---|")
    for s, r in rows.items():
        c, side = SHAPES[s]
        print(f"| {s} ({c}x{side}x{side}) | {r['fp32_ms']:.1f} | {r['bf16_ms']:.1f} | {r['step_speedup']:.2f}x | "
              f"{r['eval_speedup']:.2f}x |")


def bench_precision(a, device, channels: int = 3, size: int = 32):
    """Step time in fp32, fp32 channels-last, bf16 and bf16 channels-last, beside the floor, on
    ``channels`` x ``size`` x ``size`` images; returns train()'s fp32 and bf16 step medians (ms) and
    the bf16 speed-ups of the step and of evaluation."""
    from torch.utils.flop_counter import FlopCounterMode

    from mcwt_ext.precision import native_bf16

    steps, warmup = (3, 1) if a.tiny else (a.steps, a.warmup)
    n = 600 if a.tiny else 6000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, channels, size, size, generator=g).to(device)
    y = torch.randint(10, (n,), generator=g).to(device)
    order = BatchOrder(n, a.batch_size, seed=0)
    # name: (precision _step runs in, whether model and images are channels-last beforehand)
    variants = {"fp32": ("fp32", False), "fp32 channels-last": ("fp32", True),
                "bf16": ("bf16", False), "bf16 channels-last": ("bf16", None)}
    runs = {}
    for name, (precision, last) in variants.items():
        model = build_model(a.arch, channels, 10, size, seed=0).to(device)
        if last:
            model = model.to(memory_format=torch.channels_last)
        masks = random_masks(model, a.sparsity, seed=0)
        enforcer = _MaskEnforcer(model, masks)
        enforcer.weights()
        runs[name] = (model, make_optimizer(model, ARCHS[a.arch].lr), enforcer, precision, last)

    def step(name, it):
        model, opt, enforcer, precision, last = runs[name]
        idx = order.indices(it).to(device)
        xb = x[idx].contiguous(memory_format=torch.channels_last) if last else x[idx]
        # "bf16": autocast alone, the images left contiguous (train() makes them channels-last)
        with unittest.mock.patch.object(train_module, "to_input_format", lambda _, t: t) \
                if last is False else contextlib.nullcontext():
            _step(model, opt, enforcer, xb, y[idx], precision)

    with FlopCounterMode(display=False) as counter:
        step("fp32", 0)
    flops = counter.get_total_flops()
    times = {v: [] for v in variants}
    names = list(variants)
    for it in range(warmup + steps):
        for name in names[it % len(names):] + names[:it % len(names)]:  # each goes first in turn
            _median_step(lambda: step(name, it), device, times[name] if it >= warmup else [])

    peak_size = 256 if a.tiny else a.peak_size
    peak = _peak_flops((torch.float32, torch.bfloat16), device, peak_size, 3 if a.tiny else a.peak_repeats)
    split = TensorDataset(x[:min(n, a.eval_images)], y[:min(n, a.eval_images)])
    model = runs["fp32"][0]
    evals = {p: [] for p in ("fp32", "bf16")}
    for i in range(3):
        for p in (("fp32", "bf16") if i % 2 else ("bf16", "fp32")):
            _median_step(lambda: evaluate(model, split, device, precision=p), device, evals[p] if i else [])

    what = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {a.threads} threads, native bf16: {native_bf16()}"
    print(f"# bench_training --precision-compare {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
          f" | {what} | torch {torch.__version__}")
    print(f"{a.arch}, {channels}x{size}x{size} inputs, batch {a.batch_size}, sparsity {a.sparsity}, {steps} timed steps "
          f"of each (after {warmup}), taking turns; {flops / 1e9:.2f} GFLOP per step (forward + backward); "
          f"peak {peak[torch.float32] / 1e9:.0f} GFLOP/s float32, {peak[torch.bfloat16] / 1e9:.0f} GFLOP/s "
          f"bfloat16 (the fastest of {3 if a.tiny else a.peak_repeats} {peak_size}-square matmuls "
          f"and 1x1 convs); "
          f"floor = FLOPs / peak of the step's dtype\n")
    # On a loaded machine the medians carry the other processes; the minima are the undisturbed
    # costs, so both are shown, with the floor's share of each.
    print("| variant | median ms | min ms | floor ms | floor / median | floor / min | "
          "fp32 / variant, medians | fp32 / variant, mins |")
    print("|---|---|---|---|---|---|---|---|")
    med = {v: statistics.median(t) for v, t in times.items()}
    low = {v: min(t) for v, t in times.items()}
    for name, (precision, _) in variants.items():
        floor = flops / peak[torch.bfloat16 if precision == "bf16" else torch.float32]
        print(f"| {name} | {med[name] * 1e3:.1f} | {low[name] * 1e3:.1f} | {floor * 1e3:.1f} | "
              f"{100 * floor / med[name]:.0f}% | {100 * floor / low[name]:.0f}% | "
              f"{med['fp32'] / med[name]:.2f}x | {low['fp32'] / low[name]:.2f}x |")
    lane = "bf16 channels-last"
    paired = statistics.median(f / b for f, b in zip(times["fp32"], times[lane]))
    print(f"\nbf16/fp32 speed-up of train()'s step (bf16 = channels-last images): medians "
          f"{med['fp32'] / med[lane]:.2f}x, paired median {paired:.2f}x, mins {low['fp32'] / low[lane]:.2f}x")
    per = {p: statistics.median(t) / len(split) for p, t in evals.items()}
    print(f"evaluation: fp32 {per['fp32'] * 1e3:.3f} ms/image, bf16 {per['bf16'] * 1e3:.3f} ms/image "
          f"({per['fp32'] / per['bf16']:.2f}x)")
    return dict(fp32_ms=med["fp32"] * 1e3, bf16_ms=med[lane] * 1e3, step_speedup=paired,
                eval_speedup=per["fp32"] / per["bf16"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="conv2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--batch-size", type=int, default=60)
    ap.add_argument("--steps", type=int, default=100, help="timed steps of each kind (they alternate)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed step pairs first")
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--eval-images", type=int, default=2000, help="images for the evaluation timing")
    ap.add_argument("--mask-repeats", type=int, default=20, help="timings of the mask ops alone")
    ap.add_argument("--nets", help="comma list of pack sizes K: time packs instead (see above)")
    ap.add_argument("--archs", default="conv2,conv4,conv6", help="architectures for --nets")
    ap.add_argument("--cuda-graph", action="store_true", help="with --nets: also the pack under a CUDA graph")
    ap.add_argument("--precision-compare", action="store_true",
                    help="time fp32, bf16 and their channels-last variants beside the floor (see above)")
    ap.add_argument("--peak-size", type=int, default=1024, help="with --precision-compare: side of "
                    "the square matmuls that measure the peak FLOP/s")
    ap.add_argument("--peak-repeats", type=int, default=30, help="with --precision-compare: matmuls "
                    "of each dtype; the fastest gives the peak")
    ap.add_argument("--shapes", default="cifar10", help="with --precision-compare: comma list of "
                    f"the datasets whose image shapes to time, of {', '.join(SHAPES)}; several are "
                    "summarised side by side")
    ap.add_argument("--tiny", action="store_true", help="with --nets: 8x8 images; with --nets or "
                    "--precision-compare: 3 timed steps (a smoke test)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if a.nets:
        return bench_packs(a, device)
    if a.precision_compare:
        return bench_precisions(a, device)

    g = torch.Generator().manual_seed(0)
    n = 6000
    x = torch.randn(n, 3, 32, 32, generator=g).to(device)
    y = torch.randint(10, (n,), generator=g).to(device)
    order = BatchOrder(n, a.batch_size, seed=0)

    def setup(masked):
        model = build_model(a.arch, seed=0).to(device)
        masks = random_masks(model, a.sparsity, seed=0) if masked else {}
        enforcer = _MaskEnforcer(model, masks)
        enforcer.weights()
        return model, make_optimizer(model, ARCHS[a.arch].lr), enforcer

    runs = {"dense": setup(False), "masked": setup(True)}
    times = {k: [] for k in runs}
    # Dense and masked steps alternate one by one (in alternating order), so load changes on a
    # shared machine hit both alike; the first `warmup` pairs (allocator, oneDNN/cuDNN plans) are
    # not timed.
    for it in range(a.warmup + a.steps):
        idx = order.indices(it).to(device)
        for name in (["dense", "masked"] if it % 2 else ["masked", "dense"]):  # neither always first
            model, opt, enforcer = runs[name]
            _sync(device)
            t0 = time.perf_counter()
            _step(model, opt, enforcer, x[idx], y[idx])
            _sync(device)
            if it >= a.warmup:
                times[name].append(time.perf_counter() - t0)

    # The added work alone: the two fused multiplies per step (gradients, then weights).
    # Timed after a step each time, so the caches hold what a real step leaves in them.
    model, opt, enforcer = runs["masked"]
    enforce = []
    for it in range(a.mask_repeats):
        idx = order.indices(it).to(device)
        _step(model, opt, enforcer, x[idx], y[idx])
        _sync(device)
        t0 = time.perf_counter()
        enforcer.grads()
        enforcer.weights()
        _sync(device)
        enforce.append(time.perf_counter() - t0)

    model = runs["dense"][0]
    split = TensorDataset(x[:a.eval_images], y[:a.eval_images])
    warm = min(1000, a.eval_images)
    evaluate(model, TensorDataset(x[:warm], y[:warm]), device)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    evaluate(model, split, device)
    _sync(device)
    eval_per_image = (time.perf_counter() - t0) / a.eval_images

    dense, masked = statistics.median(times["dense"]), statistics.median(times["masked"])
    paired = statistics.median(m - d for m, d in zip(times["masked"], times["dense"]))
    spec = ARCHS[a.arch]
    evals = spec.iterations // 100 + 1
    full = dense * spec.iterations + evals * 15_000 * eval_per_image  # val 5k + test 10k each time
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {a.threads} threads"
    print(f"# bench_training {datetime.date.today()} | {what} | torch {torch.__version__}")
    print(f"{a.arch}, batch {a.batch_size}, {a.steps} alternating steps of each kind, sparsity {a.sparsity}")
    print(f"dense step   median {dense * 1e3:8.2f} ms  (min {min(times['dense']) * 1e3:.2f})")
    print(f"masked step  median {masked * 1e3:8.2f} ms  (min {min(times['masked']) * 1e3:.2f})")
    print(f"mask overhead: medians {100 * (masked / dense - 1):+.1f}%, paired median "
          f"{100 * paired / dense:+.1f}%, mins {100 * (min(times['masked']) / min(times['dense']) - 1):+.1f}%")
    # On an oversubscribed machine an OpenMP barrier can wait a whole scheduler slice, so the
    # medians carry noise; the minima are the undisturbed costs.
    print(f"mask ops alone (grads + weights): median {statistics.median(enforce) * 1e3:.2f} ms, "
          f"min {min(enforce) * 1e3:.2f} ms = {100 * min(enforce) / min(times['dense']):.2f}% of the "
          f"fastest dense step")
    print(f"evaluation   {eval_per_image * 1e3:.3f} ms/image -> {15_000 * eval_per_image:.1f} s per "
          f"val+test evaluation")
    print(f"full protocol ({spec.iterations} iterations, {evals} evaluations) ~ {full / 3600:.1f} h "
          f"per training")


if __name__ == "__main__":
    main()
