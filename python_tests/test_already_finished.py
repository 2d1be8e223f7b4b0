"""A rerun of a finished command says so on its first line (issue 25): ``mcwt CMD: --out X already
finished; its summary:`` on stderr, before any other line on either stream (a terminal shows them
interleaved), then the first run's output again without redoing the work. Every command that writes
a run or grid directory; ``fit`` (a file) and ``plot`` (a folder of figures) write theirs anew."""
import io
import re
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from mcwt_ext.cli import main
from mcwt_ext.progress import INTERVAL_ENV

COMMON = ["--arch", "conv2", "--dataset", "digits", "--seed", "0"]
SHORT = ["--iterations", "2", "--eval-every", "1"]


def _commands(root: Path) -> dict[str, list[str]]:
    """Each command's argv (--out last), in an order where each finds the runs it reads."""
    runs = {
        "train": ["train", *COMMON, *SHORT],
        "imp": ["imp", *COMMON, *SHORT, "--rates", "conv=0.6,linear=0.6,output=0.6"],
        "random": ["random", *COMMON, *SHORT, "--sparsity", "0.5"],
        "random --no-train": ["random", *COMMON, *SHORT, "--sparsity", "0.5", "--no-train"],
        "prune": ["prune", "--method", "magnitude", *COMMON, *SHORT, "--sparsity", "0.5"],
        "prune --no-train": ["prune", "--method", "snip", *COMMON, *SHORT, "--sparsity", "0.5", "--no-train"],
        "dst": ["dst", "--method", "set", *COMMON, *SHORT, "--sparsity", "0.5"],
        "ablate": ["ablate", "--ticket", str(root / "imp"), "--kind", "shuffle-mask", *SHORT],
        "sample": ["sample", *COMMON, "--fit", str(root / "fit.json")],
        "reproduce": ["reproduce", "--dataset", "digits", "--seeds", "1", *SHORT, "--methods", "random"],
    }
    return {name: [*argv, "--out", str(root / name.replace(" --", "_"))] for name, argv in runs.items()}


class _Stream(io.StringIO):
    """stdout or stderr off a terminal, also writing into the ``log`` both streams share."""

    def __init__(self, log: list):
        super().__init__()
        self.log = log

    def write(self, text):
        self.log.append(text)
        return super().write(text)


def _run(argv) -> tuple[str, str, str]:
    """main(argv)'s stdout, stderr, and both as a terminal shows them."""
    log = []
    out, err = _Stream(log), _Stream(log)
    with redirect_stdout(out), redirect_stderr(err):
        assert main(argv) == 0, "".join(log)
    return out.getvalue(), err.getvalue(), "".join(log)


def _same(stdout: str) -> str:
    """stdout without what a rerun may measure anew (prune's time for its masks)."""
    return re.sub(r"masks in [0-9.]+ s", "masks in ... s", stdout)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Every command run once (quietly) to its end: root -> its stdout per command."""
    root = tmp_path_factory.mktemp("finished")
    firsts = {}
    for name, argv in _commands(root).items():
        firsts[name], err, _ = _run([*argv, "--quiet"])
        assert "already finished" not in err, (name, err)
        if name == "imp":
            _run(["fit", "--ticket", str(root / "imp"), "--out", str(root / "fit.json")])
    return root, firsts


@pytest.mark.parametrize("name", list(_commands(Path("."))))
def test_a_finished_command_says_so_on_its_first_line(finished, name, monkeypatch):
    root, firsts = finished
    monkeypatch.setenv(INTERVAL_ENV, "0")  # not --quiet, and a progress line for every step
    argv = _commands(root)[name]
    stdout, stderr, both = _run(argv)
    said = f"mcwt {argv[0]}: --out {argv[-1]} already finished; its summary:"
    assert both.splitlines()[0] == said, both
    assert stderr.splitlines() == [said], stderr  # nothing trained, sampled or evaluated again
    assert _same(stdout) == _same(firsts[name])  # the first run's report
