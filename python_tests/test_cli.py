import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch

from mcwt_ext.cli import main
from mcwt_ext.masks import kept_count
from mcwt_ext.models import build_model_from_config
from mcwt_ext.runs import RunDir

BASE = ["--arch", "conv2", "--dataset", "synthetic", "--iterations", "4", "--eval-every", "2", "--no-progress"]


def _fails(capsys, argv, match):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


@pytest.mark.parametrize("argv,match", [
    (["train", *BASE, "--lr", "-1", "--out", "x"], "--lr"),
    (["train", *BASE, "--iterations", "many", "--out", "x"], "--iterations"),
    (["train", *BASE, "--batch-size", "0", "--out", "x"], "--batch-size"),
    (["train", "--arch", "conv9", "--dataset", "synthetic", "--out", "x"], "--arch"),
    (["train", *BASE], "--out"),
    (["train", *BASE, "--device", "tpu", "--out", "x"], "--device"),
    (["train", *BASE, "--masks", "/nonexistent.safetensors", "--out", "x"], "--masks"),
    (["train", "--arch", "conv2", "--dataset", "cifar10", "--out", "x"], "--data-root"),
    (["imp", *BASE, "--sparsity", "1.2", "--out", "x"], "--sparsity"),
    (["imp", *BASE, "--rates", "conv=0.1,dense=0.2", "--out", "x"], "--rates"),
    (["imp", *BASE, "--rewind-iteration", "4", "--out", "x"], "rewind_iteration"),
    (["random", *BASE, "--sparsity", "0.5", "--like", "m.safetensors", "--out", "x"], "--like"),
    (["frobnicate"], "frobnicate"),
])
def test_bad_arguments_give_one_line_and_exit_2(capsys, tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.safetensors").write_bytes(b"")
    _fails(capsys, argv, match)


def test_a_flag_of_another_command_is_an_error_of_this_one(capsys):
    """Reported under the command, with the commands that take the flag (or the flag it resembles)."""
    err = _fails(capsys, ["train", *BASE, "--sparsity", "0.5", "--out", "x"], "--sparsity")
    assert err == ("mcwt train: error: unrecognized arguments: --sparsity 0.5 (--sparsity is a flag of: mcwt imp, "
                   "mcwt random, mcwt prune, mcwt dst, mcwt sample) (see mcwt train --help)\n")
    err = _fails(capsys, ["train", *BASE, "--iteratons=3", "--out", "x"], "--iteratons")
    assert err == ("mcwt train: error: unrecognized arguments: --iteratons=3 (did you mean --iterations?) "
                   "(see mcwt train --help)\n")


def _refusing(monkeypatch, folder: Path, route: str) -> None:
    """``folder`` refuses new entries, as a folder without write permission does (simulated: root may
    write anywhere): to check_out's access test ("early"), or only to the mkdir of --out ("late")."""
    def inside(path) -> bool:
        path = Path(path).absolute()
        return path == folder or folder in path.parents

    if route == "early":
        real = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: not inside(path) and real(path, mode))
    else:
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if folder in Path(path).absolute().parents:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_mkdir(path, *args, **kwargs)
        monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.mark.parametrize("command,route", [(["train", *BASE], "early"), (["train", *BASE], "late"),
                                           (["fit", "--ticket", "t"], "early")])
def test_an_out_that_cannot_be_created_names_the_flag(tmp_path, monkeypatch, capsys, command, route):
    folder = tmp_path / "ro"
    folder.mkdir()
    _refusing(monkeypatch, folder, route)
    out, what = (folder / "run", "run directory") if command[0] == "train" else (folder / "fit.json", "file")
    err = _fails(capsys, [*command, "--out", str(out)], "--out")
    assert err == (f"mcwt {command[0]}: error: --out {out}: permission denied (cannot create the {what} in "
                   f"{folder}) (see mcwt {command[0]} --help)\n")
    assert list(folder.iterdir()) == []


def test_an_out_that_cannot_be_written_names_the_flag(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(["train", *BASE, "--out", str(out)]) == 0
    _refusing(monkeypatch, out, "early")
    err = _fails(capsys, ["train", *BASE, "--out", str(out)], "--out")
    assert err == (f"mcwt train: error: --out {out}: permission denied (cannot write in the run directory) "
                   f"(see mcwt train --help)\n")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, which takes no new entries")
def test_an_out_the_file_system_refuses_names_the_flag(capsys):
    """A real refusal (root too): /proc takes no directories (ENOENT; EACCES where check_out sees it)."""
    err = _fails(capsys, ["train", *BASE, "--out", "/proc/mcwt_run"], "--out")
    assert re.fullmatch(r"mcwt train: error: --out /proc/mcwt_run: (no such file or directory|permission denied) "
                        r"\(cannot create the run directory in /proc\) \(see mcwt train --help\)\n", err), err


def test_a_cuda_index_beyond_the_visible_devices_is_a_clean_error(capsys, tmp_path, monkeypatch):
    """`--device cuda:7` on a one-GPU machine: one line naming --device, exit 2 (issue 18)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    err = _fails(capsys, ["train", *BASE, "--device", "cuda:7", "--out", str(tmp_path / "x")], "--device")
    assert "cuda:7: only 1 CUDA device(s) visible" in err
    _fails(capsys, ["reproduce", "--device", "cuda:1", "--out", str(tmp_path / "g")], "--device")
    assert not (tmp_path / "x").exists() and not (tmp_path / "g").exists()


def test_missing_cifar_files_are_a_clean_error(capsys, tmp_path):
    _fails(capsys, ["train", "--arch", "conv2", "--dataset", "cifar10", "--data-root", str(tmp_path),
                    "--out", str(tmp_path / "run")], "cifar-10-batches-py")


@pytest.fixture(scope="module")
def imp_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "imp"
    assert main(["imp", *BASE, "--sparsity", "0.5", "--rates", "conv=0.5,linear=0.5,output=0.5",
                 "--out", str(out)]) == 0
    return RunDir(out)


def test_imp_writes_a_ticket_and_a_rebuildable_config(imp_dir):
    config = imp_dir.load_json("config.json")
    assert {k: config[k] for k in ("command", "arch", "dataset", "in_channels", "image_size", "num_classes", "seed")} \
        == dict(command="imp", arch="conv2", dataset="synthetic", in_channels=3, image_size=8, num_classes=10, seed=0)
    model = build_model_from_config(config)
    init = imp_dir.load_tensors("init.safetensors")
    assert all(torch.equal(init[k], v) for k, v in model.state_dict().items())
    model.load_state_dict(init)  # the documented way to restore the initial weights
    for m in imp_dir.load_tensors("masks.safetensors").values():
        assert int(m.sum()) == kept_count(m.numel(), 0.5)


def test_train_with_a_ticket_uses_the_init_next_to_its_masks(imp_dir, tmp_path, capsys):
    out = tmp_path / "wt"
    assert main(["train", *BASE, "--masks", str(imp_dir.masks_path), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    rd = RunDir(out)
    ticket_round = imp_dir.subdir("round_01")  # trained the same ticket, same init, same settings
    assert report["val_acc_final"] == ticket_round.load_json("summary.json")["val_acc_final"]
    final, expected = rd.load_tensors("final.safetensors"), ticket_round.load_tensors("final.safetensors")
    assert all(torch.equal(final[k], expected[k]) for k in final)
    assert rd.load_json("config.json")["init"] == str(imp_dir.init_path.resolve())


def test_random_matches_the_ticket_density_and_keeps_the_init(imp_dir, tmp_path):
    out = tmp_path / "rand"
    assert main(["random", *BASE, "--like", str(imp_dir.masks_path), "--no-train", "--out", str(out)]) == 0
    rd = RunDir(out)
    ticket, masks = imp_dir.load_tensors("masks.safetensors"), rd.load_tensors("masks.safetensors")
    assert all(int(masks[k].sum()) == int(ticket[k].sum()) for k in ticket)
    assert not all(torch.equal(masks[k], ticket[k]) for k in ticket)
    init, ticket_init = rd.load_tensors("init.safetensors"), imp_dir.load_tensors("init.safetensors")
    assert all(torch.equal(init[k], ticket_init[k]) for k in init)
    assert not rd.exists("final.safetensors")


def test_random_trains_with_exact_sparsity(tmp_path):
    out = tmp_path / "rand"
    assert main(["random", *BASE, "--sparsity", "0.9", "--mask-seed", "3", "--out", str(out)]) == 0
    rd = RunDir(out)
    final = rd.load_tensors("final.safetensors")
    for name, mask in rd.load_tensors("masks.safetensors").items():
        assert int(mask.sum()) == kept_count(mask.numel(), 1 - 0.9)
        assert torch.count_nonzero(final[name][~mask]) == 0
    assert rd.load_json("summary.json")["iterations"] == 4


def test_rerun_resumes_and_other_settings_are_refused(tmp_path, capsys):
    out = str(tmp_path / "dense")
    assert main(["train", *BASE, "--out", out]) == 0
    first = capsys.readouterr()
    assert "already finished" not in first.err
    assert main(["train", *BASE, "--out", out]) == 0  # finished: read back, and says so first
    again = capsys.readouterr()
    assert again.out == first.out
    assert again.err.splitlines()[0] == f"mcwt train: --out {out} already finished; its summary:"
    _fails(capsys, ["train", *BASE, "--lr", "0.01", "--out", out], "train.lr")


@pytest.mark.parametrize("command", [["random"], ["prune", "--method", "magnitude"], ["dst", "--method", "set"]])
def test_a_finished_command_says_so_first(tmp_path, capsys, command):
    argv = [*command, *BASE, "--sparsity", "0.5", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert main(argv) == 0
    again = capsys.readouterr()
    summary = first.out[first.out.index("{"):]  # prune also says how long its masks took
    assert "already finished" not in first.err and again.out.endswith(summary)
    assert again.err.splitlines()[0] == f"mcwt {command[0]}: --out {tmp_path / 'run'} already finished; its summary:"


def test_a_finished_imp_says_so_and_plans_nothing(imp_dir, capsys):
    capsys.readouterr()
    assert main(["imp", *BASE, "--sparsity", "0.5", "--rates", "conv=0.5,linear=0.5,output=0.5",
                 "--out", str(imp_dir.path)]) == 0
    assert capsys.readouterr().err == f"mcwt imp: --out {imp_dir.path} already finished; its summary:\n"


def test_imp_says_its_plan_before_training(tmp_path, capsys):
    """The rounds each layer kind needs at its rate, the largest count first (conv2's protocol rates)."""
    assert main(["imp", *BASE, "--max-rounds", "0", "--out", str(tmp_path / "imp")]) == 0
    assert capsys.readouterr().err.splitlines()[0] == (
        "16 rounds to 80% at 10% per round for conv layers (linear 8, output 16); --max-rounds 0 stops after 0; "
        "see --rates")


@pytest.mark.parametrize("command", [["random"], ["prune", "--method", "magnitude"]])
def test_masks_only_resume_into_their_training_and_back(tmp_path, capsys, command):
    """--no-train, then the same command without it, trains the masks made; --no-train again keeps
    the training (issue 25)."""
    out = tmp_path / "run"
    argv = [*command, *BASE, "--sparsity", "0.5", "--out", str(out)]
    assert main([*argv, "--no-train"]) == 0
    masks = RunDir(out).load_tensors(RunDir.MASKS)
    assert main(argv) == 0
    rd = RunDir(out)
    assert rd.done() and rd.load_json(RunDir.SUMMARY)["iterations"] == 4
    assert all(torch.equal(masks[k], m) for k, m in rd.load_tensors(RunDir.MASKS).items())
    assert main([*argv, "--no-train"]) == 0
    assert rd.load_json(RunDir.CONFIG)["train"]["iterations"] == 4
    capsys.readouterr()
    assert main(argv) == 0
    assert "already finished" in capsys.readouterr().err


def test_init_from_another_architecture_is_refused(imp_dir, tmp_path, capsys):
    _fails(capsys, ["train", *BASE[:1], "conv4", *BASE[2:], "--init", str(imp_dir.init_path),
                    "--out", str(tmp_path / "x")], "holds the weights of a conv2 on synthetic, not of a conv4")


def test_help_names_everything_the_registries_hold():
    """--help of every command lists every architecture, dataset and method it accepts, taken from
    the registries (a new registry entry shows up without editing a help string)."""
    from mcwt_ext.ablate import KINDS as ABLATIONS
    from mcwt_ext.cli import build_parser
    from mcwt_ext.data import DATASETS
    from mcwt_ext.experiments.methods import METHODS
    from mcwt_ext.fit import GRANULARITIES
    from mcwt_ext.models import ARCHS
    from mcwt_ext.dst import DST_METHODS
    from mcwt_ext.prune_at_init import METHODS as PRUNE_METHODS

    wanted = {"--arch": ARCHS, "--dataset": DATASETS, "--methods": METHODS, "--method": PRUNE_METHODS,
              "--kind": ABLATIONS, "--granularity": GRANULARITIES}
    checked = set()
    for name, sub in build_parser().commands.items():
        text = " ".join(sub.format_help().split())
        for flag, registry in wanted.items():
            if any(flag in a.option_strings for a in sub._actions):
                registry = DST_METHODS if (name, flag) == ("dst", "--method") else registry
                missing = [k for k in registry if k not in text]
                assert not missing, f"mcwt {name} --help: {flag} does not name {missing}"
                checked.add((name, flag))
    assert {("reproduce", "--arch"), ("reproduce", "--methods"), ("train", "--dataset"),
            ("prune", "--method"), ("dst", "--method")} <= checked
