"""The fused masked layer + connectivity-sums ops against their PyTorch reference."""
import pytest
import torch

from conftest import DEVICES
from mcwt_ext import _reference as ref
from mcwt_ext.ops import masked_conv_block, masked_linear_block

CUDA_IMPLS = ["auto", "cudnn", "direct"]  # auto: the measured choice per shape

# (N, C, H, W, K, kh, kw, padding, pool, bias): odd sizes, 1x1 and 5x5 kernels,
# padding 0/1/2, C=1, K=3, and sizes spanning several direct-kernel tiles,
# output-channel blocks and input-channel chunks (H, W > 16, K > 32, C > 8).
CONV_CASES = [
    (2, 1, 7, 9, 3, 3, 3, 1, True, True),
    (3, 4, 5, 5, 3, 1, 1, 0, False, False),
    (2, 3, 11, 10, 5, 5, 5, 2, True, True),
    (2, 3, 9, 7, 4, 3, 3, 0, True, False),
    (1, 2, 6, 6, 3, 3, 5, (1, 2), False, True),
    (2, 10, 19, 17, 34, 3, 3, 1, True, True),
    (1, 9, 18, 21, 70, 3, 3, 1, False, False),
]


@pytest.fixture
def ieee_fp32():
    """cuDNN may use TF32 for float32 convs; compare against full fp32 instead."""
    old = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    yield
    torch.backends.cudnn.conv.fp32_precision = old


def _layer_args(x_shape, weight_shape, with_bias, device, dtype, seed=0):
    """(input, weight, mask, bias) of a layer: He-scaled weight, half of it pruned."""
    g = torch.Generator().manual_seed(seed)
    fan_in = torch.Size(weight_shape[1:]).numel()
    x = torch.randn(x_shape, generator=g, dtype=torch.float64)
    weight = torch.randn(weight_shape, generator=g, dtype=torch.float64) / fan_in**0.5
    mask = torch.rand(weight_shape, generator=g) < 0.5
    bias = 0.1 * torch.randn(weight_shape[0], generator=g, dtype=torch.float64)
    x, weight, bias = (t.to(device=device, dtype=dtype) for t in (x, weight, bias))
    if not with_bias:
        bias = None
    return x, weight, mask.to(device), bias


def _conv_args(case, device, dtype, seed=0):
    n, c, h, w, k, kh, kw, padding, pool, with_bias = case
    args = _layer_args((n, c, h, w), (k, c, kh, kw), with_bias, device, dtype, seed)
    return args, dict(padding=padding, pool=pool)


def _linear_args(n, fin, fout, with_bias, device, dtype, seed=0):
    return _layer_args((n, fin), (fout, fin), with_bias, device, dtype, seed)


def _tol(dtype):
    # float32 leaves room for cuDNN's Winograd/FFT algorithms.
    return {torch.float32: 1e-4, torch.float64: 1e-12}[dtype]


def _assert_matches_float64_reference(out, args, kwargs, ref_fn):
    """y and sums close to the reference evaluated in float64 on the same inputs."""
    y, sums = out
    x = args[0]
    ref_args = [t.double() if t is not None and t.is_floating_point() else t for t in args]
    y_ref, sums_ref = ref_fn(*ref_args, **kwargs)
    assert y.dtype == x.dtype and y.device == x.device and y.shape == y_ref.shape
    assert y.is_contiguous()
    assert sums.dtype == torch.float64 and sums.device == x.device
    tol = _tol(x.dtype)
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(sums, sums_ref, rtol=tol, atol=tol * y[:, 0].numel())


def _assert_sums_of_output(out):
    """The sums are of the returned activation itself (the connectivity's numerator)."""
    y, sums = out
    dims = (0, 2, 3) if y.dim() == 4 else (0,)
    torch.testing.assert_close(sums, y.double().sum(dims), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_matches_reference(device, dtype, case, ieee_fp32):
    args, kwargs = _conv_args(case, device, dtype)
    out = masked_conv_block(*args, **kwargs)
    _assert_matches_float64_reference(out, args, kwargs, ref.masked_conv_block)
    _assert_sums_of_output(out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("pool", [False, True])
def test_conv_cpu_equals_reference_bitwise(dtype, pool):
    # On CPU the op runs the same ATen conv as the reference, so y is identical.
    args, kwargs = _conv_args((2, 3, 9, 11, 5, 3, 3, 1, pool, True), "cpu", dtype)
    y, sums = masked_conv_block(*args, **kwargs)
    y_ref, sums_ref = ref.masked_conv_block(*args, **kwargs)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(sums, sums_ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided_rows"])
def test_conv_non_contiguous(device, layout, ieee_fp32):
    args, kwargs = _conv_args((4, 3, 9, 9, 5, 3, 3, 1, True, True), device, torch.float64)
    x, weight, mask, bias = args
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
        weight = weight.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
        mask = mask.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        x = torch.nn.functional.pad(x, (0, 3))[..., :9]
    assert not x.is_contiguous()
    out = masked_conv_block(x, weight, mask, bias, **kwargs)
    _assert_matches_float64_reference(out, (x, weight, mask, bias), kwargs, ref.masked_conv_block)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pool", [False, True])
def test_conv_empty_batch(device, pool):
    args, kwargs = _conv_args((0, 3, 8, 7, 4, 3, 3, 1, pool, True), device, torch.float32)
    y, sums = masked_conv_block(*args, **kwargs)
    assert y.shape == ((0, 4, 4, 3) if pool else (0, 4, 8, 7))
    assert torch.equal(sums, torch.zeros(4, dtype=torch.float64, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_reference(device, dtype, with_bias):
    args = _linear_args(7, 33, 21, with_bias, device, dtype)
    out = masked_linear_block(*args)
    _assert_matches_float64_reference(out, args, {}, ref.masked_linear_block)
    _assert_sums_of_output(out)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_non_contiguous_and_empty(device):
    x, weight, mask, bias = _linear_args(6, 10, 4, True, device, torch.float64)
    xt = x.t().contiguous().t()
    assert not xt.is_contiguous()
    _assert_matches_float64_reference(
        masked_linear_block(xt, weight, mask, bias), (xt, weight, mask, bias), {},
        ref.masked_linear_block,
    )
    y, sums = masked_linear_block(x[:0], weight, mask, bias)
    assert y.shape == (0, 4)
    assert torch.equal(sums, torch.zeros(4, dtype=torch.float64, device=device))


@pytest.mark.parametrize("pool", [False, True])
def test_cpu_sums_independent_of_thread_count(pool):
    # Big enough for at::parallel_for to split the planes / units into several tasks.
    args, kwargs = _conv_args((8, 4, 15, 13, 60, 3, 3, 1, pool, True), "cpu", torch.float64)
    lin = _linear_args(500, 30, 300, True, "cpu", torch.float64)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((masked_conv_block(*args, **kwargs)[1], masked_linear_block(*lin)[1]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pool", [False, True])
def test_opcheck_conv(device, pool):
    args, kwargs = _conv_args((2, 3, 7, 6, 4, 3, 3, 1, pool, True), device, torch.float32)
    torch.library.opcheck(
        torch.ops.mcwt_ext.masked_conv2d_relu_sums.default, (*args, [1, 1], pool)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_linear(device, with_bias):
    args = _linear_args(5, 6, 7, with_bias, device, torch.float32)
    torch.library.opcheck(torch.ops.mcwt_ext.masked_linear_relu_sums.default, args)


def _bad_conv_calls():
    args, _ = _conv_args((2, 3, 6, 6, 4, 3, 3, 1, True, True), "cpu", torch.float32)
    x, w, m, b = args
    return [
        ((x, w, m[:, :2], b), {}, ValueError, "mask shape"),
        ((x[:, :2], w, m, b), {}, ValueError, "channels"),
        ((x, w.double(), m, b), {}, TypeError, "weight dtype"),
        ((x, w, m.float(), b), {}, TypeError, "mask must be a bool"),
        ((x.long(), w, m, b), {}, TypeError, "input must be float"),
        ((x, w, m, b[:3]), {}, ValueError, "bias must have shape"),
        ((x, w, m, b.double()), {}, TypeError, "bias dtype"),
        ((x[0], w, m, b), {}, ValueError, "input must be 4-D"),
        ((x, w[..., 0], m[..., 0], b), {}, ValueError, "weight must be 4-D"),
        ((x, w, m, b), {"padding": -1}, ValueError, "padding must be non-negative"),
        ((x, w, m, b), {"padding": (1, 2, 3)}, TypeError, "padding must be"),
        ((x, w, m, b), {"padding": 1.5}, TypeError, "padding must be"),
        ((x[..., :2, :2], w, m, b), {"padding": 0}, ValueError, "larger than the padded input"),
        ((x[..., :3, :3], w, m, b), {"padding": 0, "pool": True}, ValueError, "too small"),
        ((x.numpy(), w, m, b), {}, TypeError, "input must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("call", range(len(_bad_conv_calls())))
def test_conv_errors(call):
    args, kwargs, exc, match = _bad_conv_calls()[call]
    with pytest.raises(exc, match=match):
        masked_conv_block(*args, **kwargs)


def test_linear_errors():
    x, w, m, b = _linear_args(3, 5, 4, True, "cpu", torch.float32)
    with pytest.raises(ValueError, match="mask shape"):
        masked_linear_block(x, w, m.t(), b)
    with pytest.raises(ValueError, match="features"):
        masked_linear_block(x[:, :4], w, m, b)
    with pytest.raises(ValueError, match="input must be 2-D"):
        masked_linear_block(x[None], w, m, b)
    with pytest.raises(TypeError, match="mask must be a bool"):
        masked_linear_block(x, w, m.to(torch.uint8), b)


def test_kernel_checks_guard_direct_op_calls():
    # The C++ kernels repeat the checks for callers that bypass the wrappers.
    args, _ = _conv_args((2, 3, 6, 6, 4, 3, 3, 1, True, True), "cpu", torch.float32)
    x, w, m, b = args
    with pytest.raises(RuntimeError, match="mask shape"):
        torch.ops.mcwt_ext.masked_conv2d_relu_sums(x, w, m[:, :2], b, [1, 1], True)
    with pytest.raises(RuntimeError, match="padding"):
        torch.ops.mcwt_ext.masked_conv2d_relu_sums(x, w, m, b, [-1, 1], False)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        torch.ops.mcwt_ext.masked_linear_relu_sums(
            x[:, :, 0, 0], w[..., 0, 0], m[..., 0, 0].int(), b
        )


@pytest.mark.needs_cuda
def test_device_mismatch_is_rejected():
    args, kwargs = _conv_args((2, 3, 6, 6, 4, 3, 3, 1, True, True), "cuda", torch.float32)
    x, w, m, b = args
    with pytest.raises(ValueError, match="mask is on"):
        masked_conv_block(x, w, m.cpu(), b, **kwargs)
    with pytest.raises(ValueError, match="bias is on"):
        masked_conv_block(x, w, m, b.cpu(), **kwargs)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("impl", CUDA_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CONV_CASES)
def test_cuda_impls_match_reference(impl, dtype, case, monkeypatch, ieee_fp32):
    monkeypatch.setenv("MCWT_CONV_IMPL", impl)
    args, kwargs = _conv_args(case, "cuda", dtype)
    out = masked_conv_block(*args, **kwargs)
    _assert_matches_float64_reference(out, args, kwargs, ref.masked_conv_block)
    _assert_sums_of_output(out)
    again = masked_conv_block(*args, **kwargs)
    assert torch.equal(out[0], again[0]) and torch.equal(out[1], again[1])  # deterministic


@pytest.mark.needs_cuda
@pytest.mark.parametrize("impl", CUDA_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_impls_half_precision(impl, dtype, monkeypatch, ieee_fp32):
    monkeypatch.setenv("MCWT_CONV_IMPL", impl)
    args, kwargs = _conv_args((2, 5, 12, 13, 6, 3, 3, 1, True, True), "cuda", dtype)
    y, sums = masked_conv_block(*args, **kwargs)
    float_args = [t.float() if t is not None and t.is_floating_point() else t for t in args]
    y_ref, _ = ref.masked_conv_block(*float_args, **kwargs)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-2
    torch.testing.assert_close(y.float(), y_ref, rtol=tol, atol=tol)
    _assert_sums_of_output((y, sums))


@pytest.mark.needs_cuda
@pytest.mark.parametrize("impl", CUDA_IMPLS)
def test_cuda_impls_non_contiguous_and_large_kernel(impl, monkeypatch):
    monkeypatch.setenv("MCWT_CONV_IMPL", impl)
    # A 15x15 float64 kernel does not fit the direct kernel's shared-memory
    # tiles: it must fall back to the cuDNN path, not fail.
    args, kwargs = _conv_args((2, 20, 16, 16, 4, 15, 15, 7, True, False), "cuda", torch.float64)
    _assert_matches_float64_reference(
        masked_conv_block(*args, **kwargs), args, kwargs, ref.masked_conv_block
    )
    args, kwargs = _conv_args((3, 6, 20, 18, 40, 3, 3, 1, False, True), "cuda", torch.float64)
    x = args[0].to(memory_format=torch.channels_last)
    args = (x, *args[1:])
    _assert_matches_float64_reference(
        masked_conv_block(*args, **kwargs), args, kwargs, ref.masked_conv_block
    )


@pytest.mark.needs_cuda
def test_cuda_matches_cpu_and_rejects_unknown_impl(monkeypatch, ieee_fp32):
    args, kwargs = _conv_args((3, 4, 10, 10, 8, 3, 3, 1, True, True), "cpu", torch.float64)
    _, sums_cpu = masked_conv_block(*args, **kwargs)
    cuda_args = [None if t is None else t.cuda() for t in args]
    for impl in CUDA_IMPLS:
        monkeypatch.setenv("MCWT_CONV_IMPL", impl)
        _, sums = masked_conv_block(*cuda_args, **kwargs)
        torch.testing.assert_close(sums.cpu(), sums_cpu, rtol=1e-12, atol=1e-12)
    monkeypatch.setenv("MCWT_CONV_IMPL", "winograd")
    with pytest.raises(RuntimeError, match="MCWT_CONV_IMPL"):
        masked_conv_block(*cuda_args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_compute_in_ieee_fp32_and_restore_the_tf32_settings(device):
    # The sums are connectivity, compared across devices: the ops turn TF32 off inside
    # (cuDNN convs default to TF32) and leave the caller's settings as they were.
    backends = {"cpu": torch.backends.mkldnn, "cuda": torch.backends.cudnn}[device]
    old = backends.conv.fp32_precision
    try:
        backends.conv.fp32_precision = "tf32"
        args, kwargs = _conv_args((2, 3, 8, 8, 4, 3, 3, 1, True, True), device, torch.float32)
        y, sums = masked_conv_block(*args, **kwargs)
        masked_linear_block(y.flatten(1), torch.randn(5, y[0].numel(), device=device),
                            torch.ones(5, y[0].numel(), dtype=torch.bool, device=device))
        assert backends.conv.fp32_precision == "tf32"
        if device == "cuda":  # and the result is the IEEE one
            _assert_matches_float64_reference((y, sums), args, kwargs, ref.masked_conv_block)
    finally:
        backends.conv.fp32_precision = old


@pytest.mark.needs_cuda
def test_measured_choice_is_cached_and_deterministic(monkeypatch):
    monkeypatch.setenv("MCWT_CONV_IMPL", "auto")
    args, kwargs = _conv_args((60, 3, 32, 32, 64, 3, 3, 1, False, True), "cuda", torch.float32)
    first = masked_conv_block(*args, **kwargs)  # measures both paths, keeps one
    for _ in range(3):
        again = masked_conv_block(*args, **kwargs)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
