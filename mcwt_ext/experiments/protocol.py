"""Protocols: what differs between the full Frankle & Carbin protocol and the reduced CPU one,
and the training / IMP settings they give one architecture."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..models import ARCHS

__all__ = ["Protocol", "PROTOCOLS", "PAPER_EPOCHS", "paper_iterations"]


@dataclass(frozen=True)
class Protocol:
    """What differs between the full F&C protocol and the reduced CPU one."""

    name: str
    iterations: dict[str, int] | None      # per arch; None: the architecture's protocol value
    rates: dict[str, float] | None         # IMP rates by layer kind; None: the protocol's
    eval_every: int
    connectivity_samples: int | None       # inputs connectivity is measured on; None: all
    sparsity: float = 0.8
    # the five Table 1 trainings (not IMP's middle rounds), per arch; None: as the other trainings
    table_iterations: dict[str, int] | None = None

    def describe(self) -> dict:
        return dataclasses.asdict(self)

    def table_length(self, arch: str) -> int | None:
        """Iterations of ``arch``'s Table 1 trainings under this protocol (None: the protocol's)."""
        return None if self.table_iterations is None else self.table_iterations[arch]

    def train_config(self, arch: str, seed: int, *, iterations: int | None = None,
                     eval_every: int | None = None, device: str = "cpu", augment: str | None = None,
                     precision: str = "fp32"):
        """The TrainConfig of ``arch`` under this protocol; ``iterations`` and ``eval_every``
        override the protocol's, ``augment`` the architecture's; ``precision``: :mod:`mcwt_ext.precision`."""
        from ..train import TrainConfig

        return TrainConfig.for_arch(arch, iterations=iterations or self.table_length(arch)
                                    or (self.iterations or {}).get(arch),
                                    seed=seed, eval_every=eval_every or self.eval_every, device=device,
                                    augment=augment, precision=precision)

    def imp_config(self, arch: str, train, sparsity=None):
        """The ImpConfig of ``arch`` under this protocol, training with ``train`` (a Table 1
        training: with ``table_iterations``, only the dense round and the ticket train that long,
        the rounds between train the protocol's iterations, their learning-rate schedule scaled to
        that length); ``sparsity`` (per layer) replaces the protocol's where given."""
        from ..imp import ImpConfig

        table = None
        if self.table_iterations is not None and train.iterations == self.table_length(arch):
            table = train.iterations
            rounds = (self.iterations or {}).get(arch) or ARCHS[arch].iterations
            # the rounds' warm-up and milestones are those of a 30K, not the table's, training; the
            # ticket trains them scaled back (ImpConfig.table_train), which must give ``train``
            rounds_train = train.scaled(rounds)
            if rounds_train.scaled(table) != train:
                raise ValueError(f"{arch}: the learning-rate schedule of {table} iterations does not "
                                 f"scale to {rounds} and back exactly; choose lengths that do")
            train = rounds_train
        return ImpConfig.for_arch(arch, train=train, rates=self.rates or {},
                                  sparsity=self.sparsity if sparsity is None else sparsity,
                                  table_iterations=table)


#: The paper protocol's Table 1 trainings: 300 epochs (Grzeszczuk & Kurdziel train "up to 300-500
#: epochs"; the least) of the 45,000-image training split (F&C's 50,000 less 5,000 validation images:
#: mcwt_ext.data), at each architecture's batch size (ARCHS: 60 for Conv-2/4/6, F&C App. H; 128 for
#: ResNet-20, He et al. 2016 Sec. 4.2), rounded up to whole iterations: 225,000 for Conv-k, 105,469
#: for ResNet-20.
PAPER_EPOCHS, TRAIN_IMAGES = 300, 45_000


def paper_iterations(arch: str) -> int:
    return math.ceil(PAPER_EPOCHS * TRAIN_IMAGES / ARCHS[arch].batch_size)


PROTOCOLS = {
    # Frankle & Carbin App. H: 20K/25K/30K iterations, rates conv 10% (15% conv6),
    # linear 20%, output 10%, connectivity over all 45,000 training images.
    "full": Protocol("full", None, None, eval_every=100, connectivity_samples=None),
    # The MCWT paper's budget ("up to 300-500 epochs"): IMP as in full (its rounds prune after
    # 20K/25K/30K iterations), and the five Table 1 trainings (dense, random, WT, both MCWT) run
    # 300 epochs at each architecture's own batch size (PAPER_EPOCHS).
    "paper": Protocol("paper", None, None, eval_every=100, connectivity_samples=None,
                      table_iterations={a: paper_iterations(a) for a in ARCHS}),
    # For 2-core CPUs: a twentieth of the iterations (1,000 for conv2: 1.3 epochs of
    # CIFAR-10), IMP reaching 80% in two rounds (60% of the remaining weights per round,
    # the last round landing on the target), evaluations (validation + test, 15,000
    # CIFAR images) every 200 iterations, connectivity on 10,000 training images.
    "reduced": Protocol("reduced", {a: ARCHS[a].iterations // 20 for a in ARCHS},
                        {"conv": 0.6, "linear": 0.6, "output": 0.6}, eval_every=200,
                        connectivity_samples=10_000),
}
