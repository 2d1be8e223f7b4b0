"""torch.nn.utils.prune interop: masks <-> torch-pruned models, and pruned models everywhere."""
import pytest
import torch
from torch.nn.utils import prune

from mcwt_ext import sample_masks
from mcwt_ext.connectivity import measure_connectivity
from mcwt_ext.masks import (apply_masks, check_masks, dense_state_dict, dense_weight, from_torch_prune,
                            is_torch_pruned, masked_parameters, random_masks, to_torch_prune)
from mcwt_ext.models import build_model
from mcwt_ext.runs import RunDir
from test_sample import FIT


def _model(seed=0, arch="conv2"):
    return build_model(arch, 1, 10, 8, seed=seed)


def test_run_directory_masks_round_trip_through_torch_prune(tmp_path):
    """masks.safetensors -> torch-pruned model -> masks: exact, and the pruned model computes
    what the masked model computes."""
    rd = RunDir(tmp_path / "run")
    model = _model()
    masks = random_masks(model, 0.8, seed=4)
    rd.save_tensors(RunDir.MASKS, masks)
    init = {k: v.clone() for k, v in model.state_dict().items()}

    pruned = to_torch_prune(_model(), rd.load_tensors(RunDir.MASKS))
    assert all(is_torch_pruned(pruned.get_submodule(k[:-len(".weight")])) for k in masks)
    back = from_torch_prune(pruned)
    assert back.keys() == masks.keys()
    assert all(back[k].dtype == torch.bool and torch.equal(back[k], masks[k]) for k in masks)
    for k in masks:  # weight_orig keeps the dense initial weights, pruned ones included
        assert torch.equal(pruned.get_parameter(k.replace("weight", "weight_orig")), init[k])
    x = torch.rand(5, 1, 8, 8)
    apply_masks(model, masks)
    torch.testing.assert_close(pruned(x), model(x), rtol=0, atol=0)

    # the reverse: a model pruned with torch's own methods, saved as a run's masks
    theirs = _model()
    prune.l1_unstructured(theirs[0], "weight", amount=0.5)
    prune.random_unstructured(theirs[6], "weight", amount=0.3)
    rd.save_tensors(RunDir.MASKS, from_torch_prune(theirs))
    loaded = rd.load_tensors(RunDir.MASKS)
    assert sorted(loaded) == ["0.weight", "6.weight"]
    assert torch.equal(loaded["0.weight"], theirs[0].weight_mask.bool())
    again = to_torch_prune(_model(), loaded)
    assert all(torch.equal(again.get_buffer(k + "_mask"), theirs.get_buffer(k + "_mask")) for k in loaded)


def test_to_torch_prune_replaces_an_existing_mask_without_baking_it_in():
    model = _model()
    dense = model[0].weight.detach().clone()
    first = random_masks(model, 0.5, seed=0)
    second = random_masks(model, 0.9, seed=1)
    to_torch_prune(model, {"0.weight": first["0.weight"]})
    to_torch_prune(model, {"0.weight": second["0.weight"]})
    assert torch.equal(model[0].weight_orig, dense)  # not multiplied by the first mask
    assert torch.equal(from_torch_prune(model)["0.weight"], second["0.weight"])
    assert len(model[0]._forward_pre_hooks) == 1


def test_mask_helpers_accept_a_torch_pruned_model():
    """check_masks, masked_parameters and apply_masks (what train() uses) resolve
    "<module>.weight" to weight_orig."""
    model = _model()
    masks = random_masks(model, 0.8, seed=2)
    to_torch_prune(model, {"0.weight": masks["0.weight"]})
    check_masks(model, masks)
    params = dict((id(p), m) for p, m in masked_parameters(model, masks))
    assert id(model[0].weight_orig) in params and id(model[2].weight) in params
    assert dense_weight(model[0]) is model[0].weight_orig
    apply_masks(model, masks)
    assert torch.count_nonzero(model[0].weight_orig[~masks["0.weight"]]) == 0
    with pytest.raises(ValueError, match="'3.weight'"):  # 3 is a ReLU
        check_masks(model, {"3.weight": masks["2.weight"]})
    with pytest.raises(ValueError, match="'nope.weight'"):
        to_torch_prune(model, {"nope.weight": masks["2.weight"]})


def test_sampler_on_a_torch_pruned_model_uses_the_dense_weights():
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = sample_masks(_model(), FIT, x, seed=5)
    model = _model()
    prune.l1_unstructured(model[2], "weight", amount=0.7)  # ignored: the sample replaces it
    prune.random_unstructured(model[8], "weight", amount=0.7)
    pruned = sample_masks(model, FIT, x, seed=5)
    assert all(torch.equal(plain[k], pruned[k]) for k in plain)
    resnet = build_model("resnet20", 1, 10, 8)
    masks = random_masks(resnet, 0.6, seed=0)
    want = measure_connectivity(resnet, masks, x)
    prune.l1_unstructured(resnet.blocks[0].conv1, "weight", amount=0.5)
    got = measure_connectivity(resnet, masks, x)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_non_binary_torch_mask_is_refused():
    model = _model()
    prune.custom_from_mask(model[0], "weight", torch.ones_like(model[0].weight))
    model[0].weight_mask.mul_(0.5)
    with pytest.raises(ValueError, match="'0'.*0 and 1"):
        from_torch_prune(model)


def test_dense_state_dict_loads_into_an_unpruned_model():
    model = build_model("resnet20", 1, 10, 8, seed=1)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    to_torch_prune(model, random_masks(model, 0.8, seed=0))
    assert "conv.weight_orig" in model.state_dict()
    state = dense_state_dict(model)
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    build_model("resnet20", 1, 10, 8, seed=2).load_state_dict(state)
