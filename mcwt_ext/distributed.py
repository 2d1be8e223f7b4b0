"""One net trained by several processes (``torchrun``) with ``DistributedDataParallel``.

Under ``torchrun --nproc-per-node N -m mcwt_ext.cli ...`` every process runs the same command.
:func:`init` joins the process group with the backend of ``--device`` (gloo for ``cpu``, also
where a GPU is visible; NCCL for ``cuda``, rank ``r`` on ``cuda:LOCAL_RANK``);
afterwards:

- training splits each global batch of :class:`~mcwt_ext.train.BatchOrder` into ``N`` equal
  contiguous slices, one per rank, and DDP averages the gradients, so a step equals the
  single-process step on the whole batch (up to float summation order);
- evaluation and the connectivity measurement each take a contiguous share of the images and
  all-reduce their sums and counts;
- only rank 0 writes files (:func:`mcwt_ext.runs.atomic_write` is a no-op elsewhere); the others
  read what it wrote after a :func:`barrier`.

Without a process group (or with one process) every function here is the identity, so the
single-process code path is untouched. BatchNorm normalises each rank's slice with its own batch
statistics (DDP's default, not SyncBatchNorm); the running statistics are rank 0's, broadcast at
every forward and before each evaluation.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from .errors import UsageError

__all__ = ["init", "backend_for", "join", "shutdown", "all_reduce_mean", "active", "rank", "world_size",
           "is_main", "barrier", "all_reduce_sum", "share", "part", "local_slice", "broadcast_buffers", "wrap",
           "check_batch_size", "device_for"]


def init(device: str | torch.device | None = None) -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment),
    with the backend of the command's ``--device`` (:func:`backend_for`); return whether this
    process is one of several. Safe to call twice."""
    if active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    join(device)
    return True


def backend_for(device: str | torch.device | None) -> str:
    """NCCL for CUDA ranks, gloo otherwise: CPU ranks use gloo even where a GPU is visible."""
    return "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"


def join(device: str | torch.device | None) -> None:
    """Join the group the environment describes (``env://``), a CUDA rank on ``cuda:LOCAL_RANK``."""
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def shutdown() -> None:
    """Leave the process group :func:`init` joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(total: torch.Tensor, count: int) -> torch.Tensor:
    """``total / count`` with both summed over the ranks (a mean over all their samples)."""
    if not active():
        return total / count
    n = torch.tensor(float(count), dtype=torch.float64, device=total.device)
    return all_reduce_sum(total) / all_reduce_sum(n)


def active() -> bool:
    """Whether this process trains with others."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes the files (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def device_for(device: str | torch.device) -> torch.device:
    """``device``, or under NCCL this rank's GPU (``cuda`` names the local one)."""
    device = torch.device(device)
    if active() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks (in place), as it is with one process."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def share(n: int) -> slice:
    """This rank's contiguous share of ``n`` items (the first ``n % N`` ranks get one more)."""
    size, r = world_size(), rank()
    per, extra = divmod(n, size)
    start = r * per + min(r, extra)
    return slice(start, start + per + (r < extra))


def check_batch_size(batch_size: int) -> None:
    """The global batch must split evenly over the ranks."""
    if batch_size % world_size():
        raise UsageError(f"--batch-size {batch_size} is not divisible by the {world_size()} "
                         f"processes torchrun started; give a multiple of {world_size()}")


def part() -> tuple[int, int]:
    """``(rank, world size)``: which slice of each global batch this process trains on."""
    return rank(), world_size()


def local_slice(batch: torch.Tensor, part: tuple[int, int]) -> torch.Tensor:
    """Slice ``part[0]`` of ``part[1]`` equal slices of a global batch (a pure function, so
    DataLoader workers need no process group)."""
    r, size = part
    if size == 1:
        return batch
    per = len(batch) // size
    return batch[r * per:(r + 1) * per]


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: each rank's training
    forward updates them from its own slice, and evaluation and the saved weights are rank 0's."""
    if active():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel when several processes train it, else itself.
    The wrapper shares ``model``'s parameters, so training it trains ``model``."""
    if not active():
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
