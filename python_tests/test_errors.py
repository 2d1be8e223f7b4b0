"""The user's mistake against mcwt's own bug: a UsageError (or an OS refusal about a path a flag
gave) is one ``mcwt <cmd>: error: ...`` line and exit status 2; anything else is exit status 1,
one line saying it is a bug, and the traceback in a file."""
import errno
import re
import tempfile
from pathlib import Path

import pytest

from mcwt_ext import commands
from mcwt_ext.cli import main
from mcwt_ext.errors import MissingFileError, UsageError
from mcwt_ext.runlock import Terminated

BASE = ["--arch", "conv2", "--dataset", "synthetic", "--iterations", "4", "--eval-every", "2", "--no-progress"]


@pytest.fixture
def tmpdir_here(tmp_path, monkeypatch):
    """Traceback files go to this test's folder, not the machine's /tmp."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _usage(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"mcwt {argv[0]}: error: "), err
    return err


def _raising(error):
    def fail(*args, **kwargs):
        raise error
    return fail


@pytest.mark.parametrize("error", [ValueError("boom"), KeyError("boom"), FileNotFoundError("boom")])
def test_an_internal_error_is_a_bug_exit_1_with_its_traceback_in_a_file(tmp_path, tmpdir_here, capsys,
                                                                        monkeypatch, error):
    monkeypatch.setattr(commands, "train", _raising(error))  # as if training hit a bug
    out = tmp_path / "run"
    argv = ["train", *BASE, "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("mcwt train: internal error (a bug in mcwt; please report it with the traceback in ")
    assert f"): {type(error).__name__}: " in err and "boom" in err and "Traceback" not in err
    path = Path(re.search(r"the traceback in (\S+)\)", err).group(1))
    assert path.parent == tmpdir_here and path.name.startswith("mcwt-train-")
    text = path.read_text()
    assert text.startswith(f"mcwt train {' '.join(argv[1:])}\n")
    assert "Traceback (most recent call last)" in text and "in fail" in text and "boom" in text
    assert not out.exists()  # a fresh run directory holding only its starting files goes again


def test_a_bug_prints_its_traceback_where_no_file_can_be_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(commands, "check_out", _raising(ValueError("boom")))  # before the command writes
    monkeypatch.setattr(tempfile, "mkstemp", _raising(PermissionError(errno.EACCES, "Permission denied")))
    assert main(["train", *BASE, "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ValueError: boom" in err
    assert err.splitlines()[-1].startswith("mcwt train: internal error (a bug in mcwt; please report it with "
                                           "the traceback above): ValueError: boom")


@pytest.mark.parametrize("argv,flag", [
    (["train", *BASE, "--lr", "-1"], "--lr"),                                           # argparse's type
    (["random", *BASE, "--distribution", "erk", "--like", "{m}"], "--distribution"),    # the command's check
    (["imp", *BASE, "--rewind-iteration", "4"], "rewind_iteration"),                    # a library's config check
    (["train", *BASE, "--masks", "{m}"], "--masks"),                                    # the file the flag names
])
def test_a_bad_flag_value_is_one_line_exit_2_naming_the_flag(tmp_path, capsys, argv, flag):
    (tmp_path / "m.safetensors").write_bytes(b"not safetensors")
    argv = [a.format(m=tmp_path / "m.safetensors") for a in argv] + ["--out", str(tmp_path / "run")]
    assert flag in _usage(capsys, argv)


def test_out_under_a_regular_file_names_out(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run"
    err = _usage(capsys, ["train", *BASE, "--out", str(out)])  # refused by check_out, before any work
    assert f"--out {out}: " in err and "is a file" in err
    monkeypatch.setattr(commands, "check_out", lambda *a, **k: None)  # now the OS refuses it, later
    err = _usage(capsys, ["train", *BASE, "--out", str(out)])
    assert err.startswith(f"mcwt train: error: --out {out}: not a directory (cannot create the run directory in ")


def test_an_os_refusal_to_read_a_flag_s_path_names_the_flag(tmp_path, capsys, monkeypatch):
    import mcwt_ext.data

    root = tmp_path / "cifar"
    (root / "cifar-10-batches-py").mkdir(parents=True)
    for name in (*mcwt_ext.data.CIFAR_TRAIN_BATCHES, mcwt_ext.data.CIFAR_TEST_BATCH):
        (root / "cifar-10-batches-py" / name).write_bytes(b"")

    def unreadable(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(mcwt_ext.data, "_read_cifar_batch", unreadable)
    err = _usage(capsys, ["train", "--arch", "conv2", "--dataset", "cifar10", "--data-root", str(root),
                          "--out", str(tmp_path / "run")])
    assert err.startswith(f"mcwt train: error: --data-root {root}: permission denied ({root}/cifar-10-batches-py/")


def test_an_interrupt_is_not_a_bug(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(commands, "train", _raising(Terminated("signal 15")))
    assert main(["train", *BASE, "--out", str(tmp_path / "run")]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err


def test_usage_errors_stay_the_exceptions_the_api_documents():
    assert issubclass(UsageError, ValueError)
    missing = MissingFileError("absent")
    assert isinstance(missing, FileNotFoundError) and isinstance(missing, UsageError) and str(missing) == "absent"
