"""`<run>/metrics.jsonl`: one JSON object per epoch, for scripts and experiment trackers that do
not read TensorBoard's event files (the job of Keras' `CSVLogger`)."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping
from typing import Any

from train_loop import files
from train_loop.errors import NoSpace
from train_loop.outputs.stderr import warn

METRICS_FILE = "metrics.jsonl"


class MetricsFile:
    """Appends a line at each epoch's end. Given no run folder (a worker that is not the chief),
    it writes nothing, as `Summaries` does."""

    def __init__(self, run_dir: str | None):
        self._path = None if run_dir is None else os.path.join(run_dir, METRICS_FILE)

    def append(self, record: Mapping[str, Any]) -> None:
        """One line, flushed before the checkpoint that follows: a run resumed from it has every
        epoch up to its step, and `drop_lines_after` removes those past it."""
        if self._path is None:
            return
        try:
            with open(self._path, "a", encoding="utf-8") as stream:
                stream.write(json.dumps(record) + "\n")
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            raise NoSpace(self._path) from None


def epoch_record(
    *,
    step: int,
    epoch: int,
    train: Mapping[str, float],
    validation: Mapping[str, float] | None,
    learning_rate: float,
    examples_per_second: float,
    wall_time: float,
) -> dict[str, Any]:
    """An epoch's line: flat keys (`train/accuracy`, `validation/cross_entropy`) that a data frame
    takes as columns; the validation ones only when the epoch's end was validated."""
    return {
        "step": step,
        "epoch": epoch,
        **{f"train/{name}": value for name, value in train.items()},
        **{f"validation/{name}": value for name, value in (validation or {}).items()},
        "learning_rate": learning_rate,
        "examples_per_second": examples_per_second,
        "wall_time": wall_time,
    }


def drop_lines_after(run_dir: str, step: int | None) -> None:
    """Cuts `<run>/metrics.jsonl` back to the epochs up to `step`, as `events.drop_events_after`
    does the event files: the resumed run writes the later epochs again. `step` None (a restart
    with no checkpoint) removes the file. A line cut short by a kill, or damaged, is dropped, said
    in one line."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return
    if step is None:
        os.remove(path)
        return
    with open(path, "rb") as stream:
        lines = stream.read().splitlines(keepends=True)
    records = [_parse(line) for line in lines]
    kept = [line for line, record in zip(lines, records) if record is not None and record["step"] <= step]
    damaged = records.count(None)
    if damaged:
        warn(f"{path}: dropped {damaged} damaged line(s); the intact ones are kept.")
    if len(kept) < len(lines):
        files.write_atomically(path, lambda temporary: _write_lines(temporary, kept))


def _parse(line: bytes) -> dict[str, Any] | None:
    """The line's object, or None when it is cut short (no newline), not JSON, or has no step."""
    try:
        record = json.loads(line) if line.endswith(b"\n") else None
    except ValueError:  # UnicodeDecodeError and JSONDecodeError alike.
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def _write_lines(path: str, lines: list[bytes]) -> None:
    with open(path, "wb") as stream:
        stream.writelines(lines)
