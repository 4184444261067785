"""The console's lines, shape by shape: the bar on a terminal (a real pseudo-terminal for real runs)
has no rate before one is measured, shows the epoch line's names and numbers and agrees with it at
the epoch's end; whatever is printed after it starts a line; off a terminal an epoch is one line."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shlex
import signal
import struct
import subprocess
import sys
import termios
import time
import tty

import pytest
from conftest import REPO

from train_loop.errors import DivergedError
from train_loop.training.console import Console

MEASURES = {"cross_entropy": 0.5, "regularization": 0.25, "total": 0.75, "accuracy": 0.875}
NUMBER = r"-?\d+\.\d{4}"
TRAIN = rf"train cross_entropy ({NUMBER}) regularization ({NUMBER}) total ({NUMBER}) accuracy ({NUMBER})"
# A frame of the bar, drawn over the previous one (`\r`): the time left only once a rate is measured.
FRAME = re.compile(rf"step +(\d+)/(\d+) \[(=*)(\.*)\]( eta \d+:\d\d)? \| {TRAIN} *")
EPOCH_LINE = re.compile(
    rf"epoch (\d+)/(\d+): {TRAIN} \| validation cross_entropy {NUMBER} accuracy {NUMBER} \| [\d,]+ examples/s *"
)
DIGITS_STEPS = (1437 - round(0.1 * 1437)) // 32  # digits' training examples less the validation split, batch 32.


class Clock:
    """Time passed in by the test, for the rate and the time left."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_first_frame_has_no_rate_and_the_next_ones_the_measured_time_left(capsys):
    clock = Clock()
    console = Console(steps_per_epoch=40, num_epochs=1, interactive=True, clock=clock)
    console.progress(4, MEASURES)
    clock.now += 2.0  # 4 steps in 2 s: 0.5 s a step, 16 s for the 32 left.
    console.progress(8, MEASURES)
    clock.now += 30.0  # Since the first frame: 32 steps in 32 s, 1 s a step.
    console.progress(36, MEASURES)
    frames = capsys.readouterr().out.split("\r")
    assert frames[0] == ""
    train = "train cross_entropy 0.5000 regularization 0.2500 total 0.7500 accuracy 0.8750"
    assert [frame.rstrip() for frame in frames[1:]] == [
        f"step  4/40 [==..................] | {train}",
        f"step  8/40 [====................] eta 0:16 | {train}",
        f"step 36/40 [==================..] eta 0:04 | {train}",
    ]


def test_the_epoch_line_replaces_the_bar_and_what_follows_starts_a_line(capsys):
    console = Console(steps_per_epoch=10, num_epochs=2, interactive=True, clock=Clock())
    console.begin_epoch(0)
    console.progress(10, MEASURES)
    console.epoch_done(1, MEASURES, None, 1234.5)
    console.begin_epoch(10)
    console.progress(15, MEASURES)
    console.show("stopping early at step 15: ...")
    out = capsys.readouterr().out
    lines = out.split("\n")
    assert lines[0] == "Epoch 1/2"
    frame, epoch_line = lines[1].split("\r")[1:]
    assert frame.startswith("step 10/10 [====================] | ")
    assert epoch_line.rstrip() == (
        "epoch 1/2: train cross_entropy 0.5000 regularization 0.2500 total 0.7500 accuracy 0.8750 | 1,234 examples/s"
    )
    assert lines[2] == "Epoch 2/2"
    assert lines[3].startswith("\rstep  5/10 [==========..........] eta 0:00 | train ")  # The clock stood still.
    assert lines[4:] == ["stopping early at step 15: ...", ""]


def test_leaving_with_console_by_an_error_ends_the_bars_line(capsys):
    console = Console(steps_per_epoch=10, num_epochs=1, interactive=True)
    with pytest.raises(DivergedError), console:
        console.progress(5, MEASURES)
        raise DivergedError("training diverged: ...")
    assert re.fullmatch(rf"\r{FRAME.pattern}\n", capsys.readouterr().out)
    with console:  # No bar on the line: nothing to end.
        pass
    assert capsys.readouterr().out == ""


def test_off_a_terminal_an_epoch_is_one_line(capsys):
    console = Console(steps_per_epoch=10, num_epochs=1, interactive=False)
    console.begin_epoch(0)
    for step in range(1, 11):
        console.progress(step, MEASURES)
    with console:
        console.epoch_done(1, MEASURES, {"cross_entropy": 0.4, "accuracy": 0.9}, 1234.5)
    assert capsys.readouterr().out == (
        "Epoch 1/1\n"
        "epoch 1/1: train cross_entropy 0.5000 regularization 0.2500 total 0.7500 accuracy 0.8750 | "
        "validation cross_entropy 0.4000 accuracy 0.9000 | 1,234 examples/s\n"
    )


def test_on_a_narrow_terminal_a_frame_is_cut_to_its_width_and_the_epoch_line_is_not(monkeypatch):
    """A frame that wrapped would leave its first rows behind at each redraw (`\\r` goes back one row)."""
    leader, follower = pty.openpty()
    tty.setraw(follower)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))
    with open(follower, "w") as terminal:
        monkeypatch.setattr(sys, "stdout", terminal)
        console = Console(steps_per_epoch=10, num_epochs=1)  # Tells a terminal by itself.
        console.progress(10, MEASURES)
        console.epoch_done(1, MEASURES, None, 1234.5)
        monkeypatch.undo()
        written = b""
        while select.select([leader], [], [], 0)[0]:  # While the terminal is open: after, a read fails.
            written += os.read(leader, 65536)
    os.close(leader)
    frame, epoch_line = written.decode().split("\r")[1:]
    assert frame == "step 10/10 [====================] | train cross_entropy 0.5" and len(frame) == 60 - 1
    assert epoch_line.startswith("epoch 1/1: train cross_entropy 0.5000 ") and epoch_line.endswith(" examples/s\n")


def run_on_a_terminal(*flags: str, signal_at: bytes | None = None, timeout: float = 300) -> tuple[int, str]:
    """Runs `python -m train_loop` with stdout and stderr on one pseudo-terminal, as in a shell,
    and returns its status and everything it wrote; with `signal_at`, sends SIGTERM once that appears."""
    leader, follower = pty.openpty()
    tty.setraw(follower)  # Newlines as written, not turned into "\r\n".
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 500, 0, 0))  # Wide: no frame is cut.
    process = subprocess.Popen(
        [sys.executable, "-m", "train_loop", *flags],
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        cwd=REPO,
        env=os.environ,
    )
    os.close(follower)
    written, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([leader], [], [], 1.0)[0]:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the last writer closed the terminal.
                    break
                written += chunk
                if signal_at and signal_at in written:
                    process.send_signal(signal.SIGTERM)
                    signal_at = None
        return process.wait(timeout=60), written.decode()
    finally:
        process.kill()
        os.close(leader)


@pytest.mark.slow
def test_on_a_terminal_the_bar_agrees_with_each_epochs_line(tmp_path):
    code, written = run_on_a_terminal(
        "--dataset=digits", "--epochs=2", "--summary_every=10", f"--logdir={tmp_path}", "--run_name=r"
    )
    assert code == 0, written
    assert "us/step" not in written and "\x1b" not in written  # No Keras bar, no colour codes.
    lines = written.split("\n")
    epochs = [index for index, line in enumerate(lines) if line.startswith("Epoch ")]
    assert [lines[index] for index in epochs] == ["Epoch 1/2", "Epoch 2/2"]
    for epoch, index in enumerate(epochs, start=1):
        # The epoch's frames and then its line, over them, all on the line after its header.
        empty, *frames, epoch_line = lines[index + 1].split("\r")
        assert empty == ""
        matches = [FRAME.fullmatch(frame) for frame in frames]
        assert all(matches), frames
        assert [int(match[1]) for match in matches] == list(range(10, DIGITS_STEPS + 1, 10))
        assert {int(match[2]) for match in matches} == {DIGITS_STEPS}
        assert all(len(match[3]) + len(match[4]) == 20 for match in matches)
        assert [match[5] is None for match in matches] == [epoch == 1] + [False] * (len(matches) - 2) + [True], (
            "the time left: not on the process's first frame (no rate yet), nor on an epoch's last"
        )
        line = EPOCH_LINE.fullmatch(epoch_line)
        assert line and (int(line[1]), int(line[2])) == (epoch, 2), epoch_line
        assert matches[-1].groups()[5:] == line.groups()[2:6], "the last frame's train numbers are the line's"
    assert lines[-2].startswith("saved ") and lines[-1] == ""


@pytest.mark.slow
def test_a_stop_message_starts_a_line_of_its_own(tmp_path):
    """SIGTERM while the bar is drawn: the stop's line (stderr, the same terminal) is not glued to it."""
    code, written = run_on_a_terminal(
        "--dataset=digits",
        "--epochs=30",
        "--batch_size=8",  # 161 steps an epoch: the stop comes mid-epoch, with the bar on the line.
        "--summary_every=5",
        f"--logdir={tmp_path}",
        "--run_name=r",
        signal_at=b"\rstep  15/161 ",
    )
    assert code == 128 + signal.SIGTERM, written
    assert written.endswith("\n")
    before, stop = written[:-1].rsplit("\n", 1)
    assert re.fullmatch(r"train_loop: stopped by SIGTERM at step \d+ with a checkpoint; [^\r]*", stop), written
    assert FRAME.fullmatch(before.rsplit("\r", 1)[1]), "the bar was on the line, and ended"


@pytest.mark.slow
def test_off_a_terminal_each_line_is_whole(run_cli, tmp_path):
    """A pipe: no carriage return, no progress line; each epoch is its header and its one line; the
    last line says where the model and result are, and how to look at the run."""
    finished = run_cli("--dataset=digits", "--epochs=2", "--summary_every=10", "--run_name=r")
    assert finished.returncode == 0, finished.stderr
    assert "\r" not in finished.stdout
    lines = finished.stdout.splitlines()
    start = lines.index("Epoch 1/2")
    assert lines[start + 2] == "Epoch 2/2"
    for line, epoch in ((lines[start + 1], 1), (lines[start + 3], 2)):
        match = EPOCH_LINE.fullmatch(line)
        assert match and (int(match[1]), int(match[2])) == (epoch, 2), line
    assert re.fullmatch(r"test cross_entropy \d\.\d{4} accuracy \d\.\d{4}", lines[start + 4])
    run_dir, logdir = tmp_path / "logs" / "r", tmp_path / "logs"
    assert lines[start + 5 :] == [
        f"saved {run_dir}/model.keras and {run_dir}/result.json; "
        f"to look at it: tensorboard --logdir {shlex.quote(str(logdir))}"
    ]
