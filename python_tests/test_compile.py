"""torch.compile over the ops: the fake kernels let Dynamo/AOTAutograd trace them in one graph."""
import torch

from mcwt_ext import ops


def _pipeline(x, w1, m1, b1, w2, m2, g):
    """Every op once: a masked conv block, a masked linear block, then the three sampling ops."""
    y, conv_sums = ops.masked_conv_block(x, w1, m1, b1, padding=1, pool=True)
    z, lin_sums = ops.masked_linear_block(y.flatten(1), w2, m2)
    keep = ops.logistic_bernoulli(w1, g, u_mag=0.5, u_conn=0.25, bias=-0.1, seed=7, offset=1)
    top = ops.logistic_topk(w1, g, u_mag=0.5, u_conn=0.25, bias=-0.1, k=20, seed=7, offset=2)
    density = ops.expected_density(w1, g, u_mag=0.5, u_conn=0.25, bias=-0.1)
    return y, conv_sums, z, lin_sums, keep, top, density


def test_fullgraph_compile_matches_eager():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 6, 6, generator=gen)
    w1 = torch.randn(4, 2, 3, 3, generator=gen)
    m1 = torch.rand(4, 2, 3, 3, generator=gen) > 0.3
    b1 = torch.randn(4, generator=gen)
    w2 = torch.randn(5, 4 * 3 * 3, generator=gen)
    m2 = torch.rand(5, 36, generator=gen) > 0.3
    g = torch.rand(2, generator=gen) + 0.5
    args = (x, w1, m1, b1, w2, m2, g)
    torch._dynamo.reset()
    compiled = torch.compile(_pipeline, fullgraph=True, backend="aot_eager")  # fails on a graph break
    for got, want in zip(compiled(*args), _pipeline(*args)):
        got, want = torch.as_tensor(got), torch.as_tensor(want)  # expected_density gives a float
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert int(compiled(*args)[5].sum()) == 20  # exact-k keeps k
