"""The kernels are deterministic by construction (issue 29): the CUDA conv path is a fixed rule
(no timing), no op writes a process-wide math-mode flag, the calibration runs inside one op (one
host synchronisation per layer), each torchrun rank samples the same masks from its own data,
and what computed each layer's connectivity is recorded."""
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import DEVICES, IMPORT_ROOT, child_env
from mcwt_ext import _reference, ops
from mcwt_ext.data import load_dataset
from mcwt_ext.fit import LogisticFit, LogisticModel
from mcwt_ext.models import build_model
from mcwt_ext.sample import calibrate_bias, sample_record, sample_ticket

ROOT = Path(__file__).resolve().parent.parent
FIT = LogisticFit({
    "conv": {"magnitude": LogisticModel(1.2, 0.0, -1.0), "connectivity": LogisticModel(1.2, 0.8, -2.0)},
    "linear": {"magnitude": LogisticModel(0.9, 0.0, -1.0), "connectivity": LogisticModel(0.9, 0.5, -2.0)},
})


def test_no_kernel_chooses_by_timing_or_writes_a_math_mode_flag():
    sources = {p: p.read_text() for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cpp", ".cu")}
    for token in ("elapsed_time", "CUDAEvent", "cudaEventElapsedTime", "std::chrono", "setFloat32Precision",
                  "setAllowTF32", "setBenchmarkCuDNN", "setUserEnabledCuDNN"):
        assert not [p.name for p, text in sources.items() if token in text], token
    # every cuDNN conv asks for IEEE float32 and no timing-based algorithm search itself
    cudnn = re.findall(r"at::cudnn_convolution\((.*?)\);", "".join(sources.values()), re.S)
    assert cudnn and all("/*benchmark=*/false" in c and "/*allow_tf32=*/false" in c for c in cudnn)


# ---- the conv rule ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 3, 3, 3), (64, 64, 3, 3), (256, 128, 3, 3), (10, 512, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0), (10, 0)])
def test_the_conv_path_is_a_function_of_shape_dtype_and_capability(monkeypatch, shape, dtype, capability):
    monkeypatch.delenv(ops.masked_conv.CONV_IMPL_ENV, raising=False)
    assert ops.conv_path(shape, dtype, capability) == "cudnn"  # csrc/conv_path.h: cuDNN until timed
    for value, path in (("auto", "cudnn"), ("cudnn", "cudnn"), ("direct", "direct")):
        monkeypatch.setenv(ops.masked_conv.CONV_IMPL_ENV, value)
        assert ops.conv_path(shape, dtype, capability) == path
    monkeypatch.setenv(ops.masked_conv.CONV_IMPL_ENV, "fastest")
    with pytest.raises(RuntimeError, match="MCWT_CONV_IMPL must be 'auto', 'cudnn' or 'direct'"):
        ops.conv_path(shape, dtype, capability)


# ---- math-mode flags: read, never written ---------------------------------------------------------

FLAGS = {"mkldnn conv": lambda: torch.backends.mkldnn.conv.fp32_precision,
         "mkldnn matmul": lambda: torch.backends.mkldnn.matmul.fp32_precision,
         "cudnn conv": lambda: torch.backends.cudnn.conv.fp32_precision,
         "cuda matmul": lambda: torch.backends.cuda.matmul.fp32_precision}


def _flags():
    return {name: read() for name, read in FLAGS.items()}


REDUCED = ((torch.backends.mkldnn.conv, "tf32"), (torch.backends.mkldnn.matmul, "bf16"),
           (torch.backends.cudnn.conv, "tf32"), (torch.backends.cuda.matmul, "tf32"))


@pytest.fixture
def reduced_precision():
    """The user's float32 allowed below IEEE everywhere (TF32, BF16), restored after the test."""
    before = [(module, module.fp32_precision) for module, _ in REDUCED]
    try:
        for module, value in REDUCED:
            module.fp32_precision = value
        yield
    finally:
        for module, value in before:
            module.fp32_precision = value


def _layer_ops(device):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 8, 12, 12, generator=g).to(device)
    w = torch.randn(16, 8, 3, 3, generator=g).to(device)
    m = (torch.rand(w.shape, generator=g) < 0.5).to(device)
    xl, wl = torch.rand(40, 64, generator=g).to(device), torch.randn(32, 64, generator=g).to(device)
    ml = (torch.rand(wl.shape, generator=g) < 0.5).to(device)
    conn = torch.rand(8, generator=g).to(device) + 0.5
    args = dict(u_mag=1.5, u_conn=0.7)
    return {
        "masked_conv_block": lambda: ops.masked_conv_block(x, w, m, None, padding=1, pool=True),
        "masked_linear_block": lambda: ops.masked_linear_block(xl, wl, ml, None),
        "logistic_bernoulli": lambda: ops.logistic_bernoulli(w, conn, bias=-1.0, seed=3, **args),
        "logistic_topk": lambda: ops.logistic_topk(w, conn, bias=-1.0, k=100, seed=3, **args),
        "expected_density": lambda: ops.expected_density(w, conn, bias=-1.0, **args),
        "calibrate_bias": lambda: ops.calibrate_bias(w, conn, density=0.2, **args),
    }


def _watch_flags_while(run, seconds=0.5):
    """What a second thread reads of the flags while ``run`` is called repeatedly for about
    ``seconds``: the set of flag states it saw (one, when no op writes them)."""
    seen, stop = set(), threading.Event()

    def watch():
        while not stop.is_set():
            seen.add(tuple(sorted(_flags().items())))
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        import time
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            run()
    finally:
        stop.set()
        watcher.join()
    return seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("setting", ["default", "reduced"])
def test_ops_never_write_the_math_mode_flags(device, setting, request):
    """Before, during (read from another thread) and after every op, the flags are the user's,
    also when the user let float32 go below IEEE."""
    if setting == "reduced":
        request.getfixturevalue("reduced_precision")
    before = _flags()
    for name, run in _layer_ops(device).items():
        seen = _watch_flags_while(run, 0.3)
        assert seen == {tuple(sorted(before.items()))}, (name, seen)
        assert _flags() == before, name


@pytest.mark.parametrize("device", DEVICES)
def test_reduced_precision_flags_do_not_change_the_layer_ops_results(device, reduced_precision):
    """The ops compute IEEE float32 whatever the flags say (CPU: ATen's IEEE paths instead of
    oneDNN; CUDA: cuDNN asked per call), so the results stay within float32 rounding of the
    float64 reference, as without the flags."""
    layer = _layer_ops(device)
    g = torch.Generator().manual_seed(0)  # the inputs of _layer_ops, again
    x = torch.rand(40, 8, 12, 12, generator=g).double()
    w = torch.randn(16, 8, 3, 3, generator=g).double()
    m = torch.rand(w.shape, generator=g) < 0.5
    want_y, want_s = _reference.masked_conv_block(x, w, m, None, padding=1, pool=True)
    y, s = layer["masked_conv_block"]()
    # a bf16 or tf32 conv is off by ~1e-2 relative on these sums of 72 products; IEEE by ~1e-6
    torch.testing.assert_close(y.double().cpu(), want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.cpu(), want_s, rtol=1e-5, atol=1e-3)
    xl, wl = torch.rand(40, 64, generator=g).double(), torch.randn(32, 64, generator=g).double()
    ml = torch.rand(wl.shape, generator=g) < 0.5
    want_y, want_s = _reference.masked_linear_block(xl, wl, ml, None)
    y, s = layer["masked_linear_block"]()
    torch.testing.assert_close(y.double().cpu(), want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.cpu(), want_s, rtol=1e-5, atol=1e-3)


# ---- calibration: the reference's bisection, inside one op ------------------------------------------

@pytest.mark.parametrize("density", [0.003, 0.2, 0.8, 0.999])
@pytest.mark.parametrize("with_conn", [False, True])
@pytest.mark.parametrize("max_iter", [0, 3, 200])
def test_calibration_op_is_the_reference_bisection_bit_for_bit_on_cpu(density, with_conn, max_iter):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(48, 20, 3, 3, generator=g)
    conn = torch.rand(20, generator=g) * 3 if with_conn else None
    args = dict(u_mag=4.0, u_conn=1.3, density=density, max_iter=max_iter)
    want = _reference.sampling.calibrate_bias(w, conn, mean_keep=ops.expected_density, **args)
    assert ops.calibrate_bias(w, conn, **args) == want  # (bias, expected density), exactly
    assert calibrate_bias(w, conn, u_mag=4.0, u_conn=1.3, density=density, max_iter=max_iter) == want[0]


def test_calibration_that_cannot_bracket_raises_as_the_reference():
    w = torch.ones(10, 4)  # logits of 1e30 + bias: every weight kept at any bias down to -1e6
    for calibrate in (ops.calibrate_bias, _reference.sampling.calibrate_bias):
        with pytest.raises(RuntimeError, match="calibrate_bias: could not bracket the target density"):
            calibrate(w, None, u_mag=1e30, density=0.5)
        with pytest.raises(ValueError, match="density"):
            calibrate(w, None, u_mag=1.0, density=1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_calibration_reads_the_device_once_per_layer(device, monkeypatch):
    """Every .item(), .cpu(), .tolist() and float() of a tensor is counted: one per layer."""
    g = torch.Generator().manual_seed(1)
    w, conn = torch.randn(64, 32, 3, 3, generator=g).to(device), (torch.rand(32, generator=g) + 0.5).to(device)
    reads = []
    for method in ("item", "cpu", "tolist", "__float__", "__bool__", "numpy"):
        original = getattr(torch.Tensor, method)

        def counted(self, *a, _original=original, _name=method, **k):
            reads.append(_name)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, method, counted)
    bias = calibrate_bias(w, conn, u_mag=2.0, u_conn=1.0, density=0.2)
    monkeypatch.undo()
    assert len(reads) == 1, reads
    assert ops.expected_density(w, conn, u_mag=2.0, u_conn=1.0, bias=bias) == pytest.approx(0.2, abs=1e-6)


# ---- what computed the connectivity, recorded ---------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_sample_records_the_path_of_every_layers_connectivity(device):
    ds = load_dataset("digits")
    model = build_model("conv4", ds.in_channels, ds.num_classes, ds.image_size, seed=0).to(device)
    _, draws = sample_ticket(model, FIT, ds.train.tensors[0][:200].to(device), sparsity=0.8, seed=0)
    layers = [(n, m) for n, m in model.named_children() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    want = [None]
    for name, layer in layers[:-1]:
        kind = "linear" if isinstance(layer, torch.nn.Linear) else "conv"
        if device == "cpu":
            want.append("cpu")
        elif kind == "linear":
            want.append("cudnn")
        else:  # the rule's choice for that layer on this GPU
            want.append(ops.conv_path(layer.weight.shape, layer.weight.dtype, torch.cuda.get_device_capability()))
    assert [d.connectivity_path for d in draws] == want
    assert [layer["connectivity_path"] for layer in sample_record(draws, 1.0)["layers"]] == want
    _, hooked = sample_ticket(model, FIT, ds.train.tensors[0][:200].to(device), sparsity=0.8, seed=0, fused=False)
    assert [d.connectivity_path for d in hooked] == [None] + ["torch"] * (len(layers) - 1)


# ---- torchrun: every rank samples the same masks from its own data ----------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_masks(rank, world, port, out):
    from mcwt_ext import distributed, sample_masks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert distributed.init("cpu")
    try:
        ds = load_dataset("digits")
        model = build_model("conv2", ds.in_channels, ds.num_classes, ds.image_size, seed=0)
        # each rank its own share, unlike the other's: rank 1's images are brighter and shifted
        images = ds.train.tensors[0][rank * 300:(rank + 1) * 300] * (1 + 4 * rank) + rank
        torch.save(sample_masks(model, FIT, images, sparsity=0.8, seed=0), out / f"masks{rank}.pt")
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_each_rank_samples_the_same_masks_from_its_own_data(tmp_path):
    from mcwt_ext import sample_masks

    mp.spawn(_rank_masks, args=(2, _free_port(), tmp_path), nprocs=2, join=True)
    masks = [torch.load(tmp_path / f"masks{r}.pt") for r in (0, 1)]
    assert masks[0].keys() == masks[1].keys()
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    # and the data differ enough that a rank alone (no all-reduce) samples other masks
    ds = load_dataset("digits")
    model = build_model("conv2", ds.in_channels, ds.num_classes, ds.image_size, seed=0)
    alone = sample_masks(model, FIT, ds.train.tensors[0][300:600] * 5 + 1, sparsity=0.8, seed=0)
    assert not all(torch.equal(alone[k], masks[0][k]) for k in alone)


# ---- on a GPU -----------------------------------------------------------------------------------

_SAMPLE_IN_A_PROCESS = """
import sys, torch
from mcwt_ext import sample_masks
from mcwt_ext.data import load_dataset
from mcwt_ext.models import build_model
sys.path.insert(0, {tests!r})
from test_determinism import FIT
ds = load_dataset("digits")
model = build_model("conv4", ds.in_channels, ds.num_classes, ds.image_size, seed=0).cuda()
masks = sample_masks(model, FIT, ds.train.tensors[0][:500].cuda(), sparsity=0.8, seed=0)
torch.save({{k: v.cpu() for k, v in masks.items()}}, sys.argv[1])
"""


@pytest.mark.needs_cuda
def test_two_processes_on_one_gpu_sample_the_same_masks(tmp_path):
    code = _SAMPLE_IN_A_PROCESS.format(tests=str(Path(__file__).parent))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"m{i}.pt")], cwd=IMPORT_ROOT,
                              env=child_env(), stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:  # at the same time: each sees the other's load
        assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    a, b = (torch.load(tmp_path / f"m{i}.pt") for i in range(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.needs_cuda
def test_inside_a_cuda_graph_capture_the_conv_takes_the_rules_path(monkeypatch):
    """The rule's path inside a capture and outside: the replay's bits equal the eager call's."""
    monkeypatch.delenv(ops.masked_conv.CONV_IMPL_ENV, raising=False)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 5, 13, 11, generator=g).cuda()
    w = torch.randn(9, 5, 3, 3, generator=g).cuda()
    m = (torch.rand(w.shape, generator=g) < 0.5).cuda()
    torch.nn.functional.conv2d(x[:1], w)  # cuDNN's handles, outside the capture
    eager = ops.masked_conv_block(x, w, m, None, padding=1, pool=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.masked_conv_block(x, w, m, None, padding=1, pool=True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(eager[0], captured[0]) and torch.equal(eager[1], captured[1])


@pytest.mark.needs_cuda
def test_cuda_ops_ignore_the_global_tf32_settings_bit_for_bit(request):
    """cuDNN asked for IEEE per call: the same bits with the global TF32 settings on or off."""
    layer = _layer_ops("cuda")
    plain = {name: run() for name, run in layer.items() if name.startswith("masked")}
    request.getfixturevalue("reduced_precision")
    for name, (y, s) in plain.items():
        y2, s2 = layer[name]()
        assert torch.equal(y, y2) and torch.equal(s, s2), name


@pytest.mark.needs_cuda
def test_cuda_calibration_agrees_with_the_cpu_within_the_tolerance():
    g = torch.Generator().manual_seed(3)
    w, conn = torch.randn(128, 64, 3, 3, generator=g), torch.rand(64, generator=g) + 0.5
    for density in (0.01, 0.2, 0.9):
        cpu = ops.calibrate_bias(w, conn, u_mag=2.0, u_conn=1.0, density=density)
        cuda = ops.calibrate_bias(w.cuda(), conn.cuda(), u_mag=2.0, u_conn=1.0, density=density)
        assert cuda[0] == pytest.approx(cpu[0], rel=1e-6, abs=1e-6)  # the bisection's tol is 1e-7
        assert cuda[1] == pytest.approx(density, abs=1e-6)
