"""Throughput of the fused mask-sampling op against the PyTorch composition.

    .venv/bin/python benchmarks/bench_sampling.py [--device cpu|cuda|all] [--quick]

For every Conv6 layer weight shape and a 64M-element tensor: elements/s and
GB/s (4 bytes read + 1 written per float32 weight) of ``logistic_bernoulli``
and of ``torch.bernoulli(torch.sigmoid(u*|w| + v*g + b))``, and their ratio.
CPU runs with 1 and 2 threads; CUDA also reports the device copy bandwidth and
the kernel's share of it. A second table times ``expected_density`` and
``logistic_topk`` on the large tensor, a third the wall time per call from
Python on the small layers (host overhead included), a fourth the time to
calibrate one layer's intercept: the op ``calibrate_bias`` against the same
bisection driven from Python. Prints Markdown tables.
"""
import argparse
import platform
import statistics
import time

import torch

from mcwt_ext import ops

U_MAG, U_CONN, BIAS = 2.0, 0.5, -1.0
BYTES_PER_ELEMENT = 4 + 1  # float32 weight read, bool mask written

# Conv6 (Frankle & Carbin): 3x3 convs, then linear 4096 -> 256 -> 256 -> 10.
CONV6 = [
    ("conv 3->64", (64, 3, 3, 3)),
    ("conv 64->64", (64, 64, 3, 3)),
    ("conv 64->128", (128, 64, 3, 3)),
    ("conv 128->128", (128, 128, 3, 3)),
    ("conv 128->256", (256, 128, 3, 3)),
    ("conv 256->256", (256, 256, 3, 3)),
    ("linear 4096->256", (256, 4096)),
    ("linear 256->256", (256, 256)),
    ("linear 256->10", (10, 256)),
]


def timer(device):
    """Median seconds of fn() over repeats, after a warm-up call."""
    def measure(fn, repeats):
        fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return measure


def layer(shape, device):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen).to(device)
    connectivity = torch.rand(shape[1], generator=gen).to(device)
    return weight, connectivity


def composition(weight, connectivity):
    g = connectivity.reshape([1, -1] + [1] * (weight.dim() - 2))
    return torch.bernoulli(torch.sigmoid(U_MAG * weight.abs() + U_CONN * g + BIAS))


def fused(weight, connectivity):
    return ops.logistic_bernoulli(weight, connectivity, u_mag=U_MAG, u_conn=U_CONN, bias=BIAS, seed=0)


def repeats_for(numel, quick):
    if numel >= 1 << 22:
        return 2 if quick else 5
    return 20 if quick else 100


def copy_bandwidth(measure):
    """Device-to-device copy GB/s (read + write) of a 256 MiB buffer."""
    src = torch.empty(64 << 20, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    seconds = measure(lambda: dst.copy_(src), 20)
    return 2 * src.numel() * 4 / seconds / 1e9


def bernoulli_table(device, threads, shapes, quick, copy_gbs):
    measure = timer(device)
    rows = []
    for name, shape in shapes:
        weight, connectivity = layer(shape, device)
        n = weight.numel()
        reps = repeats_for(n, quick)
        ours = n / measure(lambda: fused(weight, connectivity), reps)
        theirs = n / measure(lambda: composition(weight, connectivity), reps)
        gbs = ours * BYTES_PER_ELEMENT / 1e9
        share = f"{100 * gbs / copy_gbs:.0f}%" if copy_gbs else "-"
        rows.append(f"| {device} | {threads} | {name} | {n:,} | {ours / 1e6:,.0f} | {gbs:.2f} | "
                    f"{theirs / 1e6:,.0f} | {theirs * BYTES_PER_ELEMENT / 1e9:.2f} | {ours / theirs:.1f}x | {share} |")
    return rows


def wall_per_call(fn, device, calls):
    """Wall-clock microseconds per call from Python, host overhead included (what a greedy
    sampler pays per small layer); CUDA is synchronised once at the end."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def small_layer_table(device, threads, quick):
    """Wall time per call on the smallest Conv6 layers: our ops against the composition."""
    calls = 200 if quick else 2000
    rows = []
    for name, shape in CONV6:
        if torch.Size(shape).numel() > 40_000:
            continue
        weight, connectivity = layer(shape, device)
        coeffs = dict(u_mag=U_MAG, u_conn=U_CONN, bias=BIAS)
        cases = [
            ("logistic_bernoulli", lambda: fused(weight, connectivity), lambda: composition(weight, connectivity)),
            ("expected_density", lambda: ops.expected_density(weight, connectivity, **coeffs),
             lambda: torch.sigmoid(U_MAG * weight.abs() + U_CONN * connectivity.reshape(
                 [1, -1] + [1] * (weight.dim() - 2)) + BIAS).mean(dtype=torch.float64).item()),
        ]
        for op, ours_fn, theirs_fn in cases:
            ours = wall_per_call(ours_fn, device, calls)
            theirs = wall_per_call(theirs_fn, device, calls)
            rows.append(f"| {device} | {threads} | {op} | {name} | {torch.Size(shape).numel():,} | "
                        f"{ours:.1f} | {theirs:.1f} | {theirs / ours:.1f}x |")
    return rows


def calibration_table(device, threads, shapes, quick):
    """Milliseconds to calibrate one layer's intercept to density 0.2: the op ``calibrate_bias``
    (the bisection inside one call; on CUDA one launch and one host read) against the same
    bisection run from Python, one ``expected_density`` call and host read per step (how the
    sampler calibrated before the op existed)."""
    from mcwt_ext._reference.sampling import calibrate_bias as host_loop

    calls = 3 if quick else 10
    rows = []
    for name, shape in shapes:
        weight, connectivity = layer(shape, device)
        coeffs = dict(u_mag=U_MAG, u_conn=U_CONN, density=0.2)
        ours = wall_per_call(lambda: ops.calibrate_bias(weight, connectivity, **coeffs), device, calls) / 1e3
        theirs = wall_per_call(lambda: host_loop(weight, connectivity, mean_keep=ops.expected_density, **coeffs),
                               device, calls) / 1e3
        rows.append(f"| {device} | {threads} | {name} | {torch.Size(shape).numel():,} | {ours:.2f} | {theirs:.2f} | "
                    f"{theirs / ours:.2f}x |")
    return rows


def other_ops_table(device, threads, shape, quick):
    measure = timer(device)
    weight, connectivity = layer(shape, device)
    n = weight.numel()
    reps = repeats_for(n, quick)
    g = connectivity.reshape(1, -1)
    k = n // 5
    coeffs = dict(u_mag=U_MAG, u_conn=U_CONN, bias=BIAS)
    p_of = lambda: torch.sigmoid(U_MAG * weight.abs() + U_CONN * g + BIAS)  # noqa: E731
    cases = [
        ("expected_density", lambda: ops.expected_density(weight, connectivity, **coeffs),
         lambda: p_of().mean(dtype=torch.float64).item()),
        ("logistic_topk k=n/5", lambda: ops.logistic_topk(weight, connectivity, **coeffs, k=k, seed=0),
         lambda: torch.topk((torch.rand_like(weight).log() / p_of()).reshape(-1), k).indices),
    ]
    rows = []
    for name, ours_fn, theirs_fn in cases:
        ours = n / measure(ours_fn, reps)
        theirs = n / measure(theirs_fn, reps)
        rows.append(f"| {device} | {threads} | {name} | {n:,} | {ours / 1e6:,.0f} | {theirs / 1e6:,.0f} | "
                    f"{ours / theirs:.1f}x |")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 16M-element large tensor")
    parser.add_argument("--size", type=int, metavar="N",
                        help="time only an N x N tensor instead of Conv-6's layers and the large "
                             "tensor (a smoke test: --quick --size 64)")
    args = parser.parse_args(argv)
    if args.size is not None and args.size < 1:
        parser.error(f"--size: must be >= 1, got {args.size}")

    if args.size is not None:
        big = (args.size, args.size)
        shapes = [(f"{args.size}x{args.size} tensor", big)]
    else:
        big = (4096, 4096) if args.quick else (8192, 8192)
        shapes = CONV6 + [(f"{big[0] * big[1] // 2**20}M tensor", big)]
    runs = []
    if args.device in ("cpu", "all"):
        runs += [("cpu", t) for t in (1, 2)]
    if args.device in ("cuda", "all"):
        if torch.cuda.is_available():
            runs.append(("cuda", None))
        elif args.device == "cuda":
            raise SystemExit("--device cuda: no CUDA device visible")

    print(f"# bench_sampling  torch {torch.__version__}  {platform.processor() or platform.machine()}"
          + (f"  GPU {torch.cuda.get_device_name()}" if any(d == "cuda" for d, _ in runs) else ""))
    bernoulli_rows, other_rows, small_rows, calibration_rows = [], [], [], []
    threads_before = torch.get_num_threads()
    try:
        for device, threads in runs:
            copy_gbs = None
            if device == "cpu":
                torch.set_num_threads(threads)
            else:
                copy_gbs = copy_bandwidth(timer("cuda"))
                print(f"CUDA device copy bandwidth: {copy_gbs:.0f} GB/s")
            bernoulli_rows += bernoulli_table(device, threads or "-", shapes, args.quick, copy_gbs)
            other_rows += other_ops_table(device, threads or "-", big, args.quick)
            small_rows += small_layer_table(device, threads or "-", args.quick)
            calibration_rows += calibration_table(device, threads or "-", shapes, args.quick)
    finally:
        torch.set_num_threads(threads_before)

    print("\nlogistic_bernoulli vs torch.bernoulli(torch.sigmoid(u*|w| + v*g + b))\n")
    print("| device | threads | weight | elements | ours M elem/s | ours GB/s | composition M elem/s "
          "| composition GB/s | speed-up | ours % of copy BW |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(bernoulli_rows))
    print("\nother ops on the large tensor (composition: sigmoid + mean / log(rand)/p + topk)\n")
    print("| device | threads | op | elements | ours M elem/s | composition M elem/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(other_rows))
    print("\nwall time per call from Python on small layers (host overhead included)\n")
    print("| device | threads | op | layer | elements | ours us/call | composition us/call | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(small_rows))
    print("\ncalibrating one layer to density 0.2: the op calibrate_bias against the bisection driven "
          "from Python (one expected_density call and host read per step)\n")
    print("| device | threads | weight | elements | op ms | Python loop ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(calibration_rows))


if __name__ == "__main__":
    main()
