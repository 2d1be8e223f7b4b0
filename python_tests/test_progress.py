"""Progress in logs: plain lines when stderr is not a terminal, silence with --quiet, and a
resumed run says where it resumes."""
import io
import re
import sys
import time

import pytest
from conftest import synthetic_model

import mcwt_ext.train
from mcwt_ext import progress
from mcwt_ext.cli import main
from mcwt_ext.progress import INTERVAL_ENV, Progress
from mcwt_ext.train import TrainConfig, train

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


def test_the_eta_leaves_evaluations_out(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress, "_now", lambda: now[0])
    stream = io.StringIO()
    bar = Progress(100, "train", stream=stream, interval=1e9)
    with bar.aside("evaluating"):  # the first evaluation: 1000 s
        now[0] += 1000
    for _ in range(10):  # 10 steps of 1 s: 90 more take 90 s
        now[0] += 1
        bar.update()
    assert bar.line() == "train: iteration 10/100, elapsed 16m50s, eta 1m30s"
    with bar.aside("evaluating"):
        now[0] += 500
        assert bar.line() == "train: iteration 10/100, elapsed 25m10s, eta 1m30s, evaluating"
    bar.close()


def test_the_last_line_is_printed_once():
    """The reproduce grid's last cell: its update, then close, printed 'cell 2/2' twice."""
    stream = io.StringIO()
    with Progress(2, "reproduce", noun="cell", stream=stream, interval=0) as bar:
        for cell in ("a", "b"):
            bar.set(last=cell)
            bar.update()
    lines = stream.getvalue().splitlines()
    assert [line.split(", elapsed")[0] for line in lines] == ["reproduce: cell 1/2, last a",
                                                              "reproduce: cell 2/2, last b"], lines


class _TimedStream(io.TextIOBase):
    """stderr off a terminal, noting when each line arrives."""

    def __init__(self):
        self.lines, self._part = [], ""

    def isatty(self):
        return False

    def write(self, text):
        self._part += text
        while "\n" in self._part:
            line, self._part = self._part.split("\n", 1)
            self.lines.append((time.monotonic(), line))
        return len(text)


def test_a_slow_evaluation_keeps_the_promise(synthetic, monkeypatch):
    """Evaluations of 5 intervals each: lines keep coming during them (heartbeats naming the
    evaluation), the ETA counts step time alone, and the closing line comes once."""
    interval = 0.3
    monkeypatch.setenv(INTERVAL_ENV, str(interval))
    stream = _TimedStream()
    monkeypatch.setattr(sys, "stderr", stream)
    real, evaluations = mcwt_ext.train.evaluate, []

    def slow(*args, **kwargs):  # record() evaluates twice (validation, test): 5 intervals in all
        start = time.monotonic()
        time.sleep(2.5 * interval)
        out = real(*args, **kwargs)
        evaluations.append((start, time.monotonic()))
        return out

    monkeypatch.setattr(mcwt_ext.train, "evaluate", slow)
    t0 = time.monotonic()
    train(synthetic_model(), synthetic, None, TrainConfig(iterations=6, lr=1e-3, eval_every=3), progress=True)
    lines = stream.lines
    print("\n".join(f"{t - t0:6.2f} {line}" for t, line in lines))
    assert lines and all(line.startswith("train: iteration ") for _, line in lines)

    # The gaps, from the first evaluation's start (the bar is open by then): a broken promise
    # leaves a whole evaluation (5 intervals) silent; a kept one an interval plus the heartbeat
    # thread's wake-up delay, which a loaded machine may stretch by up to another interval.
    times = [evaluations[0][0]] + [t for t, _ in lines]
    assert max(b - a for a, b in zip(times, times[1:])) <= 2 * interval, lines

    # The ETA: (time not spent evaluating) / steps done * steps left, rounded to whole seconds.
    # Counting the evaluations too would give at least 1.5 s at iteration 3 (one evaluation done).
    def not_evaluating(t):
        return (t - t0) - sum(max(0.0, min(b, t) - a) for a, b in evaluations)

    etas = [(t, int(m[1]), int(m[2])) for t, line in lines
            if (m := re.search(r"iteration (\d+)/6, .*eta (\d+)s", line))]
    assert any(done == 3 for _, done, _ in etas), lines  # heartbeats during the evaluation at 3
    for t, done, eta in etas:
        assert eta <= not_evaluating(t) / done * (6 - done) + 0.5, (t - t0, done, eta)
    assert any("evaluating" in line for _, line in lines)

    # The closing line, with the final values, once; no other line claims the end.
    last = lines[-1][1]
    assert re.fullmatch(r"train: iteration 6/6, val_acc [0-9.]+, val_loss [0-9.]+, elapsed \d+s", last), last
    assert [line for _, line in lines if "6/6" in line and "evaluating" not in line] == [last]
