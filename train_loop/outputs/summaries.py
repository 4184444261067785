"""TensorBoard's writers for a run: scalars, histograms, evaluations with their confusion matrix,
the HParams summary and the settings as text. (Reading the files back and cutting them back on
resume is `events`; the logdir's HParams experiment is `experiment`.)"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.custom_scalar import summary as custom_scalar_summary
from tensorboard.plugins.hparams import api as hparams_api
from tensorboard.plugins.scalar import summary_v2 as scalar_summary

from train_loop.model.measurements import CLASSIFIER, Table
from train_loop.outputs import runs
from train_loop.outputs.custom_scalars import scalars_layout
from train_loop.outputs.stderr import quiet_stderr

# The settings writer writes into the run's own folder, which TensorBoard then lists as a run of
# its own with no scalars. It cannot go elsewhere: TensorBoard's HParams plugin pairs a session
# with the scalars of the runs *under* the session's folder (the metric's group is their path
# from it, `backend_context._compute_metric_names`), so a session in `train/` would lose the
# validation and test metrics, and one per writer would make three sessions of one run.
WRITERS = (*runs.EVENT_DIRS, "settings")


class Summaries:
    """Writers for `<run>/train`, `<run>/validation` and `<run>/test`, and the run's root for its
    settings.

    Given no run folder (a worker that is not the chief), it writes nothing, so callers need no
    special case.
    """

    def __init__(self, run_dir: str | None, *, class_names: Sequence[str] = ()):
        self._class_names = tuple(class_names)  # Empty: the labels are named by their index.
        self._writers: dict[str, Any] = {}
        self._run_dir = run_dir
        self.reopen()

    def reopen(self) -> None:
        """Opens the writers, each on a new file: at the start, and after `close` once the files
        were cut back (`RunOutputs.rewind`)."""
        if self._run_dir is not None:
            # A writer that cannot write its first record (a full disk) raises, and TensorFlow's
            # kernel logs the same failure: the caller reports it in one line.
            with quiet_stderr():
                for name in WRITERS:
                    self._writers[name] = tf.summary.create_file_writer(writer_dir(self._run_dir, name))

    def write_scalars(self, writer: str, step: int, scalars: Mapping[str, float]) -> None:
        """All of `scalars` in one record, each value as `tf.summary.scalar` writes it: one eager
        op instead of one per tag (measured: 0.2 ms instead of 5 ms for 12 tags)."""
        if writer in self._writers:
            values = [value for tag, scalar in scalars.items() for value in scalar_summary.scalar_pb(tag, scalar).value]
            with self._writers[writer].as_default(step=step):
                tf.summary.experimental.write_raw_pb(summary_pb2.Summary(value=values).SerializeToString())

    def write_histograms(self, step: int, histograms: Mapping[str, np.ndarray]) -> None:
        if "train" in self._writers:
            with self._writers["train"].as_default(step=step):
                for tag, values in histograms.items():
                    tf.summary.histogram(tag, values)

    def write_evaluation(self, writer: str, step: int, scalars: Mapping[str, float], counts: np.ndarray | None) -> None:
        """An evaluation of the `validation` or `test` split: its scalars, by the train writer's
        tags so TensorBoard draws them together, and a classifier's confusion matrix (`counts`)."""
        self.write_scalars(writer, step, scalars)
        if counts is not None:
            self._write_confusion_matrix(writer, step, counts)

    def _write_confusion_matrix(self, writer: str, step: int, counts: np.ndarray) -> None:
        """A confusion matrix on the `writer` given: an image (`confusion_matrix`) and its counts as a
        table with the class names (`confusion_matrix_counts`), which the image cannot show."""
        if writer in self._writers:
            names = self._class_names or tuple(str(label) for label in range(len(counts)))
            order = ", ".join(f"{label} {name}" for label, name in enumerate(self._class_names)) or "by label"
            with self._writers[writer].as_default(step=step):
                tf.summary.image(
                    "confusion_matrix",
                    confusion_image(counts),
                    description=f"Rows: true label, numbered on the left; columns: predicted label, "
                    f"numbered along the top ({order}); shade: share of the row (white 0, dark blue 1).",
                )
                tf.summary.text(
                    "confusion_matrix_counts",
                    confusion_table(counts, names),
                    description="Examples by true label (rows) and predicted label (columns).",
                )

    def write_settings(self, run_name: str, settings: Mapping[str, Any], table: Table = CLASSIFIER) -> None:
        """The settings as an HParams session (compared across runs) and as a text table, and the
        Custom Scalars dashboard's layout (every run holds the same one: TensorBoard merges them)."""
        if "settings" in self._writers:
            with self._writers["settings"].as_default(step=0):
                hparams_api.hparams(dict(settings), trial_id=run_name)
                tf.summary.experimental.write_raw_pb(
                    custom_scalar_summary.pb(scalars_layout(table)).SerializeToString()
                )
                rows = "\n".join(f"| {key} | {value} |" for key, value in settings.items())
                tf.summary.text("settings", f"| setting | value |\n|---|---|\n{rows}")

    @contextlib.contextmanager
    def as_default(self, writer: str, step: int) -> Iterator[None]:
        """`writer` as TensorFlow's default summary writer at `step`, so that code of a user's
        writes to it with `tf.summary` alone; without writers (not the chief), none, and
        `tf.summary` writes nothing."""
        if writer not in self._writers:
            yield
            return
        with self._writers[writer].as_default(step=step):
            yield

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()


def writer_dir(run_dir: str, name: str) -> str:
    return run_dir if name == "settings" else os.path.join(run_dir, name)


CELL_PIXELS = 16
_EMPTY, _FULL = (1.0, 1.0, 1.0), (0.03, 0.19, 0.42)  # RGB of a share of 0 and of 1.
_INK = (0.2, 0.2, 0.2)  # The labels' RGB.
# A 3x5 pixel font of the ten digits, a row of three pixels per group ("1": drawn): enough to
# number the rows and columns without a plotting library in training.
_DIGITS = tuple(
    np.array([[pixel == "1" for pixel in row] for row in glyph.split()])
    for glyph in (
        "111 101 101 101 111",
        "010 110 010 010 111",
        "111 001 111 100 111",
        "111 001 111 001 111",
        "101 101 111 001 001",
        "111 100 111 001 111",
        "111 100 111 101 111",
        "111 001 001 001 001",
        "111 101 111 101 111",
        "111 101 111 001 111",
    )
)


def confusion_image(counts: np.ndarray) -> np.ndarray:
    """A [1, H, W, 3] uint8 image of a confusion matrix: a cell of `CELL_PIXELS` square per count,
    below a row of the predicted labels' indices and right of a column of the true labels'.

    Each cell's shade is its share of its row (the true label's examples), so a class with few
    examples shows its mistakes as clearly as a common one; a perfect model is a dark diagonal.
    The class names are in the image's description and in the counts table.
    """
    counts = np.asarray(counts, np.float64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    colors = np.array(_EMPTY) + shares[..., np.newaxis] * (np.array(_FULL) - np.array(_EMPTY))
    size = (len(counts) + 1) * CELL_PIXELS
    pixels = np.ones((size, size, 3))
    pixels[CELL_PIXELS:, CELL_PIXELS:] = np.repeat(np.repeat(colors, CELL_PIXELS, axis=0), CELL_PIXELS, axis=1)
    for label in range(len(counts)):
        ink = _label_pixels(label)
        offset = CELL_PIXELS * (label + 1)
        for top, left in ((0, offset), (offset, 0)):  # Above its column, left of its row.
            cell = pixels[top : top + CELL_PIXELS, left : left + CELL_PIXELS]
            cell[_centred(ink)] = _INK
    return np.round(pixels * 255.0).astype(np.uint8)[np.newaxis]


def _label_pixels(label: int) -> np.ndarray:
    """`label`'s digits in the 3x5 font, a column of space between them, scaled by 2 where two
    digits still fit in a cell."""
    text = str(label)
    glyphs = [_DIGITS[int(digit)] for digit in text]
    spaced = [part for glyph in glyphs for part in (glyph, np.zeros((5, 1), bool))][:-1]
    ink = np.concatenate(spaced, axis=1)
    scale = 2 if 2 * ink.shape[1] <= CELL_PIXELS - 2 else 1
    return np.repeat(np.repeat(ink, scale, axis=0), scale, axis=1)


def _centred(ink: np.ndarray) -> np.ndarray:
    """`ink` in the middle of a blank cell, as a mask of the cell's pixels (cut to the cell: a
    label of five digits or more loses its sides)."""
    mask = np.zeros((CELL_PIXELS, CELL_PIXELS), bool)
    top, left = (max((size - CELL_PIXELS) // 2, 0) for size in ink.shape)
    ink = ink[top : top + CELL_PIXELS, left : left + CELL_PIXELS]
    top, left = ((CELL_PIXELS - size) // 2 for size in ink.shape)
    mask[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    return mask


def confusion_table(counts: np.ndarray, names: Sequence[str]) -> str:
    """The counts as a markdown table, rows the true labels and columns the predicted ones."""
    rows = [f"| true \\ predicted | {' | '.join(names)} |", f"|---|{'---|' * len(names)}"]
    rows += [f"| {name} | {' | '.join(str(int(count)) for count in row)} |" for name, row in zip(names, counts)]
    return "\n".join(rows)
