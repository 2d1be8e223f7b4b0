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
from mcwt_ext.train import TrainConfig, evaluations_from, train

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


@pytest.fixture
def clock(monkeypatch):
    """A fake clock for the progress lines: ``clock.tick(s)`` moves it, no sleeping."""
    class Clock:
        now = 0.0

        def tick(self, seconds):
            self.now += seconds

    c = Clock()
    monkeypatch.setattr(progress, "_now", lambda: c.now)
    return c


def _seconds(text: str) -> int:
    """``_duration``'s text back to seconds."""
    h, m, s = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(\d+)s", text).groups()
    return 3600 * int(h or 0) + 60 * int(m or 0) + int(s)


def _eta(line: str) -> str | None:
    m = re.search(r", eta ([^,]+)", line)
    return m[1] if m else None


def _run(bar, clock, config, start, step_s, eval_s, lines):
    """train()'s schedule on the fake clock: a line after each step and halfway through each
    evaluation, as (elapsed seconds, the line)."""
    def evaluate():
        with bar.evaluating():
            clock.tick(eval_s / 2)
            lines.append((clock.now, bar.line()))
            clock.tick(eval_s / 2)

    if start == 0:
        evaluate()
    for it in range(start + 1, config.iterations + 1):
        clock.tick(step_s)
        bar.update()
        lines.append((clock.now, bar.line()))
        if it % config.eval_every == 0 or it == config.iterations:
            evaluate()
    bar.close()


def test_the_eta_counts_the_evaluations(clock):
    """Steps of 1 s and evaluations of 30 s (CIFAR: 0.28 s and 38 s): at every line, elapsed + eta
    is when the run ends, during an evaluation too, so the ETA falls as fast as the clock runs."""
    config = TrainConfig(iterations=100, lr=1e-3, eval_every=10)
    assert evaluations_from(0, config) == 11  # at 0, 10, ..., 100
    bar = Progress(100, "train", evaluations=evaluations_from(0, config), stream=io.StringIO(), interval=1e9)
    lines = []
    _run(bar, clock, config, 0, 1.0, 30.0, lines)
    end = 100 * 1.0 + 11 * 30.0
    assert clock.now == end
    assert lines[0] == (15.0, "train: iteration 0/100, elapsed 15s, evaluating")  # no step timed yet
    assert lines[1] == (31.0, "train: iteration 1/100, elapsed 31s, eta 6m39s")   # 99 s + 10 x 30 s
    timed = [(t, _seconds(_eta(line))) for t, line in lines[1:] if _eta(line) is not None]
    assert len(timed) == len(lines) - 1  # every line but the first
    assert all(t + eta == end for t, eta in timed), [(t, eta) for t, eta in timed if t + eta != end]
    assert lines[-1][1] == "train: iteration 100/100, elapsed 6m55s, eta 15s, evaluating"


def test_a_resumed_run_estimates_from_this_process_alone(clock):
    """Resumed at 4,636 of 5,000: the 4,636 steps done before count neither as done here nor in
    the rate; the evaluation left is named until one is timed, then counted at its cost."""
    config = TrainConfig(iterations=5000, lr=1e-3, eval_every=100)
    left = evaluations_from(4636, config)
    assert left == 4  # at 4700, 4800, 4900 and 5000
    clock.tick(1e6)  # the process ran a while before (loading data, ...): not in the rate either
    bar = Progress(5000, "train", initial=4636, evaluations=left, stream=io.StringIO(), interval=1e9)
    assert bar.line() == "train: iteration 4636/5000, elapsed 0s"  # nothing timed: no guess
    lines = []
    _run(bar, clock, config, 4636, 0.25, 38.0, lines)
    assert lines[0][1] == "train: iteration 4637/5000, elapsed 0s, eta 1m31s + 4 evaluations"  # 363 x 0.25 s
    before = [line for _, line in lines if line.startswith("train: iteration 4699/")]
    assert before == ["train: iteration 4699/5000, elapsed 16s, eta 1m15s + 4 evaluations"]
    first = [line for _, line in lines if "4700/5000" in line]  # its step, then halfway through it
    assert [_eta(line) for line in first] == ["1m15s + 4 evaluations", "1m15s + 4 evaluations"], first
    end = 364 * 0.25 + 4 * 38.0  # this process's steps and evaluations; once one is timed:
    timed = [(t - 1e6, _seconds(_eta(line))) for t, line in lines[65:]]
    assert timed[0][0] == 65 * 0.25 + 38 and lines[65][1].startswith("train: iteration 4701/5000")
    assert all(abs(t + eta - end) <= 0.5 for t, eta in timed), timed  # rounded to whole seconds


def test_evaluations_from_follows_the_schedule():
    for iterations, every in [(100, 10), (10, 4), (6, 3), (5, 7), (1, 1)]:
        config = TrainConfig(iterations=iterations, lr=1e-3, eval_every=every)
        for start in range(iterations + 1):
            schedule = [it for it in range(start + 1, iterations + 1) if it % every == 0 or it == iterations]
            assert evaluations_from(start, config) == len(schedule) + (start == 0), (iterations, every, start)


def test_a_pack_counts_its_nets_evaluations(clock):
    """A pack's evaluation of k nets counts k: 2 nets, steps of 1 s each, evaluations of 10 s per net."""
    bar = Progress(20, "pack", noun="net-step", evaluations=6, stream=io.StringIO(), interval=1e9)
    with bar.evaluating(2):  # both nets at 0
        clock.tick(20)
    clock.tick(2)
    bar.update(2)
    assert bar.line() == "pack: net-step 2/20, elapsed 22s, eta 58s"  # 18 net-steps + 4 x 10 s


def test_a_bar_with_nothing_to_do_stays_silent():
    """A grid whose cells are all done: no 'reproduce: cell 2/2' line for no work."""
    stream = io.StringIO()
    Progress(2, "reproduce", noun="cell", initial=2, stream=stream, interval=0).close()
    assert stream.getvalue() == ""


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
    evaluation), the ETA counts the evaluations left, and the closing line comes once."""
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

    # The ETA counts the evaluations ahead at their cost (one record(): two evaluate() calls, at
    # least 5 intervals) and the steps left at theirs; counting steps alone would say 0s.
    records = [(a[0], b[1]) for a, b in zip(evaluations[::2], evaluations[1::2])]
    shortest, longest = min(b - a for a, b in records), max(b - a for a, b in records)

    def not_evaluating(t):
        return (t - t0) - sum(max(0.0, min(b, t) - a) for a, b in records)

    etas = [(t, int(m[1]), _seconds(m[2])) for t, line in lines
            if (m := re.search(r"iteration (\d+)/6, .*eta ([0-9hms]+)", line))]
    assert any(done == 3 for _, done, _ in etas), lines  # heartbeats during the evaluation at 3
    for t, done, eta in etas:
        ahead = [r for r in records if r[0] > t]  # not begun at t
        unfinished = [r for r in records if r[1] > t]
        assert eta + 0.5 >= len(ahead) * shortest, (t - t0, done, eta)
        assert eta <= not_evaluating(t) / done * (6 - done) + len(unfinished) * longest + 0.5, (t - t0, done, eta)
    assert any("evaluating" in line for _, line in lines)

    # The closing line, with the final values, once; no other line claims the end.
    last = lines[-1][1]
    assert re.fullmatch(r"train: iteration 6/6, val_acc [0-9.]+, val_loss [0-9.]+, elapsed \d+s", last), last
    assert [line for _, line in lines if "6/6" in line and "evaluating" not in line] == [last]


class _Killed(Exception):
    pass


def test_the_bars_count_the_evaluations_the_trainings_run(synthetic, tmp_path, monkeypatch):
    """The evaluations train() and a pack announce to their bar (fresh, resumed, in stages) are
    the ones they run: none is left at the end, and each one is timed."""
    import shutil

    import mcwt_ext.lockstep as lockstep
    from mcwt_ext.lockstep import PackNet, train_pack
    from mcwt_ext.masks import random_masks

    closed, real_close = [], Progress.close

    def close(self):
        if self._log:
            closed.append((self.desc, self._evals_left, self._evals_done))
        real_close(self)

    monkeypatch.setattr(Progress, "close", close)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # the log lines, not --quiet

    def nets():  # evaluations at 0, 3, 6 and 7
        return [PackNet(synthetic_model(s), random_masks(synthetic_model(s), 0.8, seed=s),
                        TrainConfig(iterations=7, lr=1e-3, eval_every=3, checkpoint_every=2, seed=s),
                        tmp_path / f"net_{s}") for s in range(3)]

    real_step, steps = lockstep._Pack.step, []

    def dying(self, idx):
        steps.append(1)
        if len(steps) == 5:  # after the checkpoints at 4
            raise _Killed
        return real_step(self, idx)

    monkeypatch.setattr(lockstep._Pack, "step", dying)
    with pytest.raises(_Killed):
        train_pack(nets(), synthetic)
    monkeypatch.setattr(lockstep._Pack, "step", real_step)
    assert closed == [("pack", 3 * 2, 3 * 2)]  # killed with the evaluations at 6 and 7 left
    net = nets()[1]
    train(net.model, synthetic, net.masks, net.config, net.run_dir)  # net 1 resumes alone at 4
    shutil.rmtree(tmp_path / "net_2")  # net 2 starts over, a stage of its own until 4
    train_pack(nets(), synthetic)  # net 0 resumes at 4, net 1 is finished
    assert closed[1:] == [("train", 0, 2), ("pack", 0, 2 + 4)]
