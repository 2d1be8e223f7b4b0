import itertools

import pytest
import torch

import mcwt_ext.train as train_mod
from conftest import synthetic_model
from mcwt_ext.imp import ImpConfig, layer_targets, round_plan, run_imp
from mcwt_ext.masks import dense_masks, global_magnitude_prune, kept_count, layer_kind, magnitude_prune
from mcwt_ext.runs import RunDir
from mcwt_ext.runs import snapshot_name
from mcwt_ext.train import TrainConfig, train

RATES = dict(conv=0.5, linear=0.5, output=0.4)


def _cfg(**kw):
    train_cfg = TrainConfig(iterations=6, lr=1e-3, eval_every=3, checkpoint_every=2)
    return ImpConfig(**{**dict(train=train_cfg, rates=RATES, sparsity=0.75), **kw})


@pytest.fixture(scope="module")
def imp_run(synthetic, tmp_path_factory):
    rd = RunDir(tmp_path_factory.mktemp("imp"))
    model = synthetic_model()
    masks = run_imp(model, synthetic, _cfg(), rd, progress=False)
    return rd, masks, model


def test_config_protocol_defaults_and_checks():
    c2, c6 = ImpConfig.for_arch("conv2"), ImpConfig.for_arch("conv6", iterations=50, rates={"linear": 0.3})
    assert c2.rates == {"conv": 0.1, "linear": 0.2, "output": 0.1} and c2.sparsity == 0.8
    assert c2.train.iterations == 20_000 and c2.rewind_iteration == 0
    assert c6.rates == {"conv": 0.15, "linear": 0.3, "output": 0.1} and c6.train.iterations == 50
    with pytest.raises(ValueError, match="rates"):
        _cfg(rates={"conv": 0.1})
    with pytest.raises(ValueError, match="linear"):
        _cfg(rates={**RATES, "linear": 1.0})
    with pytest.raises(ValueError, match="sparsity"):
        _cfg(sparsity=1.0)
    with pytest.raises(ValueError, match="rewind_iteration"):
        _cfg(rewind_iteration=6)
    with pytest.raises(TypeError, match="unknown"):
        ImpConfig.for_arch("conv2", gamma=1)


def test_every_layer_lands_exactly_on_its_target(imp_run):
    rd, masks, _ = imp_run
    for name, m in masks.items():
        assert int(m.sum()) == kept_count(m.numel(), 1 - 0.75)
    summary = rd.load_json("summary.json")
    # conv and linear: 1 -> 0.5 -> 0.25; output: 1 -> 0.6 -> 0.36 -> 0.25
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2, 3] and summary["reached_target"]
    assert summary["kinds"]["10.weight"] == "output"
    assert len(rd.load_csv("rounds.csv")) == 4
    previous = None
    for r in range(4):
        round_masks = rd.subdir(f"round_{r:02d}").load_tensors("masks.safetensors")
        if previous is not None:  # pruned weights never come back
            assert all(not (round_masks[k] & ~previous[k]).any() for k in masks)
        previous = round_masks
    assert all(torch.equal(previous[k], rd.load_tensors("masks.safetensors")[k]) for k in masks)


@pytest.mark.parametrize("allocation,rates", [("layer", RATES), ("layer", dict(conv=0.1, linear=0.2, output=0.1)),
                                              ("global", dict(conv=0.2, linear=0.2, output=0.2))])
def test_round_plan_counts_the_rounds_imp_prunes(allocation, rates):
    """The plan `mcwt imp` prints: per kind, the last round that prunes one of its layers, found
    here by pruning random weights as IMP's rounds do (global: the pool's last round for all)."""
    model, cfg = synthetic_model(), _cfg(rates=rates, sparsity=0.8, allocation=allocation)
    kinds = layer_kind(model, torch.zeros(1, 3, 8, 8))
    masks, targets = dense_masks(model), layer_targets(cfg, kinds)
    sizes = {n: m.numel() for n, m in masks.items()}
    weights = {n: torch.randn(m.shape, generator=torch.Generator().manual_seed(1)) for n, m in masks.items()}
    last = {}
    for r in itertools.count(1):
        pruned = global_magnitude_prune(weights, masks, rates["conv"], targets) if allocation == "global" else \
            magnitude_prune(weights, masks, {n: rates[kinds[n]] for n in masks}, targets)
        changed = [n for n in masks if not torch.equal(pruned[n], masks[n])]
        if not changed:
            break
        last.update(dict.fromkeys(changed, r))
        masks = pruned
    want = {k: max(r for n, r in last.items() if kinds[n] == k) for k in ("conv", "linear", "output")}
    if allocation == "global":
        want = dict.fromkeys(want, max(want.values()))
    assert round_plan(cfg, sizes, kinds) == want
    assert round_plan(_cfg(rates={**rates, "linear": 0.0}), sizes, kinds)["linear"] is None  # never there


def test_rounds_rewind_to_the_initial_weights(synthetic, imp_run):
    rd, _, _ = imp_run
    init = rd.load_tensors("init.safetensors")
    assert all(torch.equal(init[k], v) for k, v in synthetic_model().state_dict().items())
    round1 = rd.subdir("round_01")
    fresh = synthetic_model()  # kept weights at their initial values, pruned ones zeroed by train()
    train(fresh, synthetic, round1.load_tensors("masks.safetensors"), _cfg().train, progress=False)
    final = round1.load_tensors("final.safetensors")
    assert all(torch.equal(final[k], v) for k, v in fresh.state_dict().items())


def test_late_rewinding_uses_the_weights_of_iteration_k(synthetic, tmp_path):
    rd = RunDir(tmp_path)
    run_imp(synthetic_model(), synthetic, _cfg(rewind_iteration=2, max_rounds=1), rd, progress=False)
    rewind = rd.load_tensors("rewind.safetensors")
    assert all(torch.equal(rewind[k], v) for k, v in rd.subdir("round_00").load_tensors(snapshot_name(2)).items())
    assert not torch.equal(rewind["0.weight"], rd.load_tensors("init.safetensors")["0.weight"])
    model = synthetic_model()
    model.load_state_dict(rewind)
    round1 = rd.subdir("round_01")
    train(model, synthetic, round1.load_tensors("masks.safetensors"), _cfg().train, progress=False)
    final = round1.load_tensors("final.safetensors")
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())


def test_max_rounds_stops_short_of_the_target(synthetic, tmp_path):
    rd = RunDir(tmp_path)
    masks = run_imp(synthetic_model(), synthetic, _cfg(max_rounds=1), rd, progress=False)
    assert not rd.load_json("summary.json")["reached_target"]
    assert int(masks["0.weight"].sum()) == kept_count(1728, 0.5)


def test_resume_after_a_kill_inside_a_round(synthetic, imp_run, tmp_path, monkeypatch):
    expected_rd, expected_masks, expected_model = imp_run
    real, calls = train_mod._batches, []

    def dying(train_set, order, start, stop, *args):  # dies in round 2, after its checkpoint at 4
        calls.append(start)
        for it, batch in zip(range(start, stop), real(train_set, order, start, stop, *args)):
            if len(calls) == 3 and it == 5:
                raise KeyboardInterrupt
            yield batch
    monkeypatch.setattr(train_mod, "_batches", dying)
    rd = RunDir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_imp(synthetic_model(), synthetic, _cfg(), rd, progress=False)
    assert rd.subdir("round_02").exists("checkpoints/last.pt") and not rd.exists("summary.json")
    monkeypatch.undo()

    model = synthetic_model()
    masks = run_imp(model, synthetic, _cfg(), rd, progress=False)
    assert all(torch.equal(masks[k], expected_masks[k]) for k in masks)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected_model.state_dict().values()))
    assert rd.file("rounds.csv").read_text() == expected_rd.file("rounds.csv").read_text()


def test_resume_refuses_another_init_or_other_settings(synthetic, imp_run):
    rd, _, _ = imp_run
    with pytest.raises(ValueError, match="initial weights"):
        run_imp(synthetic_model(seed=1), synthetic, _cfg(), rd, progress=False)
    with pytest.raises(ValueError, match="sparsity 0.75 there, 0.5 now"):
        run_imp(synthetic_model(), synthetic, _cfg(sparsity=0.5), rd, progress=False)


def test_torch_pruned_model_finds_the_same_ticket(imp_run, synthetic, tmp_path):
    """IMP on a model pruned with torch.nn.utils.prune (here: all kept) finds the plain model's
    ticket, writes plain weights, and ends pruned with the ticket's masks."""
    from torch.nn.utils import prune

    from mcwt_ext.masks import from_torch_prune, prunable_layers

    _, plain, _ = imp_run
    model = synthetic_model()
    for _, layer in prunable_layers(model):
        prune.identity(layer, "weight")
    masks = run_imp(model, synthetic, _cfg(), RunDir(tmp_path / "pruned"), progress=False)
    assert set(masks) == set(plain) and all(torch.equal(masks[k], plain[k]) for k in plain)
    ours = from_torch_prune(model)
    assert all(torch.equal(ours[k], masks[k]) for k in masks)
    init = RunDir(tmp_path / "pruned").load_tensors("init.safetensors")
    assert set(init) == set(synthetic_model().state_dict())
