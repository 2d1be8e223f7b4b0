"""Progress in logs: plain lines when stderr is not a terminal, silence with --quiet, and a
resumed run says where it resumes."""
import io
import re

import pytest

import mcwt_ext.train
from mcwt_ext.cli import main
from mcwt_ext.progress import INTERVAL_ENV, Progress

TRAIN = ["train", "--arch", "conv2", "--dataset", "synthetic", "--eval-every", "2"]
LINE = re.compile(r"^train conv2: iteration (\d+)/6(, val_acc [0-9.]+, val_loss [0-9.]+)?, "
                  r"elapsed \d+s(, eta \d+s)?$")


def test_log_lines_without_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(INTERVAL_ENV, "0")  # a line per step; the default is one per 30 s
    assert main([*TRAIN, "--iterations", "6", "--out", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().err.splitlines()
    print("\n".join(lines))  # what a log shows, e.g. "train conv2: iteration 3/6, val_acc ..."
    assert lines and all(LINE.match(line) for line in lines), lines
    iterations = [int(LINE.match(line)[1]) for line in lines]
    assert iterations[:6] == [1, 2, 3, 4, 5, 6]  # one per step, then the closing line
    assert "val_acc" in lines[-1] and "eta" in lines[2] and "eta" not in lines[-1]


def test_lines_are_spaced_by_the_interval():
    stream = io.StringIO()
    bar = Progress(1000, "work", stream=stream, interval=3600)
    for _ in range(1000):
        bar.update()
    bar.set(val_acc=0.5)
    bar.close()
    assert stream.getvalue().splitlines() == [stream.getvalue().strip()]  # only the closing line
    assert stream.getvalue().startswith("work: iteration 1000/1000, val_acc 0.5000, elapsed ")


def test_quiet_silences_progress(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    assert main([*TRAIN, "--iterations", "4", "--quiet", "--out", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().err == ""


def test_a_resumed_run_says_where_it_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = [*TRAIN, "--iterations", "6", "--checkpoint-every", "2", "--out", str(out)]
    real, steps = mcwt_ext.train._step, []

    def killed_at_five(*args):
        steps.append(1)
        if len(steps) == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(mcwt_ext.train, "_step", killed_at_five)
    assert main([*argv, "--quiet"]) == 130
    monkeypatch.setattr(mcwt_ext.train, "_step", real)
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"resuming {out} from iteration 4", err


@pytest.mark.parametrize("seconds,text", [(5, "5s"), (65, "1m05s"), (3725, "1h02m05s")])
def test_durations_read_like_a_clock(seconds, text):
    from mcwt_ext.progress import _duration

    assert _duration(seconds) == text
