"""Shared by the tests: NumPy recomputations and readers of the event files a run wrote."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import keras
import numpy as np
from conftest import REPO
from tensorboard.backend.event_processing import event_accumulator

from train_loop import Config
from train_loop.model import models


def numpy_regularization(model: keras.Model, config: Config) -> float:
    """λ·Σw² and λ·Σ|w| over kernels and biases, recomputed from the weights in NumPy."""
    total = 0.0
    for _, layer in models.weighted_layers(model):
        kernel, bias = (np.asarray(weights, np.float64) for weights in layer.get_weights())
        total += config.l1 * np.abs(kernel).sum() + config.l2 * np.square(kernel).sum()
        total += config.bias_l1 * np.abs(bias).sum() + config.bias_l2 * np.square(bias).sum()
    return total


def events(run_dir: str, writer: str) -> event_accumulator.EventAccumulator:
    accumulator = event_accumulator.EventAccumulator(
        os.path.join(run_dir, writer), size_guidance={event_accumulator.TENSORS: 0}
    )
    return accumulator.Reload()


def snapshot(root: Path, *, folder_times: bool = True) -> dict[str, tuple]:
    """Every entry under `root`: its mode (kind included), modification time and, for files, bytes.

    Without `folder_times`, folders' modification times are left out: a process that took a run
    folder's lock (a file made, then removed) changes its folder's time and nothing else.
    """
    entries = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        content = path.read_bytes() if path.is_file() else None
        kept_time = folder_times or not path.is_dir() or path.is_symlink()
        entries[str(path.relative_to(root))] = (info.st_mode, info.st_mtime_ns if kept_time else None, content)
    return entries


def assert_one_line_error(result: subprocess.CompletedProcess, names: tuple[str, ...]) -> None:
    """Exit status 2 and exactly one `train_loop: error:` line naming the culprit; no traceback."""
    report = f"status {result.returncode}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 2, report
    assert "Traceback" not in result.stderr, report
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), report
    assert lines[0].startswith("train_loop: error: "), report
    for name in names:
        assert name in lines[0], f"{name!r} missing from: {lines[0]}"
    assert result.stdout == "", report


def sigkill_after_first_checkpoint(
    process: subprocess.Popen, run_dir: Path, delay: float, *, pids: Callable[[], Iterable[int]] | None = None
) -> None:
    """SIGKILLs the running `process` `delay` seconds after `run_dir` holds its first checkpoint
    (waited for at most 120 s), and reaps it: the "SIGKILL at a random moment" of the resume tests.
    With `pids`, the processes it gives are killed instead (a launcher's workers), all at once."""
    index = run_dir / "checkpoints" / "checkpoint"
    deadline = time.monotonic() + 120
    while not index.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    for pid in pids() if pids else [process.pid]:
        os.kill(pid, signal.SIGKILL)
    process.communicate(timeout=60)


def sigkill_at_a_seeded_moment(
    process: subprocess.Popen, run_dir: Path, *, training_seconds: float, seed: str
) -> float:
    """SIGKILLs `process` within the first half of `training_seconds` (an uninterrupted run's training
    time, so however fast this CPU) after its first checkpoint, at a share seeded by `seed`, so that
    a failing case can be run again at the same moment; asserts it died unfinished. Returns the
    delay, in seconds after the first checkpoint, for the caller's messages."""
    share = random.Random(zlib.crc32(seed.encode())).uniform(0.0, 0.5)
    delay = share * training_seconds
    sigkill_after_first_checkpoint(process, run_dir, delay)
    assert process.returncode == -signal.SIGKILL and not (run_dir / "result.json").exists(), (
        f"the run ended before the kill {delay:.2f} s ({share:.3f} of the training time) after its first checkpoint"
    )
    return delay


def kill_at_first_checkpoint(command: list[str], run_dir: Path, env: dict | None = None) -> None:
    """Starts `command` and SIGKILLs it as soon as `run_dir` holds a checkpoint, before it finishes."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    index = run_dir / "checkpoints" / "checkpoint"
    deadline = time.monotonic() + 120
    while not index.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not (run_dir / "result.json").exists(), "the run finished before it could be interrupted"


def run_example(command: list[str], *, quiet: bool = True) -> subprocess.CompletedProcess:
    """An example run as CI runs it, from the repository root with this interpreter as `$PYTHON`;
    asserts it succeeded and, when `quiet` (its every process is one of the tools), that TensorFlow
    started as the tools start it: none of its start-up lines (`E0000 ... cuInit` without a GPU)."""
    finished = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable}
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    if quiet:
        assert not re.search(r"cuInit|^[IWE]\d{4} ", finished.stderr, re.MULTILINE), finished.stderr[-3000:]
    return finished


def peak_rss(log: Path, *flags: str) -> int:
    """The peak resident memory of a training process, in bytes; its stderr goes to `log`."""
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "train_loop", *flags], cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr
        )
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, log.read_text()[-3000:]
    return usage.ru_maxrss * 1024
