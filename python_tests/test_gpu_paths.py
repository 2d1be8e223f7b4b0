"""What the GPU scripts rely on, on CUDA (issue 18): `reproduce --pack auto` (cell threads, CUDA
graphs, a budget stop, export and import), half-precision packs under a CUDA graph, sampling past
one grid-stride round and from a misaligned pointer, the measured conv choice first met inside a
graph capture or from two threads, and the process groups (NCCL; gloo beside a visible GPU).
Every test here is needs_cuda: skipped on a CPU, selected by scripts/gpu_check.sh."""
import json
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from conftest import child_env, synthetic_model

from mcwt_ext import _reference as ref
from mcwt_ext import ops
from mcwt_ext.lockstep import PackNet, PackOptions, train_pack
from mcwt_ext.masks import random_masks
from mcwt_ext.train import TrainConfig

pytestmark = pytest.mark.needs_cuda

COEFFS = dict(u_mag=2.5, u_conn=-0.75, bias=-1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- reproduce --pack auto on CUDA ------------------------------------------------------------

def test_reproduce_pack_auto_on_cuda_stops_exports_and_finishes_elsewhere(tmp_path, monkeypatch, capsys):
    """Cells in threads, packs under CUDA graphs, MCWT sampled on the GPU; a budget stop after two
    packs exports the state, and a fresh directory imports it and finishes without redoing."""
    from mcwt_ext import sample as sample_mod
    from mcwt_ext.cli import main
    from mcwt_ext.experiments import budget as budget_mod

    base = ["reproduce", "--dataset", "synthetic", "--iterations", "6", "--eval-every", "3", "--seeds", "2",
            "--device", "cuda", "--pack", "auto", "--no-progress"]
    picks = []

    def left(self):  # two packs, then the time is spent
        picks.append(1)
        return 1e9 if len(picks) <= 2 else -1.0
    monkeypatch.setattr(budget_mod.Budget, "left", left)
    a, b, bundle = tmp_path / "a", tmp_path / "b", tmp_path / "state.zip"
    assert main([*base, "--time-budget", "600", "--out", str(a), "--export-state", str(bundle)]) == 0
    assert "time budget spent" in capsys.readouterr().err and bundle.is_file()
    monkeypatch.undo()
    finished = {p.relative_to(a): p.read_text() for p in a.glob("conv2/seed_*/**/summary.json")}
    assert finished

    devices, real_sample = [], sample_mod.sample_ticket

    def spy(model, *args, **kw):
        devices.append(next(model.parameters()).device.type)
        return real_sample(model, *args, **kw)
    monkeypatch.setattr(sample_mod, "sample_ticket", spy)
    assert main([*base, "--out", str(b), "--import-state", str(bundle)]) == 0
    for rel, text in finished.items():
        assert (b / rel).read_text() == text, rel  # imported, not redone
    assert devices and set(devices) == {"cuda"}  # MCWT sampled on the grid's device
    pack = json.loads((b / "conv2" / "seed_1" / "mcwt_connectivity" / "summary.json").read_text())["lockstep"]
    assert pack["cuda_graph"] is True and pack["device"].startswith("cuda")
    assert (b / "table.md").is_file()


# ---- half precision under a CUDA graph ------------------------------------------------------------

def _nets(seeds, root, lr=1e-3, iterations=12):
    cfg = dict(iterations=iterations, lr=lr, eval_every=3, checkpoint_every=4, device="cuda")
    return [PackNet(synthetic_model(s), random_masks(synthetic_model(s), 0.8, seed=s),
                    TrainConfig(**cfg, seed=s), root / f"net_{s}") for s in seeds]


def _distance(a, b):
    return max((x.float().cpu() - y.float().cpu()).abs().max().item()
               for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_half_precision_packs_train_under_a_cuda_graph(synthetic, tmp_path, precision):
    """The graph replays the eager step (fp16 without a GradScaler too): each graphed net moves
    from its init as the eager net does, far closer to the eager result than to its start."""
    eager, graphed = _nets([0, 1], tmp_path / "eager"), _nets([0, 1], tmp_path / "graphed")
    want = train_pack(eager, synthetic, PackOptions(precision=precision), progress=False)
    got = train_pack(graphed, synthetic, PackOptions(precision=precision, cuda_graph=True), progress=False)
    for s, (a, b, ra, rb) in enumerate(zip(eager, graphed, want, got)):
        assert rb.summary["lockstep"]["precision"] == precision and rb.summary["lockstep"]["cuda_graph"] is True
        assert all(torch.isfinite(torch.tensor([r["train_loss"] for r in rb.history[1:]])))
        assert all(torch.isfinite(p).all() for p in b.model.state_dict().values())
        moved = _distance(a.model, synthetic_model(s).cuda())
        assert moved > 0 and _distance(a.model, b.model) < 0.5 * moved
        assert [r["iteration"] for r in ra.history] == [r["iteration"] for r in rb.history]


# ---- sampling: past one grid-stride round, from a misaligned pointer --------------------------------

def test_sampling_past_one_grid_stride_round_equals_the_cpu():
    """9.1M weights: more than two rounds of the kernels' grid stride (about 4.3M elements)."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(1_300_001, 7, generator=gen)
    g = 2 * torch.rand(7, generator=gen)
    for op, kw in ((ops.logistic_bernoulli, dict(seed=4)), (ops.logistic_topk, dict(seed=4, k=w.numel() // 5))):
        assert torch.equal(op(w, g, **COEFFS, **kw), op(w.cuda(), g.cuda(), **COEFFS, **kw).cpu()), op.__name__
    assert ops.expected_density(w.cuda(), g.cuda(), **COEFFS) == pytest.approx(
        ops.expected_density(w, g, **COEFFS), rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_from_a_misaligned_base_pointer(dtype):
    """A weight that starts one element into its storage (not 16-byte aligned): the same masks as
    an aligned copy and as the CPU, for a size with a ragged tail."""
    gen = torch.Generator().manual_seed(5)
    shape = (4099, 33)
    flat = torch.randn(shape[0] * shape[1] + 1, generator=gen).to(dtype)
    g = 2 * torch.rand(shape[1], generator=gen)
    w = flat.cuda()[1:].view(shape)
    assert w.data_ptr() % 16 != 0 and w.is_contiguous()
    for op, kw in ((ops.logistic_bernoulli, dict(seed=6)), (ops.logistic_topk, dict(seed=6, k=20_000))):
        got = op(w, g.cuda(), **COEFFS, **kw).cpu()
        assert torch.equal(got, op(w.clone(), g.cuda(), **COEFFS, **kw).cpu()), op.__name__
        assert torch.equal(got, op(flat[1:].view(shape), g, **COEFFS, **kw)), op.__name__
    assert ops.expected_density(w, g.cuda(), **COEFFS) == pytest.approx(
        ops.expected_density(flat[1:].view(shape), g, **COEFFS), rel=1e-9)  # as test_ops_sampling.py


# ---- the measured conv choice: first inside a graph capture, and from two threads ------------------

def _layer(shape, seed):
    """(input, weight, mask, bias) in float32 on CUDA for conv case ``shape`` = (n, c, h, w, k, kh)."""
    n, c, h, w, k, kh = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    weight = torch.randn(k, c, kh, kh, generator=gen) / (c * kh * kh) ** 0.5
    mask = torch.rand(k, c, kh, kh, generator=gen) < 0.5
    bias = 0.1 * torch.randn(k, generator=gen)
    return [t.cuda() for t in (x, weight, mask, bias)]


def _check_against_reference(out, args, pool):
    want_y, want_sums = ref.masked_conv_block(*[t.cpu().double() if t.is_floating_point() else t.cpu()
                                                for t in args], padding=1, pool=pool)
    # as test_ops_masked_conv.py: float32 (IEEE inside the op) to 1e-4, the sums over y[:, k]
    tol = 1e-4
    torch.testing.assert_close(out[0].cpu().double(), want_y, rtol=tol, atol=tol)
    torch.testing.assert_close(out[1].cpu(), want_sums, rtol=tol, atol=tol * out[0][:, 0].numel())


def test_conv_first_seen_inside_a_graph_capture(monkeypatch):
    """A shape first called while a CUDA graph is captured: the capture works (the path is the
    rule's, no timing is involved) and its replays compute the right result."""
    from mcwt_ext.ops import masked_conv_block

    monkeypatch.setenv("MCWT_CONV_IMPL", "auto")
    torch.nn.functional.conv2d(torch.randn(1, 1, 4, 4, device="cuda"), torch.randn(1, 1, 3, 3, device="cuda"))
    args = _layer((6, 5, 13, 11, 9, 3), seed=1)  # a shape no other test uses
    static = args[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = masked_conv_block(static, *args[1:], padding=1, pool=True)
    for seed in (2, 3):
        fresh = _layer((6, 5, 13, 11, 9, 3), seed=seed)[0]
        static.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        _check_against_reference(out, [fresh, *args[1:]], pool=True)
    _check_against_reference(masked_conv_block(*args, padding=1, pool=True), args, pool=True)  # eager after


def test_conv_from_two_threads_at_once(monkeypatch):
    """Two threads meet a new shape together: both take the rule's path and compute the same
    bits."""
    from mcwt_ext.ops import masked_conv_block

    monkeypatch.setenv("MCWT_CONV_IMPL", "auto")
    args = _layer((8, 7, 17, 15, 12, 3), seed=4)  # a shape no other test uses
    barrier, results = threading.Barrier(2), [None, None]

    def run(i):
        try:
            barrier.wait()
            out = masked_conv_block(*args, padding=1, pool=False)
            torch.cuda.synchronize()
            results[i] = out
        except BaseException as e:  # noqa: BLE001 - reported below
            results[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(isinstance(r, BaseException) for r in results), results
    (y0, s0), (y1, s1) = results
    again = masked_conv_block(*args, padding=1, pool=False)
    for y, s in ((y1, s1), again):  # one choice for the shape from then on, and the kernels are deterministic
        assert torch.equal(y0, y) and torch.equal(s0, s)
    _check_against_reference((y0, s0), args, pool=False)


# ---- process groups -----------------------------------------------------------------------------

def test_nccl_process_group_of_one():
    """`--device cuda` ranks join with NCCL (a group of one: NCCL needs a GPU per process)."""
    code = textwrap.dedent(f"""
        import os, torch, torch.distributed as dist
        from mcwt_ext import distributed
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{_free_port()}", RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        distributed.join("cuda")
        assert dist.get_backend() == "nccl" and torch.cuda.current_device() == 0
        t = torch.arange(3.0, device="cuda")
        dist.all_reduce(t)
        dist.barrier()
        torch.cuda.synchronize()
        assert t.tolist() == [0.0, 1.0, 2.0]
        distributed.shutdown()
        print("nccl ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=child_env())
    assert done.returncode == 0 and "nccl ok" in done.stdout, done.stderr[-3000:]


def test_two_cpu_ranks_use_gloo_beside_a_visible_gpu(tmp_path):
    """`--device cpu` under torchrun on a GPU machine: gloo, no CUDA device per rank (it failed
    with "invalid device ordinal" when NCCL followed the visible GPU)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "-m", "mcwt_ext.cli", "train", "--arch", "conv2",
               "--dataset", "synthetic", "--iterations", "4", "--eval-every", "2", "--batch-size", "20",
               "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=child_env(OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(tmp_path / "run" / "summary.json").is_file()
