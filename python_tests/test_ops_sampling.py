"""Mask-sampling ops (logistic_bernoulli, expected_density, logistic_topk) against their spec."""
import math

import pytest
import torch
from conftest import DEVICES

from mcwt_ext import _reference as ref
from mcwt_ext import ops
from mcwt_ext._reference import detmath, philox
from mcwt_ext._reference.sampling import keep_probability

pytestmark = pytest.mark.numerics  # compares computation paths (conftest.py)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# conv, linear, and a ragged one (numel % 4 != 0; output rows straddle CPU blocks)
SHAPES = [(64, 3, 3, 3), (10, 256), (33, 7)]
COEFFS = dict(u_mag=2.5, u_conn=-0.75, bias=-1.0)


def make_layer(shape, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen).to(dtype).to(device)
    connectivity = (2 * torch.rand(shape[1], generator=gen)).to(device)
    return weight, connectivity


def ulps_apart(a, b):
    """Distance in float32 ulps between finite float32 tensors of one sign."""
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


# ---- the spec's building blocks -------------------------------------------------------------


def test_philox_matches_random123_known_answers():
    # Random123 tests/kat_vectors, "philox4x32 10" rows: counter, key -> output.
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        words = philox.philox4x32_10([torch.tensor([c]) for c in counter], key)
        assert tuple(int(w) for w in words) == expected


def test_det_exp_and_log_are_accurate():
    x = torch.linspace(-87, 87, 200_001, dtype=torch.float32)
    assert ulps_apart(detmath.det_exp(x), torch.exp(x.double()).float()).max() <= 2
    u = torch.arange(1, 2**24 + 1, 97, dtype=torch.float32) * 2.0**-24  # the u' grid of top-k keys
    assert ulps_apart(detmath.det_log(u), torch.log(u.double()).float())[u != 1].max() <= 2
    assert detmath.det_log(torch.ones(1)).item() == 0.0


def test_det_exp_edges():
    x = torch.tensor([-math.inf, -88.0, 88.5, math.inf, math.nan])
    y = detmath.det_exp(x)
    assert y[:4].tolist() == [0.0, 0.0, math.inf, math.inf] and math.isnan(y[4])
    # between, results may be subnormal: still exact float32 products, the same on every device
    tiny = detmath.det_exp(torch.tensor([-87.5])).item()
    assert 0.0 < tiny < 2.0**-126 and tiny == pytest.approx(math.exp(-87.5), rel=1e-5)
    p = detmath.det_sigmoid(torch.tensor([-math.inf, math.inf, 0.0]))
    assert p.tolist() == [0.0, 1.0, 0.5]


# ---- kernels == reference, bit for bit --------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_conn", [False, True])
def test_bernoulli_matches_reference(device, dtype, shape, with_conn):
    w, g = make_layer(shape, dtype, device)
    g = g if with_conn else None
    mask = ops.logistic_bernoulli(w, g, **COEFFS, seed=11, offset=5)
    assert mask.dtype == torch.bool and mask.shape == w.shape and mask.device == w.device
    assert torch.equal(mask, ref.logistic_bernoulli(w, g, **COEFFS, seed=11, offset=5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_topk_matches_reference(device, dtype, shape):
    w, g = make_layer(shape, dtype, device)
    n = w.numel()
    for k in (0, 1, n // 5, n - 1, n):
        mask = ops.logistic_topk(w, g, **COEFFS, k=k, seed=3, offset=1)
        assert int(mask.sum()) == k
        assert torch.equal(mask, ref.logistic_topk(w, g, **COEFFS, k=k, seed=3, offset=1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_conn", [False, True])
def test_expected_density_matches_reference(device, dtype, with_conn):
    w, g = make_layer((128, 64, 3, 3), dtype, device)
    g = g if with_conn else None
    got = ops.expected_density(w, g, **COEFFS)
    assert isinstance(got, float)
    assert got == pytest.approx(ref.expected_density(w, g, **COEFFS), rel=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_and_nonfinite_logits_match_reference(device):
    # z = |w| - 50 sweeps [-50, 50] (beyond exp's [-87, 87] range after scaling), then +-inf and NaN.
    w = torch.cat([torch.linspace(-100, 100, 4001), torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0])])
    w = w.reshape(1, -1).to(device)
    for u_mag, bias in ((1.0, -50.0), (3.0, -150.0), (-1.0, 20.0)):
        for seed in range(3):
            kw = dict(u_mag=u_mag, bias=bias, seed=seed)
            assert torch.equal(ops.logistic_bernoulli(w, **kw), ref.logistic_bernoulli(w, **kw))
            assert torch.equal(ops.logistic_topk(w, k=1000, **kw), ref.logistic_topk(w, k=1000, **kw))


@pytest.mark.parametrize("device", DEVICES)
def test_infinite_logits_give_probability_exactly_zero_or_one(device):
    w = torch.full((64, 32), math.inf, device=device)
    assert ops.logistic_bernoulli(w, u_mag=1.0, bias=0.0, seed=0).all()
    assert not ops.logistic_bernoulli(w, u_mag=-1.0, bias=0.0, seed=0).any()
    assert ops.expected_density(w, u_mag=1.0, bias=0.0) == 1.0
    assert ops.expected_density(w, u_mag=-1.0, bias=0.0) == 0.0
    # p = 0 weights are kept only when k demands it, after every p > 0 weight
    w[0, :5] = 0.0
    assert ops.logistic_topk(w, u_mag=-1.0, bias=0.0, k=5, seed=0)[0, :5].all()


# ---- determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_seed_and_offset_select_the_stream(device):
    w, g = make_layer((64, 64, 3, 3), device=device)
    draw = lambda seed, offset: ops.logistic_bernoulli(w, g, **COEFFS, seed=seed, offset=offset)  # noqa: E731
    assert torch.equal(draw(7, 0), draw(7, 0))
    assert not torch.equal(draw(7, 0), draw(8, 0))
    assert not torch.equal(draw(7, 0), draw(7, 1))
    assert torch.equal(draw(-1, 2**40), ref.logistic_bernoulli(w, g, **COEFFS, seed=-1, offset=2**40))
    topk = lambda seed: ops.logistic_topk(w, g, **COEFFS, k=1000, seed=seed)  # noqa: E731
    assert torch.equal(topk(7), topk(7)) and not torch.equal(topk(7), topk(8))


def test_cpu_results_do_not_depend_on_thread_count():
    w, g = make_layer((256, 64, 3, 3))  # 147,456 weights: dozens of parallel tasks
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((ops.logistic_bernoulli(w, g, **COEFFS, seed=5),
                            ops.logistic_topk(w, g, **COEFFS, k=30_000, seed=5),
                            ops.expected_density(w, g, **COEFFS)))
    finally:
        torch.set_num_threads(threads)
    (m1, t1, d1), (m2, t2, d2) = results
    assert torch.equal(m1, m2) and torch.equal(t1, t2) and d1 == d2


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_and_cuda_agree(dtype):
    w, g = make_layer((256, 64, 3, 3), dtype)
    for op, kw in ((ops.logistic_bernoulli, dict(seed=9)), (ops.logistic_topk, dict(seed=9, k=20_000))):
        assert torch.equal(op(w, g, **COEFFS, **kw), op(w.cuda(), g.cuda(), **COEFFS, **kw).cpu())
    assert ops.expected_density(w, g, **COEFFS) == pytest.approx(
        ops.expected_density(w.cuda(), g.cuda(), **COEFFS), rel=1e-9)


# ---- statistics ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_keep_rate_within_binomial_bounds(device):
    w, g = make_layer((256, 128, 3, 3), device=device)
    p = keep_probability(w, g, **COEFFS).double()
    for seed in range(3):
        kept = ops.logistic_bernoulli(w, g, **COEFFS, seed=seed).sum().item()
        assert abs(kept - p.sum().item()) <= 5 * math.sqrt((p * (1 - p)).sum().item())


@pytest.mark.parametrize("device", DEVICES)
def test_topk_inclusion_follows_probability(device):
    # four bands of 16 weights with p = sigmoid(|w| - 2) increasing band by band
    w = torch.tensor([0.5, 1.5, 2.5, 3.5]).repeat_interleave(16).reshape(1, 64).to(device)
    counts = torch.zeros(64, device=device)
    for seed in range(200):
        mask = ops.logistic_topk(w, u_mag=1.0, bias=-2.0, k=16, seed=seed)
        assert int(mask.sum()) == 16
        counts += mask.reshape(-1)
    per_band = counts.reshape(4, 16).sum(dim=1).tolist()
    assert per_band == sorted(per_band) and per_band[0] < per_band[3] / 2


# ---- op registration -----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    w, g = make_layer((16, 8, 3, 3), device=device)
    samples = [
        (torch.ops.mcwt_ext.logistic_bernoulli.default, (w, g, 2.0, 0.5, -1.0, 3, 0)),
        (torch.ops.mcwt_ext.logistic_bernoulli.default, (w, None, 2.0, 0.0, -1.0, 3, 7)),
        (torch.ops.mcwt_ext.expected_density.default, (w, g, 2.0, 0.5, -1.0)),
        (torch.ops.mcwt_ext.logistic_topk.default, (w, g, 2.0, 0.5, -1.0, 100, 3, 0)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


# ---- inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_empty_weights(device):
    for shape in ((0, 5), (4, 0, 3, 3), (0,)):
        w = torch.empty(shape, device=device)
        g = torch.ones(shape[1], device=device) if len(shape) > 1 else None
        assert ops.logistic_bernoulli(w, g, **COEFFS, seed=0).shape == shape
        assert ops.logistic_topk(w, g, **COEFFS, k=0, seed=0).shape == shape
        assert math.isnan(ops.expected_density(w, g, **COEFFS))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    w, g = make_layer((32, 48, 3, 3), device=device)
    w_t = w.transpose(2, 3)  # non-contiguous view
    g_s = torch.stack([g, g], dim=1)[:, 0]  # strided connectivity
    assert not w_t.is_contiguous() and not g_s.is_contiguous()
    kw = dict(**COEFFS, seed=4)
    assert torch.equal(ops.logistic_bernoulli(w_t, g_s, **kw), ops.logistic_bernoulli(w_t.contiguous(), g, **kw))
    assert torch.equal(ops.logistic_topk(w_t, g_s, k=500, **kw), ops.logistic_topk(w_t.contiguous(), g, k=500, **kw))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_connectivity_equals_none(device):
    w, g = make_layer((64, 32), device=device)
    zeros = torch.zeros_like(g)
    assert torch.equal(ops.logistic_bernoulli(w, zeros, **COEFFS, seed=1), ops.logistic_bernoulli(w, None, **COEFFS, seed=1))


def test_requires_grad_weight_is_accepted():
    w, g = make_layer((8, 4))
    mask = ops.logistic_bernoulli(w.requires_grad_(), g, **COEFFS, seed=0)
    assert not mask.requires_grad


BAD_ARGS = [
    # (kwargs overriding a good call, exception, message fragment)
    (dict(connectivity=torch.ones(5)), ValueError, "connectivity must have length"),
    (dict(connectivity=torch.ones(8, 1)), ValueError, "connectivity must be 1-D"),
    (dict(connectivity=torch.ones(8, dtype=torch.int32)), TypeError, "connectivity must be floating"),
    (dict(weight=torch.ones(8)), ValueError, "connectivity needs a weight with an input dim"),
    (dict(weight=torch.ones(4, 8, dtype=torch.int64)), TypeError, "weight must be float16"),
    (dict(weight=torch.ones(4, 8, dtype=torch.bool)), TypeError, "weight must be float16"),
    (dict(u_mag=math.nan), ValueError, "u_mag must be finite"),
    (dict(u_conn=math.inf), ValueError, "u_conn must be finite"),
    (dict(bias=1e39), ValueError, "bias must be finite in float32"),
    (dict(bias="1"), TypeError, "bias must be a real number"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(offset=2**64), ValueError, "offset must fit in int64"),
]


@pytest.mark.parametrize("override, exc, match", BAD_ARGS)
@pytest.mark.parametrize("op", ["logistic_bernoulli", "logistic_topk", "expected_density"])
def test_bad_arguments_name_the_argument(op, override, exc, match):
    kwargs = dict(weight=torch.ones(4, 8), connectivity=torch.ones(8), u_mag=1.0, u_conn=0.5, bias=0.0)
    if op != "expected_density":
        kwargs.update(seed=0, offset=0)
    if op == "logistic_topk":
        kwargs.update(k=3)
    if op == "expected_density" and set(override) & {"seed", "offset"}:
        pytest.skip("expected_density takes no seed")
    kwargs.update(override)
    weight, connectivity = kwargs.pop("weight"), kwargs.pop("connectivity")
    for fn in (getattr(ops, op), getattr(ref, op)):
        with pytest.raises(exc, match=match):
            fn(weight, connectivity, **kwargs)


@pytest.mark.parametrize("k", [-1, 33, 2.0])
def test_topk_k_out_of_range(k):
    with pytest.raises((ValueError, TypeError), match="k must be"):
        ops.logistic_topk(torch.ones(4, 8), u_mag=1.0, bias=0.0, k=k, seed=0)


def test_connectivity_on_another_device_is_rejected():
    device = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(ValueError, match="connectivity must be on"):
        ops.logistic_bernoulli(torch.ones(4, 8), torch.ones(8, device=device), u_mag=1.0, bias=0.0, seed=0)


@pytest.mark.parametrize("call, match", [
    (lambda: torch.ops.mcwt_ext.logistic_bernoulli(torch.ones(4, 8), torch.ones(5), 1.0, 0.0, 0.0, 0, 0),
     "connectivity must have length"),
    (lambda: torch.ops.mcwt_ext.logistic_bernoulli(torch.ones(4, 8, dtype=torch.int32), None, 1.0, 0.0, 0.0, 0, 0),
     "weight must be float16"),
    (lambda: torch.ops.mcwt_ext.expected_density(torch.ones(4, 8), None, math.inf, 0.0, 0.0), "u_mag must be finite"),
    (lambda: torch.ops.mcwt_ext.logistic_topk(torch.ones(4, 8), None, 1.0, 0.0, 0.0, 33, 0, 0), "k must be in"),
    (lambda: torch.ops.mcwt_ext.logistic_topk(torch.ones(8), torch.ones(8), 1.0, 0.0, 0.0, 1, 0, 0),
     "connectivity needs a weight"),
])
def test_kernels_check_arguments_too(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()
