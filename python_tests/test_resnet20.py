"""resnet20 (F&C's CIFAR ResNet) end to end on digits through the CLI, with its protocol wired into
training (SGD, momentum, weight decay, warm-up and step schedule, output layer kept dense), and
the Conv nets' training unchanged by it."""
import json

import pytest
import torch
import torch.nn.functional as F

from mcwt_ext.cli import main
from mcwt_ext.masks import random_masks
from mcwt_ext.data import load_dataset
from mcwt_ext.runs import RunDir, grid_cell, load_tensors
from mcwt_ext.train import TrainConfig, _MaskEnforcer, BatchOrder, train

COMMON = ["--arch", "resnet20", "--dataset", "digits", "--seed", "0", "--no-progress"]
SHORT = ["--iterations", "8", "--eval-every", "4", "--batch-size", "32"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _conv_and_fc(masks):
    conv = {k: m for k, m in masks.items() if k != "fc.weight"}
    assert len(conv) == 21  # the first conv, 18 block convs, 2 shortcuts
    return conv, masks["fc.weight"]


@pytest.mark.slow
def test_resnet20_commands_run_on_digits(tmp_path):
    """imp -> fit -> sample -> train, and random: every conv pruned to 80%, the output layer dense."""
    assert main(["imp", *COMMON, *SHORT, "--rates", "conv=0.6", "--out", str(tmp_path / "imp")]) == 0
    imp = RunDir(tmp_path / "imp")
    run = imp.load_json("config.json")
    config = run["train"]
    assert (config["optimizer"], config["momentum"], config["weight_decay"]) == ("sgd", 0.9, 1e-4)
    # --iterations 8 of the protocol's 30000: warm-up and milestones scaled alike
    assert (config["warmup_iterations"], config["lr_milestones"]) == (5, [5, 7])
    # F&C's ResNet-20 as open_lth runs it: augmented batches, Kaiming init, global IMP
    assert (config["augment"], run["init_scheme"], run["imp"]["allocation"]) == \
        ("flip-crop", "kaiming-normal", "global")
    conv, fc = _conv_and_fc(load_tensors(imp.masks_path))
    # global: 20% of all conv weights together (per layer it varies), the output layer whole
    assert sum(int(m.sum()) for m in conv.values()) == sum(round(0.2 * m.numel()) for m in conv.values())
    assert len({round(float(m.float().mean()), 3) for m in conv.values()}) > 1 and bool(fc.all())
    assert imp.load_json("summary.json")["reached_target"]

    assert main(["fit", "--ticket", str(imp.path), "--out", str(tmp_path / "fit.json")]) == 0
    assert set(json.loads((tmp_path / "fit.json").read_text())["models"]) == {"conv"}
    assert main(["sample", *COMMON[:-1], "--fit", str(tmp_path / "fit.json"), "--exact",
                 "--max-samples", "200", "--out", str(tmp_path / "sample")]) == 0
    conv, fc = _conv_and_fc(load_tensors(tmp_path / "sample" / "masks.safetensors"))
    assert all(int(m.sum()) == round(0.2 * m.numel()) for m in conv.values()) and bool(fc.all())
    assert main(["train", *COMMON, *SHORT, "--masks", str(tmp_path / "sample" / "masks.safetensors"),
                 "--out", str(tmp_path / "trained")]) == 0
    summary = RunDir(tmp_path / "trained").load_json("summary.json")
    assert summary["densities"]["fc.weight"] == 1.0 and summary["config"]["optimizer"] == "sgd"

    assert main(["random", *COMMON, *SHORT, "--out", str(tmp_path / "random")]) == 0
    conv, fc = _conv_and_fc(load_tensors(tmp_path / "random" / "masks.safetensors"))
    assert all(int(m.sum()) == round(0.2 * m.numel()) for m in conv.values()) and bool(fc.all())


@pytest.mark.slow
def test_reproduce_resnet20_on_digits(tmp_path):
    argv = ["reproduce", "--arch", "resnet20", "--dataset", "digits", "--seeds", "1",
            "--iterations", "6", "--eval-every", "3", "--no-progress", "--out", str(tmp_path / "g")]
    assert main(argv) == 0
    table = (tmp_path / "g" / "table.md").read_text()
    assert "resnet20" in table or "ResNet" in table
    imp = grid_cell(tmp_path / "g", "resnet20", 0, "imp").load_json("config.json")
    assert (imp["train"]["augment"], imp["init_scheme"], imp["imp"]["allocation"]) == \
        ("flip-crop", "kaiming-normal", "global")
    for kind in ("random", "mcwt_magnitude", "mcwt_connectivity"):
        run = grid_cell(tmp_path / "g", "resnet20", 0, kind)
        masks = load_tensors(run.masks_path)
        assert bool(masks["fc.weight"].all()) and run.load_json("summary.json")["config"]["optimizer"] == "sgd"


def test_conv_nets_train_as_before(digits):
    """train() on a Conv net is the loop it was before the SGD/schedule settings: fused Adam at a
    constant rate, pruned gradients and weights zeroed each step; weights bit-identical."""
    from mcwt_ext.models import build_model

    def net():
        return build_model("conv2", digits.in_channels, digits.num_classes, digits.image_size, seed=0)

    cfg = TrainConfig.for_arch("conv2", iterations=15, eval_every=5, lr=1e-3)
    masks = random_masks(net(), 0.8, seed=0)
    ours = net()
    train(ours, digits, masks, cfg, progress=False)

    ref = net()
    with torch.no_grad():
        for name, m in masks.items():
            ref.get_parameter(name).mul_(m)
    enforcer = _MaskEnforcer(ref, masks)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3, fused=True)
    order = BatchOrder(len(digits.train), cfg.batch_size, cfg.seed)
    x, y = digits.train.tensors
    ref.train()
    for it in range(cfg.iterations):
        idx = order.indices(it)
        loss = F.cross_entropy(ref(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        enforcer.grads()
        opt.step()
        enforcer.weights()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))


def test_global_imp_prunes_a_fifth_of_the_pooled_conv_weights_per_round():
    """Rounds of global magnitude pruning at 20% (F&C's ResNet-20): each keeps round(0.8 x) of the
    conv weights left, the smallest |w| over all convs go first, fc stays whole, and the eighth
    round lands on 20% of the conv weights exactly (0.8 ** 7 = 0.21 > 0.2 > 0.8 ** 8)."""
    from mcwt_ext.masks import dense_masks, global_magnitude_prune
    from mcwt_ext.models import arch_sparsity, build_model

    model = build_model("resnet20", 1, 10, 8, seed=0)
    weights = {k: v for k, v in model.state_dict().items() if k in dense_masks(model)}
    sparsity = arch_sparsity("resnet20", model, torch.zeros(1, 1, 8, 8), 0.8)
    targets = {n: 1.0 - s for n, s in sparsity.items()}
    masks = dense_masks(model)
    conv_total = sum(m.numel() for n, m in masks.items() if n != "fc.weight")
    goal = sum(round(0.2 * m.numel()) for n, m in masks.items() if n != "fc.weight")
    kept, rounds = conv_total, 0
    while kept > goal:
        new = global_magnitude_prune(weights, masks, 0.2, targets)
        now = sum(int(m.sum()) for n, m in new.items() if n != "fc.weight")
        assert now == max(goal, round(0.8 * kept)) and bool(new["fc.weight"].all())
        dropped = torch.cat([weights[n][masks[n] & ~new[n]].abs() for n in new])
        left = torch.cat([weights[n][new[n]].abs() for n in new if n != "fc.weight"])
        assert dropped.max() <= left.min()  # one threshold over every conv layer
        masks, kept, rounds = new, now, rounds + 1
    assert rounds == 8 and kept == goal
    again = global_magnitude_prune(weights, masks, 0.2, targets)  # at target: nothing more
    assert all(torch.equal(again[n], masks[n]) for n in masks)


def test_kaiming_init_as_open_lth():
    """Conv and linear weights N(0, 2 / fan_in); BatchNorm weights uniform in [0, 1), biases 0;
    fc bias uniform(+-1/sqrt(64)). Bounds: 5 standard errors of each statistic."""
    from torch import nn
    from mcwt_ext.models import build_model

    model = build_model("resnet20", seed=4)
    assert torch.equal(model.conv.weight, build_model("resnet20", seed=4).conv.weight)
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach().flatten().double()
            n, sigma = w.numel(), (2.0 / m.weight[0].numel()) ** 0.5
            assert abs(w.mean().item()) < 5 * sigma / n ** 0.5, name
            assert abs(w.std().item() / sigma - 1) < 5 / (2 * n) ** 0.5, name  # se of s/sigma: 1/sqrt(2n)
        elif isinstance(m, nn.BatchNorm2d):
            assert bool((m.weight >= 0).all() and (m.weight < 1).all() and (m.bias == 0).all())
    gammas = torch.cat([m.weight.detach() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]).double()
    assert abs(gammas.mean().item() - 0.5) < 5 * (1 / 12 / gammas.numel()) ** 0.5
    assert bool(model.fc.bias.abs().max() <= 1 / 8) and torch.count_nonzero(model.fc.bias) == 10
