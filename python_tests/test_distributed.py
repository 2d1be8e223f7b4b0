"""DDP training (torchrun): 2 gloo processes on CPU train one net exactly as one process does."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import child_env, synthetic_model
from mcwt_ext import distributed
from mcwt_ext.connectivity import measure_connectivity
from mcwt_ext.data import load_dataset
from mcwt_ext.masks import random_masks
from mcwt_ext.runs import atomic_write
from mcwt_ext.train import TrainConfig, train


def _cfg(**kw):
    return TrainConfig(**{**dict(iterations=50, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=1e-4,
                                 warmup_iterations=10, lr_milestones=[40], batch_size=20, eval_every=25,
                                 checkpoint_every=20), **kw})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out):
    """What each process does (and the single process, for reference)."""
    ds = load_dataset("synthetic")
    model = synthetic_model()
    masks = random_masks(model, 0.5, seed=0)
    result = train(model, ds, masks, _cfg(), out / "run", progress=False)
    conn = measure_connectivity(model, masks, ds.train.tensors[0])
    return model.state_dict(), result.summary, conn


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert distributed.init("cpu") and distributed.world_size() == world
    try:
        state, summary, conn = _run(out)
        atomic_write(out / f"probe{rank}", "x")  # only rank 0 writes files
        assert (out / f"probe{rank}").exists() == (rank == 0)
        with pytest.raises(ValueError, match="--batch-size 7 is not divisible by the 2 processes"):
            train(synthetic_model(), load_dataset("synthetic"), None, _cfg(batch_size=7), progress=False)
        torch.save(dict(state=state, summary=summary, conn=conn), out / f"result{rank}.pt")
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_two_gloo_processes_train_as_one(tmp_path):
    """50 SGD steps (warm-up, a milestone, masks) on 2 ranks, each half of every global batch:
    the weights equal one process's at the same global batch within 1e-5; the sharded,
    all-reduced evaluation and connectivity equal the single process's; rank 0 alone writes the
    run directory, which holds the same files."""
    (tmp_path / "ddp").mkdir()
    mp.spawn(_worker, args=(2, _free_port(), tmp_path / "ddp"), nprocs=2, join=True)
    state, summary, conn = _run(tmp_path / "one")
    for rank in range(2):
        got = torch.load(tmp_path / "ddp" / f"result{rank}.pt", weights_only=True)
        for key, value in state.items():
            torch.testing.assert_close(got["state"][key], value, rtol=0, atol=1e-5)
        for key in ("val_loss_final", "val_acc_final", "test_acc_final", "min_val_loss"):
            assert got["summary"][key] == pytest.approx(summary[key], abs=1e-5)
        for key, g in conn.items():
            torch.testing.assert_close(got["conn"][key], g, rtol=1e-6, atol=1e-6)
    assert not any(torch.equal(v, synthetic_model().state_dict()[k]) for k, v in state.items()
                   if k.endswith("weight"))  # it did train
    files = {p.relative_to(tmp_path / "one" / "run") for p in (tmp_path / "one" / "run").rglob("*")}
    assert {p.relative_to(tmp_path / "ddp" / "run") for p in (tmp_path / "ddp" / "run").rglob("*")} == files


@pytest.mark.parametrize("device, backend, set_device", [("cpu", "gloo", []), (None, "gloo", []),
                                                         ("cuda", "nccl", [1]), ("cuda:0", "nccl", [1])],
                         ids=["cpu-ranks", "no-device", "gpu-ranks", "gpu0-ranks"])  # CPU tests: no "cuda" id
def test_the_backend_follows_the_device_not_the_visible_gpu(monkeypatch, device, backend, set_device):
    """Two CPU ranks on a machine with a GPU use gloo and no CUDA device (issue 18); CUDA ranks
    use NCCL on cuda:LOCAL_RANK."""
    joined, devices = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(distributed.dist, "init_process_group", joined.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.init(device)
    assert joined == [backend] and devices == set_device


def test_the_cli_joins_with_the_commands_device(monkeypatch, tmp_path):
    from mcwt_ext import cli

    seen = []

    def init(device):
        seen.append(device)
        raise KeyboardInterrupt  # stop before the command runs
    monkeypatch.setattr(distributed, "init", init)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["train", "--arch", "conv2", "--dataset", "synthetic", "--device", "cpu", "--out", str(tmp_path / "r")])
    with pytest.raises(KeyboardInterrupt):
        cli.main(["reproduce", "--out", str(tmp_path / "g")])
    assert seen == ["cpu", "cpu"]


def test_one_process_is_not_distributed():
    assert not distributed.active() and distributed.part() == (0, 1) and distributed.share(5) == slice(0, 5)
    distributed.check_batch_size(7)


@pytest.mark.slow
def test_readme_torchrun_command_runs(tmp_path):
    """The README's "Scaling out" torchrun command, as written (on a free port)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    section = (root / "README.md").read_text().split("### Scaling out", 1)[1]
    command = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    command = command.replace("torchrun", f"{sys.executable} -m torch.distributed.run", 1)
    command = re.sub(r"--master-port \d+", f"--master-port {_free_port()}", command)
    done = subprocess.run(command, shell=True, cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"rc {done.returncode}; stdout: {done.stdout[-1500:]}; stderr: {done.stderr[-3000:]}"
    summary = __import__("json").loads((tmp_path / "runs" / "ddp-digits" / "summary.json").read_text())
    assert summary["iterations"] == 200 and summary["val_acc_final"] > 0.9
    assert done.stdout.count("val_acc_final") == 1  # one report, rank 0's
