"""Pruning at init: each score against a hand computation; exact counts; errors; no side effects."""
import pytest
import torch
from torch import nn

from conftest import DEVICES, synthetic_model
from mcwt_ext.masks import kept_count
from mcwt_ext.prune_at_init import (METHODS, allocate, grasp_scores, prune_at_init, scoring_batches,
                                    snip_scores, synflow_masks, synflow_schedule, synflow_scores)

D, H, C, N = 5, 4, 3, 7


def _mlp(device="cpu", seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, C)).double().to(device)


def _data(device="cpu"):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(N, D, generator=g, dtype=torch.float64).to(device),
            torch.randint(0, C, (N,), generator=g).to(device))


def _manual_grads(w1, b1, w2, b2, x, y, temperature=1.0):
    """dL/dW1, dL/dW2 of mean CE(logits / T), written out by hand (no autograd)."""
    pre = x @ w1.T + b1
    a = pre.clamp(min=0)
    z = (a @ w2.T + b2) / temperature
    dz = (torch.softmax(z, 1) - nn.functional.one_hot(y, C).double()) / (len(y) * temperature)
    dw2 = dz.T @ a
    dpre = (dz @ w2) * (pre > 0)
    return dpre.T @ x, dw2


@pytest.mark.parametrize("device", DEVICES)
def test_snip_matches_hand_computation(device):
    model, (x, y) = _mlp(device), _data(device)
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    dw1, dw2 = _manual_grads(w1, b1, w2, b2, x, y)
    # Two uneven batches: the score is of the mean loss over all samples, whatever the batching.
    scores = snip_scores(model, [(x[:3], y[:3]), (x[3:], y[3:])])
    torch.testing.assert_close(scores["0.weight"], (w1 * dw1).abs())
    torch.testing.assert_close(scores["2.weight"], (w2 * dw2).abs())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_grasp_matches_hand_computation(device, temperature):
    """-w * Hg with Hg from central differences of the hand-written gradient: (grad(w + eps g) -
    grad(w - eps g)) / 2 eps, exact up to O(eps^2) in float64."""
    model, (x, y) = _mlp(device), _data(device)
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    g1, g2 = _manual_grads(w1, b1, w2, b2, x, y, temperature)
    eps = 1e-5 * temperature
    plus = _manual_grads(w1 + eps * g1, b1, w2 + eps * g2, b2, x, y, temperature)
    minus = _manual_grads(w1 - eps * g1, b1, w2 - eps * g2, b2, x, y, temperature)
    hg1, hg2 = ((p - m) / (2 * eps) for p, m in zip(plus, minus))
    scores = grasp_scores(model, [(x[:4], y[:4]), (x[4:], y[4:])], temperature=temperature)
    scale = max(hg1.abs().max(), hg2.abs().max()).item()
    torch.testing.assert_close(scores["0.weight"], -w1 * hg1, atol=1e-6 * scale, rtol=1e-5)
    torch.testing.assert_close(scores["2.weight"], -w2 * hg2, atol=1e-6 * scale, rtol=1e-5)
    assert scores["2.weight"].abs().sum() > 0


def test_grasp_keeps_the_weights_of_lowest_hand_computed_score():
    """GraSP removes the weights whose removal most reduces the gradient flow: the highest
    S = -w * Hg, so it keeps the lowest S. Here S is the hand computation above (no autograd), on
    every scoring sample in one batch; per layer, the kept set is exactly the k lowest S (the
    opposite direction keeps a disjoint set here)."""
    model, (x, y) = _mlp(), _data()
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    g1, g2 = _manual_grads(w1, b1, w2, b2, x, y)
    eps = 1e-5
    plus = _manual_grads(w1 + eps * g1, b1, w2 + eps * g2, b2, x, y)
    minus = _manual_grads(w1 - eps * g1, b1, w2 - eps * g2, b2, x, y)
    hand = {"0.weight": -w1 * (plus[0] - minus[0]) / (2 * eps), "2.weight": -w2 * (plus[1] - minus[1]) / (2 * eps)}
    masks = prune_at_init(model, "grasp", torch.utils.data.TensorDataset(x, y), sparsity=0.5,
                          samples_per_class=None, batch_size=N, temperature=1.0)
    for name, score in hand.items():
        kept, score = masks[name].flatten(), score.flatten()
        assert int(kept.sum()) == kept_count(score.numel(), 0.5)
        # every kept score at most every pruned one (ties, e.g. dead ReLU units' zeros, either way)
        assert score[kept].max() <= score[~kept].min() + 1e-9 * score.abs().max(), name
        assert score[kept].min() < score[~kept].max(), name  # not all equal: the direction shows


@pytest.mark.parametrize("device", DEVICES)
def test_synflow_matches_closed_form_of_a_linear_chain(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False),
                          nn.Linear(3, 2, bias=False)).to(device)
    w1, w2, w3 = (m.weight.detach().double().abs() for m in (model[0], model[2], model[3]))
    ones = lambda n: torch.ones(n, dtype=torch.float64, device=device)  # noqa: E731
    # Score of w_l[i, j] = (1^T |W_L|..|W_l+1|)_i |w_l[i, j]| (|W_l-1|..|W_1| 1)_j
    want = {"0.weight": torch.outer(ones(2) @ w3 @ w2, ones(4)) * w1,
            "2.weight": torch.outer(ones(2) @ w3, w1 @ ones(4)) * w2,
            "3.weight": torch.outer(ones(2), w2 @ w1 @ ones(4)) * w3}
    got = synflow_scores(model, input_shape=(4,))
    for name in want:
        torch.testing.assert_close(got[name], want[name])
    # Masked weights carry no flow, and the flow they fed shrinks.
    mask = {"0.weight": torch.ones(5, 4, dtype=torch.bool)}
    mask["0.weight"][0] = False
    masked = synflow_scores(model, input_shape=(4,), masks=mask)
    assert (masked["0.weight"][0] == 0).all()
    assert (masked["2.weight"][:, 0] == 0).all()
    torch.testing.assert_close(masked["2.weight"][:, 1:], got["2.weight"][:, 1:])
    # One round of synflow_masks keeps the top of the closed form.
    one = synflow_masks(model, {"0.weight": 0.5}, rounds=1, input_shape=(4,))
    assert torch.equal(one["0.weight"], want["0.weight"] >= want["0.weight"].flatten().sort().values[10])


def test_synflow_schedule_is_exponential():
    sched = synflow_schedule(0.01, 100)
    assert len(sched) == 100 and sched[-1] == 0.01
    assert sched[49] == pytest.approx(0.1) and sched[0] == pytest.approx(0.01 ** 0.01)
    with pytest.raises(ValueError, match="rounds"):
        synflow_schedule(0.1, 0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("allocation", ["layer", "global"])
def test_every_method_lands_on_the_target_counts(synthetic, method, allocation):
    model = synthetic_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    small = dict(rounds=5, samples_per_class=2)
    masks = prune_at_init(model, method, synthetic.train, 0.8, seed=0, allocation=allocation, **small)
    sizes = {f"{n}.weight": m.weight.numel() for n, m in model.named_children()
             if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(masks) == set(sizes)
    assert all(m.dtype == torch.bool and m.device.type == "cpu" for m in masks.values())
    kept = {n: int(m.sum()) for n, m in masks.items()}
    if allocation == "layer":
        assert kept == {n: kept_count(s, 0.2) for n, s in sizes.items()}
    else:
        assert sum(kept.values()) == sum(kept_count(s, 0.2) for s in sizes.values())
    # The model is untouched: same weights, no gradients, its own mode.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and model.training
    # Deterministic.
    again = prune_at_init(model, method, synthetic.train, 0.8, seed=0, allocation=allocation, **small)
    assert all(torch.equal(masks[n], again[n]) for n in masks)


def test_per_layer_dict_and_scores_that_differ(synthetic):
    model = synthetic_model()
    sparsity = {"0.weight": 0.5, "6.weight": 0.9}
    masks = prune_at_init(model, "snip", synthetic.train, sparsity)
    assert set(masks) == set(sparsity)
    assert int(masks["0.weight"].sum()) == kept_count(model[0].weight.numel(), 0.5)
    assert int(masks["6.weight"].sum()) == kept_count(model[6].weight.numel(), 0.1)
    magnitude = prune_at_init(model, "magnitude", None, 0.8)
    assert torch.equal(magnitude["0.weight"], model[0].weight.abs() >= model[0].weight.abs().flatten()
                       .sort(descending=True).values[kept_count(model[0].weight.numel(), 0.2) - 1])
    # The methods are not one another: SNIP and GraSP differ from magnitude and from each other.
    grasp = prune_at_init(model, "grasp", synthetic.train, 0.8)
    snip = prune_at_init(model, "snip", synthetic.train, 0.8)
    assert not torch.equal(grasp["6.weight"], snip["6.weight"])
    assert not torch.equal(snip["6.weight"], magnitude["6.weight"])
    # The seed draws SNIP's samples.
    other = prune_at_init(model, "snip", synthetic.train, 0.8, seed=1)
    assert not torch.equal(other["6.weight"], snip["6.weight"])


def test_batchnorm_is_scored_in_eval_mode_and_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    model[1].running_mean.fill_(0.5)
    stats = (model[1].running_mean.clone(), model[1].running_var.clone(), model[1].num_batches_tracked.clone())
    x, y = torch.randn(12, 1, 6, 6), torch.arange(12) % 3
    for method in METHODS:
        masks = prune_at_init(model, method, (x, y), 0.5, rounds=3)
        assert int(masks["4.weight"].sum()) == 96
    assert all(torch.equal(a, b) for a, b in zip(stats, (model[1].running_mean, model[1].running_var,
                                                        model[1].num_batches_tracked)))
    assert model.training and model[1].training


def test_allocate_ties_and_keep():
    scores = {"a": torch.tensor([1.0, 2.0, 2.0, 2.0]), "b": torch.tensor([2.0, 0.0])}
    masks = allocate(scores, {"a": 0.5, "b": 0.5})
    assert masks["a"].tolist() == [False, True, True, False] and masks["b"].tolist() == [True, False]
    glob = allocate(scores, {"a": 0.5, "b": 0.5}, "global")  # 3 kept: ties go to the earlier
    assert glob["a"].tolist() == [False, True, True, True] and glob["b"].tolist() == [False, False]
    kept = allocate(scores, {"a": 0.5, "b": 0.5}, keep={"a": torch.tensor([True, True, False, True])})
    assert kept["a"].tolist() == [False, True, False, True]


def test_scoring_batches_are_class_balanced_and_seeded():
    x, y = torch.arange(40.0).view(20, 2), torch.tensor([0] * 12 + [1] * 5 + [2] * 3)
    batches = scoring_batches((x, y), samples_per_class=4, seed=3, batch_size=5)
    ys = torch.cat([b[1] for b in batches])
    assert [len(b[1]) for b in batches] == [5, 5, 1]
    assert ys.bincount().tolist() == [4, 4, 3]
    again = scoring_batches(torch.utils.data.TensorDataset(x, y), samples_per_class=4, seed=3, batch_size=5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    other = scoring_batches((x, y), samples_per_class=4, seed=4, batch_size=5)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches, other))
    assert sum(len(b[1]) for b in scoring_batches((x, y), samples_per_class=None)) == 20


def test_errors(synthetic):
    model = synthetic_model()
    with pytest.raises(ValueError, match="method"):
        prune_at_init(model, "snap", synthetic.train)
    with pytest.raises(ValueError, match="allocation"):
        prune_at_init(model, "magnitude", None, allocation="local")
    with pytest.raises(ValueError, match="data"):
        prune_at_init(model, "snip", None)
    with pytest.raises(ValueError, match="input_shape"):
        prune_at_init(model, "synflow", None)
    with pytest.raises(ValueError, match="sparsity"):
        prune_at_init(model, "magnitude", None, 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        prune_at_init(model, "magnitude", None, {"9.weight": 0.5})
    with pytest.raises(TypeError, match="seed"):
        prune_at_init(model, "magnitude", None, seed=1.5)
    with pytest.raises(TypeError, match="data"):
        prune_at_init(model, "snip", "cifar")
    with pytest.raises(ValueError, match="temperature"):
        prune_at_init(model, "grasp", synthetic.train, temperature=0)
    with pytest.raises(ValueError, match="model"):
        prune_at_init(nn.Sequential(nn.ReLU()), "magnitude")


def test_package_exports_the_function():
    import mcwt_ext

    assert mcwt_ext.prune_at_init is prune_at_init
    assert callable(mcwt_ext.ablate.ablate) and callable(mcwt_ext.overlap_with_ticket)
