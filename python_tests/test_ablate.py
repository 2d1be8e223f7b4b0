"""WT ablations keep their invariants; overlap with the ticket."""
import pytest
import torch

from conftest import synthetic_model
from mcwt_ext.ablate import KINDS, ablate
from mcwt_ext.compare import overlap_with_ticket, total_overlap
from mcwt_ext.masks import magnitude_prune, random_masks


def _ticket():
    model = synthetic_model(seed=0)
    weights = {k: v for k, v in model.state_dict().items() if k.endswith("weight")}
    dense = {k: torch.ones_like(v, dtype=torch.bool) for k, v in weights.items()}
    # A magnitude ticket: kept weights differ from pruned ones, so permutations show.
    masks = magnitude_prune(weights, dense, {k: 0.8 for k in weights}, {k: 0.2 for k in weights})
    return model, dict(reversed(list(masks.items())))  # file order need not be forward order


def _kept_values(state, masks, name):
    return state[name][masks[name]].sort().values


@pytest.mark.parametrize("kind", KINDS)
def test_invariants(kind):
    model, masks = _ticket()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    build = (lambda s: synthetic_model(seed=s)) if kind == "reinit" else None
    state, new = ablate(model, masks, kind, seed=7, build=build)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert set(new) == set(masks) and state.keys() == before.keys()
    for name, mask in masks.items():
        assert new[name].dtype == torch.bool and new[name].shape == mask.shape
        assert int(new[name].sum()) == int(mask.sum())  # same per-layer density
        if kind == "shuffle-mask":
            assert not torch.equal(new[name], mask)
            assert torch.equal(state[name], before[name])
        else:
            assert torch.equal(new[name], mask)
        if kind == "shuffle-values":
            # The multiset of kept values per layer is kept; their positions are not; pruned
            # positions and biases are unchanged.
            assert torch.equal(_kept_values(state, masks, name), _kept_values(before, masks, name))
            assert not torch.equal(state[name], before[name])
            assert torch.equal(state[name][~mask], before[name][~mask])
        if kind == "reinit":
            assert not torch.equal(state[name], before[name])
            assert torch.equal(state[name], synthetic_model(seed=7).state_dict()[name])
    if kind != "reinit":
        assert all(torch.equal(state[k], before[k]) for k in before if k.endswith("bias"))
    # Seeded: the same seed gives the same ablation, another seed another.
    again = ablate(model, masks, kind, seed=7, build=build)
    other = ablate(model, masks, kind, seed=8, build=build)
    assert all(torch.equal(again[0][k], state[k]) for k in state)
    assert all(torch.equal(again[1][k], new[k]) for k in new)
    assert any(not torch.equal(other[0][k], state[k]) for k in state) or \
        any(not torch.equal(other[1][k], new[k]) for k in new)


def test_errors():
    model, masks = _ticket()
    with pytest.raises(ValueError, match="kind"):
        ablate(model, masks, "shuffle", 0)
    with pytest.raises(ValueError, match="build"):
        ablate(model, masks, "reinit", 1)
    with pytest.raises(ValueError, match="seed"):
        ablate(model, masks, "reinit", 0, build=lambda s: synthetic_model(seed=s))
    with pytest.raises(TypeError, match="seed"):
        ablate(model, masks, "shuffle-mask", "1")
    with pytest.raises(ValueError, match="build"):
        ablate(model, masks, "shuffle-mask", 1, build=lambda s: synthetic_model(seed=s))
    with pytest.raises(ValueError, match="9.weight"):
        ablate(model, {"9.weight": masks["0.weight"]}, "shuffle-mask", 1)


def test_overlap_with_ticket():
    model, ticket = _ticket()
    assert all(v == 1.0 for v in overlap_with_ticket(ticket, ticket).values())
    assert total_overlap(ticket, ticket) == 1.0
    # Complement: no overlap. A dense layer (absent from masks) overlaps fully.
    complement = {k: ~v for k, v in ticket.items()}
    assert all(v == 0.0 for v in overlap_with_ticket(complement, ticket).values())
    partial = {k: v for k, v in complement.items() if k != "6.weight"}
    over = overlap_with_ticket(partial, ticket)
    assert over["6.weight"] == 1.0 and over["0.weight"] == 0.0
    assert total_overlap(partial, ticket) == int(ticket["6.weight"].sum()) / sum(int(v.sum()) for v in ticket.values())
    # A random mask at density 0.2 overlaps about 0.2; by hand on a small case.
    rnd = overlap_with_ticket(random_masks(model, 0.8, seed=0), ticket)
    assert rnd["6.weight"] == pytest.approx(0.2, abs=0.01)
    small = {"a": torch.tensor([True, True, False, False])}
    assert overlap_with_ticket({"a": torch.tensor([True, False, True, False])}, small) == {"a": 0.5}
    assert overlap_with_ticket(small, {"a": torch.zeros(4, dtype=torch.bool)}) == {"a": None}
    with pytest.raises(ValueError, match="not in the ticket"):
        overlap_with_ticket({"b": small["a"]}, small)
    with pytest.raises(ValueError, match="shape"):
        overlap_with_ticket({"a": torch.ones(3, dtype=torch.bool)}, small)
