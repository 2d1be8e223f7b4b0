"""Runs made by an earlier main still resume as the same runs (issue 27: run identity).

``fixtures/runs_d4b0d5e`` holds the identities (every ``config.json``) of the run directories the
commands below wrote with main at d4b0d5e (2026-12-07). Each command is rerun here, as written, on
a copy of them: a change to the identity of any setting (a key added, renamed, or written at its
default where it was left out before) makes the command refuse the directory as another run's,
and this test fail. Weights are not kept (they would be MBs); the commands train from the start,
on the identity they find.
"""
import shutil
from pathlib import Path

import pytest

from mcwt_ext.cli import main

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "runs_d4b0d5e"

COMMON = ["--dataset", "digits", "--arch", "conv2", "--quiet"]
SHORT = ["--iterations", "4", "--eval-every", "2"]

#: fixture folder -> the command that made it (without --out)
COMMANDS = {
    "train": ["train", *COMMON, *SHORT],
    "imp": ["imp", *COMMON, *SHORT, "--rates", "conv=0.6,linear=0.6,output=0.6"],
    "random": ["random", *COMMON, *SHORT],
    "rigl": ["dst", *COMMON, *SHORT, "--method", "rigl"],
    "grid": ["reproduce", "--dataset", "digits", "--arch", "conv2", "--seeds", "1", *SHORT, "--no-progress"],
}


def _copy_identities(name: str, dest: Path) -> int:
    """Copy fixture ``name``'s config files into ``dest``; how many."""
    files = sorted((FIXTURE / name).rglob("config.json"))
    for f in files:
        target = dest / f.relative_to(FIXTURE / name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    return len(files)


def test_every_fixture_has_its_command():
    assert sorted(p.name for p in FIXTURE.iterdir()) == sorted(COMMANDS)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "grid" else n
                                  for n in COMMANDS])
def test_a_run_made_by_an_earlier_main_resumes_as_the_same_run(name, tmp_path, capsys):
    out = tmp_path / name
    assert _copy_identities(name, out) >= 1
    before = {f: f.read_text() for f in out.rglob("config.json")}
    code = main([*COMMANDS[name], "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "belongs to another run" not in err
    # the identity it found is the one it kept: not rewritten with other keys
    assert {f: f.read_text() for f in before} == before
