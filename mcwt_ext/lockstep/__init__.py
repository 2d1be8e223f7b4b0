"""A pack: K masked nets of one architecture trained in lockstep, one optimizer step for all.

A small conv net at batch 60 leaves a GPU mostly idle (the step is bound by launch and host
overhead), so the nets of a pack share every kernel: their parameters are stacked along a new
leading dimension, the forward pass runs all K nets at once (grouped convolutions and batched
matrix products, or ``torch.func.vmap`` over ``functional_call``), the K losses are summed (the
gradient of the sum with respect to net k's parameters is the gradient of net k's own loss) and
one Adam step updates the stacked tensors. Adam is elementwise, so this is K independent Adams.

Each net keeps what :func:`mcwt_ext.train.train` gives it: its initial weights, mask (gradients of
pruned weights zeroed before the step, the mask re-applied after it), batch order (net k at
iteration i trains on ``BatchOrder(seed_k).indices(i)``), Adam state, evaluation schedule,
early-stop bookkeeping and run directory with the same ``metrics.csv``, ``summary.json``,
``final.safetensors`` and ``checkpoints/last.pt``. The checkpoints are train()'s own format, so a
pack resumes from them, and so does a single net with train() (net by net).

On CUDA the whole step (batch gather, forward, backward, masks, capturable Adam, loss sums) can
be captured once in a CUDA graph and replayed (``PackOptions(cuda_graph=True)``); batch indices
are prepared on the device one evaluation interval ahead, and evaluation accumulates on the
device with one host sync per evaluation.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .. import supervision
from ..data import Dataset
from ..progress import Progress
from ..runs import RunDir, snapshot_name
from ..train import METRICS_FIELDS, BatchOrder, TrainResult, evaluations_from
from .capabilities import PACK_CAPABILITIES, PackCapability, pack_refusal, pack_refusals
from .forward import IMPLS, PRECISIONS, _autocast, _net_losses, pack_forward
from .nets import PackNet, _checkpoint, _finish, _NetState, _open
from .options import PackOptions

__all__ = ["PackNet", "PackOptions", "train_pack", "IMPLS", "PRECISIONS", "pack_forward", "PACK_CAPABILITIES",
           "PackCapability", "pack_refusal", "pack_refusals"]

EVAL_IMAGES = 1000  # images per evaluation batch, summed over the nets evaluated (as evaluate())
_SHARED_FIELDS = ("iterations", "lr", "batch_size", "device")


# --- the stacked forward pass ----------------------------------------------------------------

class _Pack:
    """The stacked parameters, masks and Adam of the nets of one stage, and their step."""

    def __init__(self, states: list[_NetState], dataset: Dataset, options: PackOptions,
                 device: torch.device):
        self.states, self.options, self.device = states, options, device
        self.k = len(states)
        cfg = states[0].net.config
        self.structure = states[0].net.model  # on the CPU; only its layout is used
        names = [n for n, _ in self.structure.named_parameters()]
        self.names = names
        self.params = {n: torch.stack([st.weights[n] for st in states]).to(device).requires_grad_()
                       for n in names}
        masked = sorted({n for st in states for n, m in st.masks.items() if not bool(m.all())})
        self.mask_params = [self.params[n] for n in masked]
        self.masks = [torch.stack([st.masks[n] if n in st.masks else torch.ones_like(st.weights[n], dtype=torch.bool)
                                   for st in states]).to(device, self.params[n].dtype) for n in masked]
        fused = device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=cfg.lr, fused=fused or None,
                                          capturable=options.cuda_graph)
        if states[0].optimizer is not None:
            self._load_optimizer([st.optimizer for st in states])
        self.x, self.y = (t.to(device) for t in dataset.train.tensors)
        self.val = tuple(t.to(device) for t in dataset.val.tensors)
        self.test = tuple(t.to(device) for t in dataset.test.tensors)
        self.orders = [BatchOrder(len(self.y), cfg.batch_size, st.net.config.seed) for st in states]
        self.loss_sums = torch.stack([st.loss_sum for st in states]).to(device)
        self.autocast = PRECISIONS[options.precision]
        self.graph = None

    # -- optimizer state in and out, in the per-net format of train()'s Adam
    def _load_optimizer(self, per_net: list[dict]) -> None:
        steps = {float(sd["state"][0]["step"]) for sd in per_net if sd["state"]}
        if len(steps) > 1 or any(not sd["state"] for sd in per_net):
            raise ValueError("the nets of a stage must share their Adam step count")
        own = self.optimizer.state_dict()
        own["state"] = {i: {"step": per_net[0]["state"][i]["step"].clone(),
                            **{key: torch.stack([sd["state"][i][key] for sd in per_net])
                               for key in ("exp_avg", "exp_avg_sq")}}
                        for i in range(len(self.names))}
        self.optimizer.load_state_dict(own)

    @staticmethod
    def _net_optimizer(own: dict, j: int) -> dict:
        groups = [dict(g, capturable=False) for g in own["param_groups"]]
        state = {i: {key: (v[j] if v.dim() > 0 else v).detach().to("cpu").clone() for key, v in s.items()}
                 for i, s in own["state"].items()}
        return {"state": state, "param_groups": groups}

    def sync_states(self, iteration: int) -> None:
        """Copy the stacked state back into the nets' states (train()'s checkpoint format)."""
        loss_sums = self.loss_sums.to("cpu")
        own = self.optimizer.state_dict()
        for j, st in enumerate(self.states):
            st.iteration = iteration
            st.weights = {n: self.params[n][j].detach().to("cpu").clone() for n in self.names}
            st.optimizer = self._net_optimizer(own, j)
            st.loss_sum = loss_sums[j].clone()

    def net_weights(self, j: int) -> dict[str, torch.Tensor]:
        return {n: self.params[n][j].detach() for n in self.names}

    # -- training
    def batch_indices(self, start: int, stop: int) -> torch.Tensor:
        """[stop - start, K, B] indices of the batches of iterations start..stop-1, on the device."""
        return torch.stack([torch.stack([o.indices(it) for o in self.orders])
                            for it in range(start, stop)]).to(self.device, non_blocking=True)

    def _step(self, idx: torch.Tensor) -> None:
        """One masked Adam step of every net on the batches ``idx`` [K, B]."""
        with _autocast(self.device, self.autocast):
            logits = pack_forward(self.options.impl, self.structure, self.params, self.x[idx])
        losses = _net_losses(logits, self.y[idx], "mean")
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # d(sum)/d(net k) = d(loss k)/d(net k): the nets are independent
        if self.mask_params:
            torch._foreach_mul_([p.grad for p in self.mask_params], self.masks)
        self.optimizer.step()
        if self.mask_params:
            with torch.no_grad():
                torch._foreach_mul_(self.mask_params, self.masks)
        self.loss_sums += losses.detach()

    def step(self, idx: torch.Tensor) -> None:
        if not self.options.cuda_graph:
            return self._step(idx)
        if self.graph is None:
            self._capture(idx)
        self.static_idx.copy_(idx, non_blocking=True)
        self.graph.replay()

    def _capture(self, idx: torch.Tensor) -> None:
        """Capture ``_step`` in a CUDA graph. The warm-up steps that capture needs change the
        weights, Adam's state and the loss sums, so all of it is restored afterwards, in place
        (the graph holds those very tensors)."""
        tensors = list(self.params.values()) + [self.loss_sums]
        saved = [t.detach().clone() for t in tensors]
        had_state = bool(self.optimizer.state)
        saved_opt = {p: {k: v.clone() for k, v in s.items()} for p, s in self.optimizer.state.items()}
        self.static_idx = idx.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step(self.static_idx)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self._step(self.static_idx)
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
            for p, s in self.optimizer.state.items():
                for k, v in s.items():
                    v.copy_(saved_opt[p][k]) if had_state else v.zero_()

    # -- evaluation: all nets in ``which``, one host sync for both splits
    @torch.no_grad()
    def evaluate(self, which: list[int]) -> list[list[float]]:
        params = self.params if len(which) == self.k else \
            {n: p.detach()[which] for n, p in self.params.items()}
        chunk = max(1, EVAL_IMAGES // len(which))
        sums = []
        for x, y in (self.val, self.test):
            loss = torch.zeros(len(which), dtype=torch.float64, device=self.device)
            correct = torch.zeros(len(which), dtype=torch.int64, device=self.device)
            for i in range(0, len(y), chunk):
                xb, yb = x[i:i + chunk], y[i:i + chunk]
                with _autocast(self.device, self.autocast):
                    logits = pack_forward(self.options.impl, self.structure, params, xb, shared_input=True)
                loss += _net_losses(logits, yb, "sum").double()
                correct += (logits.argmax(2) == yb).sum(1)
            sums += [loss / len(y), correct.double() / len(y)]
        sums.append(self.loss_sums[which])
        # The one host sync: [val_loss, val_acc, test_loss, test_acc, train loss sum] per net.
        return torch.stack(sums, 1).tolist()


# --- the driver -----------------------------------------------------------------------------------

def _check_pack(nets: Sequence[PackNet], options: PackOptions) -> None:
    """A ValueError if ``nets`` do not make one pack: what a pack cannot train at all is
    :func:`.capabilities.pack_refusal`'s (the reproduce grid trains such nets alone)."""
    if not nets:
        raise ValueError("nets must hold at least one PackNet")
    first = nets[0]
    if not isinstance(first, PackNet):
        raise TypeError(f"nets[0] must be a PackNet, got {type(first).__name__}")
    shapes = {n: tuple(p.shape) for n, p in first.model.state_dict().items()}
    for i, net in enumerate(nets):
        if not isinstance(net, PackNet):
            raise TypeError(f"nets[{i}] must be a PackNet, got {type(net).__name__}")
        reason = pack_refusal(net.model, net.config, options)
        if reason is not None:
            raise ValueError(f"nets[{i}]: {reason}; train it with mcwt_ext.train.train (--pack 1; a "
                             f"reproduce grid trains such nets alone itself)")
        if {n: tuple(p.shape) for n, p in net.model.state_dict().items()} != shapes:
            raise ValueError(f"nets[{i}] has another architecture than nets[0]; a pack holds one")
        for name in _SHARED_FIELDS:
            if getattr(net.config, name) != getattr(first.config, name):
                raise ValueError(f"nets[{i}] has config.{name} {getattr(net.config, name)!r}, nets[0] "
                                 f"{getattr(first.config, name)!r}; the nets of a pack must share "
                                 f"{', '.join(_SHARED_FIELDS)}")
    dirs = [RunDir(n.run_dir).path.resolve() if not isinstance(n.run_dir, RunDir) else n.run_dir.path.resolve()
            for n in nets if n.run_dir is not None]
    if len(set(dirs)) != len(dirs):
        raise ValueError("two nets of the pack share a run directory")


def _fp32_settings() -> dict:
    """The float32 precision of cuDNN convolutions and CUDA matmuls, read through the per-op API
    (torch >= 2.9): the old ``cudnn.allow_tf32`` getter raises once a per-op value is set alone."""
    cudnn, cuda = torch.backends.cudnn, torch.backends.cuda
    conv = getattr(getattr(cudnn, "conv", None), "fp32_precision", None)
    matmul = getattr(getattr(cuda, "matmul", None), "fp32_precision", None)
    return dict(cudnn_conv_fp32_precision=conv if conv is not None else ("tf32" if cudnn.allow_tf32 else "ieee"),
                cuda_matmul_fp32_precision=matmul if matmul is not None else
                ("tf32" if cuda.matmul.allow_tf32 else "ieee"))


def train_pack(nets: Sequence[PackNet], dataset: Dataset, options: PackOptions | None = None,
               progress: bool = True, desc: str = "pack") -> list[TrainResult]:
    """Train ``nets`` (one architecture; shared iterations, lr, batch size and device) in lockstep.

    Each net ends as :func:`mcwt_ext.train.train` would leave it (its model trained in place,
    the same run-directory files), up to float rounding: a finished net is read back, a net with a
    checkpoint resumes from it. Nets at different iterations (resumed net by net) train in
    stages: the ones furthest behind train together until they reach the next ones, and so on.
    Returns one TrainResult per net, in order. Each summary adds ``lockstep`` (pack size,
    implementation, precision, CUDA graph, TF32 settings, the pack's wall time); its
    ``wall_time_s`` is the net's share of the pack's time.
    """
    options = options or PackOptions()
    if not isinstance(options, PackOptions):
        raise TypeError(f"options must be a PackOptions, got {type(options).__name__}")
    _check_pack(nets, options)
    device = torch.device(nets[0].config.device)
    if options.cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph needs a CUDA device, got {device}")
    states = [_open(net, options, device) for net in nets]
    iterations = nets[0].config.iterations
    extra = dict(pack_size=len(nets), impl=options.impl, precision=options.precision,
                 cuda_graph=options.cuda_graph, device=str(device), **_fp32_settings(),
                 matmul_precision=torch.get_float32_matmul_precision(), pack_wall_time_s=0.0)
    todo = [st for st in states if st.result is None]
    bar = Progress(iterations * len(todo), desc, unit="net-step", noun="net-step",
                   initial=sum(st.iteration for st in todo),
                   evaluations=sum(evaluations_from(st.iteration, st.net.config) for st in todo), enabled=progress)
    try:
        while todo:
            start = min(st.iteration for st in todo)
            stage = [st for st in todo if st.iteration == start]
            stop = min([st.iteration for st in todo if st.iteration > start] + [iterations])
            _train_stage(stage, dataset, options, device, start, stop, bar, extra)
            todo = [st for st in states if st.result is None]
    finally:
        bar.close()
    return [st.result for st in states]


def _train_stage(stage: list[_NetState], dataset: Dataset, options: PackOptions, device: torch.device,
                 start: int, stop: int, bar, extra: dict) -> None:
    pack = _Pack(stage, dataset, options, device)
    iterations = stage[0].net.config.iterations
    began = time.perf_counter()
    counted = 0.0  # pack seconds already shared out to the nets' wall_time_s

    def share_time():
        nonlocal counted
        now = time.perf_counter() - began
        for st in stage:
            st.wall_time_s += (now - counted) / len(stage)
        extra["pack_wall_time_s"] += now - counted
        counted = now

    def record(it, which):
        rows = pack.evaluate(which)
        for j, (val_loss, val_acc, test_loss, test_acc, loss_sum) in zip(which, rows):
            st = stage[j]
            train_loss = loss_sum / st.loss_count if st.loss_count else float("nan")
            st.history.append(dict(iteration=it, train_loss=train_loss, val_loss=val_loss, val_acc=val_acc,
                                   test_loss=test_loss, test_acc=test_acc))
            st.loss_count = 0
            if st.rd is not None:
                st.rd.save_csv(RunDir.METRICS, st.history, METRICS_FIELDS)
        with torch.no_grad():
            pack.loss_sums[which] = 0.0

    def snapshot(it):
        for j, st in enumerate(stage):
            if it in st.snapshots:
                st.rd.save_tensors(snapshot_name(it), pack.net_weights(j))

    if start == 0:
        with bar.evaluating(len(stage)):
            record(0, list(range(len(stage))))
        snapshot(0)
    checkpointed = [time.monotonic()] * len(stage)  # per net: when its last checkpoint was written
    # Batch indices go to the device one evaluation interval (at most) ahead: no host work per step.
    ahead = min(st.net.config.eval_every for st in stage)
    idx, idx_from = None, start
    for it in range(start + 1, stop + 1):  # it = steps done after this one
        if idx is None or it - 1 - idx_from >= len(idx):
            idx_from = it - 1
            idx = pack.batch_indices(idx_from, min(idx_from + ahead, stop))
        pack.step(idx[it - 1 - idx_from])
        for st in stage:
            st.loss_count += 1
        bar.update(len(stage))
        snapshot(it)
        due = [j for j, st in enumerate(stage) if it % st.net.config.eval_every == 0 or it == iterations]
        if due:
            with bar.evaluating(len(due)):
                record(it, due)
        now = time.monotonic()
        ckpt = [j for j, st in enumerate(stage)
                if st.rd is not None and st.net.config.checkpoint_due(it, now - checkpointed[j])]
        if ckpt or it == stop:
            share_time()
            pack.sync_states(it)
            for j in ckpt:
                _checkpoint(stage[j], options)
                checkpointed[j] = now
            if ckpt:
                supervision.saved_point()
    if stop == iterations:
        for st in stage:
            _finish(st, options, dict(extra))
