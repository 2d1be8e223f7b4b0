r"""Benchmarks of connectivity measurement (not a test).

Section ``op``: the fused masked layer op (``masked_conv_block``: conv of the
masked weight, ReLU, [2x2 max-pool] and the per-channel sums in one call)
against the PyTorch composition it replaces (``F.conv2d(x, w * mask, b)`` ->
ReLU -> [pool], then a separate ``y.sum((0, 2, 3))``), on every conv layer of
Conv6 at a 32x32 input. On CUDA the op's own choice (``auto``: the fixed rule of
``csrc/conv_path.h``) and both implementations forced (``MCWT_CONV_IMPL=cudnn`` and
``direct``) are timed; the "op impl" column names the path that ran (``auto (cudnn)``),
and these timings are what the rule's shapes are to be set from.

Section ``sampler``: the whole greedy ``sample_masks`` for Conv6 (connectivity of every
layer on the net masked so far, calibration, sampling) against the same loop in plain
PyTorch (a hooked full forward pass per layer, a separate mean, bisection on
``sigmoid(...).mean()``, ``bernoulli(sigmoid(...))``), over ``--samples`` CIFAR-sized inputs.

    .venv/bin/python benchmarks/bench_connectivity.py [--section op|sampler] \
        [--device cpu|cuda] [--threads 2] [--batch 60] [--quick] [--samples N]
"""
import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from mcwt_ext import _reference
from mcwt_ext.ops import layer_path, masked_conv_block
from mcwt_ext.ops.masked_conv import CONV_IMPL_ENV

# (name, in channels, out channels, input size, pool): Conv6's conv layers on CIFAR-10.
CONV6_LAYERS = [
    ("conv1", 3, 64, 32, False),
    ("conv2", 64, 64, 32, True),
    ("conv3", 64, 128, 16, False),
    ("conv4", 128, 128, 16, True),
    ("conv5", 128, 256, 8, False),
    ("conv6", 256, 256, 8, True),
]
DENSITY = 0.2  # the paper's tickets keep 20% of every layer


def _once_ms(fn, device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _time_ms(fns, device, repeats, warmup=2):
    """Median wall time (ms) of each of fns, called in turn so that load from
    other processes hits all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            t.append(_once_ms(fn, device))
    return [statistics.median(t) for t in times]


def _layer_inputs(c, k, size, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(batch, c, size, size, generator=g)).to(device)
    weight = (torch.randn(k, c, 3, 3, generator=g) / (9 * c) ** 0.5).to(device)
    mask = (torch.rand(k, c, 3, 3, generator=g) < DENSITY).to(device)
    bias = torch.zeros(k).to(device)
    return x, weight, mask, bias


def bench_op(device, batches, repeats, impls):
    """Rows of (layer, C, K, size, pool, batch, impl, composition ms, fused ms, conv ms).
    conv ms times the ATen/cuDNN masked conv alone: what the composition and the
    aten/cudnn paths of the op pay before their epilogues."""
    rows = []
    for batch in batches:
        for name, c, k, size, pool in CONV6_LAYERS:
            x, weight, mask, bias = _layer_inputs(c, k, size, batch, device)

            def composition():
                return _reference.masked_conv_block(x, weight, mask, bias, padding=1, pool=pool)

            def fused():
                return masked_conv_block(x, weight, mask, bias, padding=1, pool=pool)

            def conv_alone():
                return F.conv2d(x, weight * mask, bias, padding=1)

            for impl in impls:
                if impl is not None:
                    os.environ[CONV_IMPL_ENV] = impl
                # Both must agree before either is timed (loosely: cuDNN may use TF32).
                torch.testing.assert_close(fused()[1], composition()[1], rtol=1e-2, atol=1e-2)
                times = _time_ms([composition, fused, conv_alone], device, repeats)
                path = layer_path("conv", weight, device)  # what ran: the rule's or the forced path
                label = path if impl in (None, path) else f"{impl} ({path})"
                rows.append((name, c, k, size, pool, batch, label, *times))
    return rows


def _machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def run_op_section(args):
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        impls = [None]
    else:
        impls = ["auto", "cudnn", "direct"]  # auto: the rule's choice (csrc/conv_path.h)
    batches = args.batch or ([60] if device.type == "cpu" or args.quick else [60, 500])
    repeats = 3 if args.quick else 10
    old_impl = os.environ.get(CONV_IMPL_ENV)
    try:
        rows = bench_op(device, batches, repeats, impls)
    finally:
        if old_impl is None:
            os.environ.pop(CONV_IMPL_ENV, None)
        else:
            os.environ[CONV_IMPL_ENV] = old_impl
    print(f"### Masked conv + channel sums: {_machine(device)}, torch {torch.__version__}, "
          f"density {DENSITY}")
    print()
    print("| layer | C->K | input | pool | batch | op impl | composition ms | fused ms "
          "| speed-up | conv alone ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, c, k, size, pool, batch, impl, t_ref, t_op, t_conv in rows:
        print(f"| {name} | {c}->{k} | {size}x{size} | {'yes' if pool else 'no'} | {batch} | {impl} "
              f"| {t_ref:.3f} | {t_op:.3f} | {t_ref / t_op:.2f}x | {t_conv:.3f} |")
    print()


# --- section "sampler": the whole greedy sample_masks against a plain-PyTorch loop --------------

def plain_sample_masks(model, fit, x, sparsity=0.8, batch_size=500):
    """The same greedy MCWT loop in plain PyTorch: per layer, a full forward pass of the
    masked net with a pre-hook that sums the layer's input (then a separate mean),
    bisection on ``torch.sigmoid(...).mean()``, then ``torch.bernoulli(torch.sigmoid(...))``."""
    import copy

    from mcwt_ext.fit import normalised_connectivity
    from mcwt_ext.masks import apply_masks, layer_kind, prunable_layers

    net = copy.deepcopy(model)
    layers, kinds = prunable_layers(net), layer_kind(net)
    masks = {}
    for index, (name, module) in enumerate(layers):
        param = f"{name}.weight"
        w = module.weight.detach()
        logit = fit.model(kinds[param], index > 0).u_mag / w.double().std().item() * w.abs()
        if index > 0:
            sums, count = 0, 0

            def hook(mod, inputs):
                nonlocal sums, count
                t = inputs[0]
                sums = sums + t.sum([0] + list(range(2, t.dim())), dtype=torch.float64)
                count += t.numel() // t.shape[1]

            handle = module.register_forward_pre_hook(hook)
            with torch.no_grad():
                for xb in x.split(batch_size):
                    net(xb)
            handle.remove()
            g = normalised_connectivity(sums / count).to(w.dtype)
            shape = [1, -1] + [1] * (w.dim() - 2)
            logit = logit + fit.model(kinds[param], True).u_conn * g.view(shape)
        lo, hi = -64.0, 64.0
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if torch.sigmoid(logit + mid).mean().item() < 1 - sparsity:
                lo = mid
            else:
                hi = mid
        masks[param] = torch.bernoulli(torch.sigmoid(logit + 0.5 * (lo + hi))).bool()
        apply_masks(net, {param: masks[param]})
    return masks


def run_sampler_section(args):
    from mcwt_ext.fit import LogisticFit, LogisticModel
    from mcwt_ext.models import build_model
    from mcwt_ext.sample import sample_masks

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    n = args.samples or (45_000 if device.type == "cuda" else 2_000)
    fit = LogisticFit({k: {"magnitude": LogisticModel(3.0, 0.0, -2.0),
                           "connectivity": LogisticModel(3.0, 0.5, -2.0)} for k in ("conv", "linear")})
    model = build_model("conv6", seed=0).to(device)
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)

    def ours():
        return sample_masks(model, fit, x, sparsity=0.8, seed=0)

    def plain():
        return plain_sample_masks(model, fit, x)

    t_plain, t_ours = _time_ms([plain, ours], device, repeats=1, warmup=0)
    print(f"### Whole greedy sampler, Conv6 over {n} CIFAR-sized inputs: {_machine(device)}, "
          f"torch {torch.__version__}")
    print()
    print("| implementation | seconds | speed-up |")
    print("|---|---|---|")
    print(f"| plain PyTorch (hooks, full forward per layer, separate mean, bernoulli(sigmoid)) "
          f"| {t_plain / 1e3:.2f} | 1.00x |")
    print(f"| mcwt_ext.sample_masks (fused ops, streamed stages) | {t_ours / 1e3:.2f} "
          f"| {t_plain / t_ours:.2f}x |")
    print()


SECTIONS = {"op": run_op_section, "sampler": run_sampler_section}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--section", action="append", choices=sorted(SECTIONS),
                        help="section(s) to run (repeatable; default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--batch", type=int, action="append",
                        help="batch size(s) (default: 60, plus 500 on CUDA)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, batch 60 only")
    parser.add_argument("--samples", type=int,
                        help="sampler section: inputs connectivity is measured on "
                             "(default 45000 on CUDA, 2000 on CPU)")
    args = parser.parse_args(argv)
    for section in args.section or sorted(SECTIONS):
        SECTIONS[section](args)


if __name__ == "__main__":
    main()
