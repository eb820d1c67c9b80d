"""Progress that reaches a log: the rate limiting of :class:`ifutils.progress.LogBar` on a fake clock, and the
training notebook run by papermill with ``log_output=True`` (as ``scripts/main.sh`` runs it) logging its epoch bar."""

import io
import logging
import re

import papermill
import pytest

from ifutils.progress import LogBar, log_lines, progress

# tqdm's meter: "desc:  40%|####      | 40/100 [00:40<01:00,  1.00it/s...]"
METER = re.compile(r"^(?P<desc>.+?): +(?P<pct>\d+)%\|[# 0-9]*\| (?P<n>\d+)/(?P<total>\d+) "
                   r"\[(?P<elapsed>\d\d:\d\d)<(?P<left>\d\d:\d\d|\?)")


class FakeClock:
    """Seconds that advance only when the test says so."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _seconds(mmss: str) -> int:
    minutes, seconds = mmss.split(":")
    return 60 * int(minutes) + int(seconds)


@pytest.mark.parametrize("interval, step", [(10.0, 1.0), (30.0, 0.5), (5.0, 7.0)])
def test_lines_are_rate_limited_and_estimate_the_time_left(interval, step):
    clock, out, total = FakeClock(), io.StringIO(), 120
    bar = LogBar(range(total), desc="epoch 1/1", unit="it", interval=interval, stream=out, clock=clock, leave=False)
    for i in bar:
        clock.t += step  # each iteration takes ``step`` seconds
        bar.set_postfix(loss=f"{i:.1f}", refresh=True)  # a refresh per step must not bypass the limit
    lines = out.getvalue().splitlines()
    meters = [METER.match(line) for line in lines]
    assert all(meters), lines
    elapsed = [_seconds(m["elapsed"]) for m in meters]
    # brute force: a line at most every max(interval, step) seconds, none in the first interval, plus the final one
    duration = total * step
    assert len(lines) <= duration // interval + 2
    assert elapsed[0] >= interval
    assert all(b - a >= min(interval, step) * 0.999 for a, b in zip(elapsed[:-2], elapsed[1:-1]))
    assert all(b - a <= max(interval, step) + 1 for a, b in zip(elapsed[:-1], elapsed[1:]))
    final = meters[-1]
    assert (int(final["n"]), int(final["total"])) == (total, total) and _seconds(final["elapsed"]) == int(duration)
    for m in meters[:-1]:  # at a constant rate the time left is (total - n) * step, to tqdm's rounding to 1 s
        n = int(m["n"])
        assert m["left"] != "?" and abs(_seconds(m["left"]) - (total - n) * step) <= 1.0, m.group(0)
        assert m["desc"] == "epoch 1/1" and abs(int(m["pct"]) - 100 * n / total) <= 0.5


def test_a_bar_shorter_than_the_interval_prints_nothing():
    clock, out = FakeClock(), io.StringIO()
    for _ in LogBar(range(50), desc="inner", interval=10.0, stream=out, clock=clock, leave=False):
        clock.t += 0.1  # 5 s in all
    assert out.getvalue() == ""
    bar = LogBar(total=4, desc="manual", interval=0.0, stream=out, clock=clock)
    for _ in range(4):
        clock.t += 1.0
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert [METER.match(line)["n"] for line in lines] == ["0", "1", "2", "3", "4"]  # interval 0: every update
    assert "\r" not in out.getvalue()


def test_mode_follows_the_environment(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("IFUTILS_PROGRESS", "lines")
    assert log_lines(Tty()) and isinstance(progress(range(3)), LogBar)
    monkeypatch.setenv("IFUTILS_PROGRESS", "bar")
    assert not log_lines(io.StringIO()) and not isinstance(progress(range(3)), LogBar)
    monkeypatch.setenv("IFUTILS_PROGRESS", "auto")
    assert log_lines(io.StringIO())  # not a terminal: lines
    monkeypatch.setenv("IFUTILS_PROGRESS", "sometimes")
    with pytest.raises(ValueError, match="IFUTILS_PROGRESS"):
        log_lines()
    monkeypatch.setenv("IFUTILS_PROGRESS", "lines")
    monkeypatch.setenv("IFUTILS_PROGRESS_INTERVAL", "-3")
    with pytest.raises(ValueError, match="IFUTILS_PROGRESS_INTERVAL"):
        progress(range(3))
    with pytest.raises(ValueError, match="interval"):
        LogBar(range(3), interval=-1.0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_training_notebook_logs_its_epoch_progress(tmp_path, monkeypatch, caplog):
    """The notebook as scripts/main.sh runs it (papermill, log_output=True): the epoch bar reaches the log."""
    monkeypatch.setenv("IFUTILS_PROGRESS", "auto")  # the kernel must detect that it has no terminal
    monkeypatch.setenv("IFUTILS_PROGRESS_INTERVAL", "0")  # an epoch of 200 sentences is far under 15 s
    caplog.set_level(logging.INFO, logger="papermill")
    papermill.execute_notebook(
        "train_lstm_penn_treebank.ipynb", str(tmp_path / "train.ipynb"), progress_bar=False, log_output=True,
        parameters={"dataset": "ptb", "emb_dim": 8, "hidden": 8, "epochs": 1, "max_train_sentences": 200,
                    "checkpoint": str(tmp_path / "lstm.pt"), "results_file": str(tmp_path / "results.json"),
                    "figures_dir": str(tmp_path / "figures"), "device": "cpu"},
    )
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "papermill")
    meters = [m for m in map(METER.match, logged.splitlines()) if m and m["desc"] == "epoch 1/1"]
    assert meters, logged[-3000:]
    total = int(meters[0]["total"])
    assert total == -(-200 // 32)  # batches of batch_size=32 (the notebook's default) over 200 sentences
    assert [int(m["n"]) for m in meters][-1] == total and any(m["left"] != "?" for m in meters)
    assert "epoch 1: train loss" in logged  # the epoch summary line
