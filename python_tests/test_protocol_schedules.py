"""The learning rate every protocol trains with, at chosen iterations, against hand-computed values
(issue 19: the paper protocol's IMP rounds kept the 225K training's 150K warm-up), and IMP under a
table length whose schedule does not start like the rounds' one (the dense row trains apart)."""
import math

import pytest

from mcwt_ext.data import load_dataset
from mcwt_ext.experiments import PROTOCOLS
from mcwt_ext.imp import ImpConfig, run_imp
from mcwt_ext.models import ARCHS, arch_sparsity, build_model
from mcwt_ext.runs import RunDir
from mcwt_ext.train import TrainConfig, train

# A handful of float operations (a division, a product, a power of 0.1), each rounded to half an
# ulp: the relative error is below 4 * 2**-53 < 1e-15.
REL = 1e-15

# resnet20 (F&C): peak 0.03, linear warm-up over the first 2/3 of training, x0.1 at 2/3 and 5/6.
# lr_at(i) = 0.03 * (i + 1) / warmup during the warm-up, then 0.03 * 0.1 ** (milestones passed).
RESNET20 = {
    # 30K iterations: warm-up 20K, milestones 20K and 25K
    30_000: {0: 0.03 / 20_000, 9_999: 0.015, 19_999: 0.03, 20_000: 0.003, 24_999: 0.003,
             25_000: 0.0003, 29_999: 0.0003},
    # reduced: 1,500 iterations (a twentieth): warm-up 1,000, milestones 1,000 and 1,250
    1_500: {0: 0.03 / 1_000, 499: 0.015, 999: 0.03, 1_000: 0.003, 1_249: 0.003, 1_250: 0.0003,
            1_499: 0.0003},
    # paper: the Table 1 trainings run 300 epochs at batch 128, 105,469 iterations: warm-up
    # round(20K * 105,469 / 30K) = 70,313, milestones 70,313 and round(25K * 105,469 / 30K) = 87,891
    105_469: {0: 0.03 / 70_313, 70_312: 0.03, 70_313: 0.003, 87_890: 0.003, 87_891: 0.0003,
              105_468: 0.0003},
}
# (protocol, arch) -> (table training length, IMP rounds' length)
LENGTHS = {("reduced", "conv2"): (1_000, 1_000), ("full", "conv2"): (20_000, 20_000),
           ("paper", "conv2"): (225_000, 20_000), ("reduced", "resnet20"): (1_500, 1_500),
           ("full", "resnet20"): (30_000, 30_000), ("paper", "resnet20"): (105_469, 30_000)}


def _expected(arch: str, length: int) -> dict[int, float]:
    if arch == "conv2":  # Adam at a constant 2e-4
        return {i: 2e-4 for i in (0, length // 2, length - 1)}
    return RESNET20[length]


@pytest.mark.parametrize("protocol,arch", sorted(LENGTHS))
def test_every_protocols_learning_rate(protocol, arch):
    proto = PROTOCOLS[protocol]
    table = proto.train_config(arch, 0)
    imp = proto.imp_config(arch, table)
    long, rounds = LENGTHS[(protocol, arch)]
    assert (table.iterations, imp.train.iterations) == (long, rounds)
    for cfg, length in ((table, long), (imp.train, rounds)):
        for step, lr in _expected(arch, length).items():
            assert math.isclose(cfg.lr_at(step), lr, rel_tol=REL), (protocol, arch, length, step)
    if protocol == "paper":  # the ticket trains the table's schedule, not a stretched round's
        assert imp.table_train() == table
        # the dense row trains apart where the table's schedule does not start as the 30K one
        assert imp.dense_apart() == (arch == "resnet20")
    else:
        assert imp.table_train() is None and not imp.dense_apart()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_the_paper_protocol_trains_every_arch_300_epochs_at_its_own_batch_size(arch):
    """300 epochs of the 45,000 training images, rounded up to whole iterations of the arch's
    batch (60 for Conv-k, 128 for ResNet-20): never 300 epochs of batch 60 at another batch size."""
    table = PROTOCOLS["paper"].train_config(arch, 0)
    assert table.batch_size == ARCHS[arch].batch_size
    epochs = table.iterations * table.batch_size / 45_000
    assert 300 <= epochs < 300 + table.batch_size / 45_000, (arch, epochs)
    from mcwt_ext.data import _split
    assert len(_split(50_000, None, 0)[0]) == 45_000  # CIFAR-10's training split, as the comment says


def test_lengths_that_do_not_scale_back_are_refused():
    tiny = PROTOCOLS["paper"].__class__("t", {"resnet20": 4}, None, eval_every=2, connectivity_samples=None,
                                        table_iterations={"resnet20": 8})
    with pytest.raises(ValueError, match="scale to 4 and back"):  # warm-up 5 of 8 is 2.5 of 4
        tiny.imp_config("resnet20", tiny.train_config("resnet20", 0))


@pytest.mark.slow
def test_paper_like_imp_prunes_a_round_of_its_own_schedule(tmp_path):
    """Rounds of 6 iterations, the table 12 (resnet20: warm-up 8, milestones 8 and 10; the rounds
    4, and 4 and 5): round 0 trains the rounds' schedule and IMP prunes its final weights; the dense
    row trains 12 iterations apart; the ticket trains 12."""
    ds = load_dataset("digits")
    model = build_model("resnet20", ds.in_channels, ds.num_classes, ds.image_size, seed=0)
    table = TrainConfig.for_arch("resnet20", iterations=12, eval_every=6, batch_size=32)
    assert (table.warmup_iterations, table.lr_milestones) == (8, [8, 10])
    cfg = ImpConfig.for_arch("resnet20", train=table.scaled(6), rates={"conv": 0.6}, table_iterations=12,
                             sparsity=arch_sparsity("resnet20", model, ds.example_input(), 0.8))
    seen = []

    def trainer(model, dataset, masks, config, run_dir, progress, desc, snapshot_iterations=()):
        seen.append((RunDir(run_dir).path.name, config.iterations, config.warmup_iterations,
                     config.lr_milestones, sorted(snapshot_iterations)))
        return train(model, dataset, masks, config, run_dir, progress, desc, snapshot_iterations=snapshot_iterations)

    rd = RunDir(tmp_path / "imp")
    run_imp(model, ds, cfg, rd, progress=False, trainer=trainer)
    last = rd.ticket_round()
    assert seen[0] == ("round_00", 6, 4, [4, 5], [])  # no snapshot: pruned from its final weights
    assert seen[1] == ("dense", 12, 8, [8, 10], [])
    assert seen[-1] == (f"round_{last:02d}", 12, 8, [8, 10], [])
    assert all(s[1:4] == (6, 4, [4, 5]) for s in seen[2:-1])
    assert rd.imp_dense().path == rd.subdir(RunDir.DENSE).path and rd.imp_dense().done()
    assert rd.imp_dense().load_json(RunDir.SUMMARY)["iterations"] == 12
