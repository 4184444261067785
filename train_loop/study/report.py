"""The study's table: one row per finished run, from its `result.json` and latest checkpoint."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

from train_loop.errors import UsageError
from train_loop.model.models import NEAR_ZERO, near_zero_share, weighted_layers
from train_loop.outputs import runs
from train_loop.outputs.exports import load_model
from train_loop.outputs.stderr import warn

# (heading, how to format it) for every column after the run's name.
COLUMNS = {
    "train_cross_entropy": ("train CE", "{:.4f}"),
    "regularization": ("regularization", "{:.4f}"),
    "total": ("total", "{:.4f}"),
    "train_accuracy": ("train acc", "{:.4f}"),
    "validation_cross_entropy": ("val CE", "{:.4f}"),
    "validation_accuracy": ("val acc", "{:.4f}"),
    "test_cross_entropy": ("test CE", "{:.4f}"),
    "test_accuracy": ("test acc", "{:.4f}"),
    "gap": ("gap (test - train CE)", "{:+.4f}"),
    "validation_gap": ("gap (val - train CE)", "{:+.4f}"),
    "kernel_mean_abs": ("mean abs w", "{:.4f}"),
    "kernel_max_abs": ("max abs w", "{:.4f}"),
    "kernel_small_share": (f"abs w < {NEAR_ZERO:g}", "{:.1%}"),
}


def finished_runs(folder: str) -> list[str]:
    """The run folders directly under `folder` (or `folder` itself) that hold a `result.json`.

    Raises:
      UsageError: `folder` is not a folder, or holds no finished run.
    """
    if not os.path.isdir(folder):
        raise UsageError(f"{folder!r} is not a folder: give the folder that holds the runs, e.g. logdir/study-....")
    candidates = [folder, *(os.path.join(folder, name) for name in sorted(os.listdir(folder)))]
    found = [path for path in candidates if os.path.isfile(os.path.join(path, runs.RESULT_FILE))]
    if not found:
        raise UsageError(f"{folder!r} holds no finished run (no <run>/{runs.RESULT_FILE}): train some first.")
    return found


@dataclasses.dataclass(frozen=True)
class RunNumbers:
    """One finished run as the tables and figures see it: its final numbers (`row`, by COLUMNS'
    keys) and its first weighted layer's kept kernel, with that layer's path."""

    row: dict[str, float | None]
    layer_path: str
    kernel: np.ndarray


def read_run(run_dir: str) -> RunNumbers:
    """The run's final numbers from its `result.json`, and its first layer's kernel statistics;
    the validation columns are None for a run without a validation split.

    The cross-entropy columns hold the sum of the run's data terms, which is the cross-entropy
    for the classifier (`--loss` and `--task` runs are ranked on it too); the accuracy columns
    are None for a task without accuracy.
    """
    result = runs.read_result(run_dir)
    train, validation, test = result["train"], result["validation"] or {}, result["test"]
    layer_path, kernel = first_kernel(run_dir)
    train_data = data_total(train, train)
    validation_data = data_total(validation, train) if validation else None
    return RunNumbers(
        {
            "train_cross_entropy": train_data,
            "regularization": train["regularization"],
            "total": train["total"],
            "train_accuracy": train.get("accuracy"),
            "validation_cross_entropy": validation_data,
            "validation_accuracy": validation.get("accuracy"),
            "test_cross_entropy": data_total(test, train),
            "test_accuracy": test.get("accuracy"),
            "gap": data_total(test, train) - train_data,
            "validation_gap": None if validation_data is None else validation_data - train_data,
            "kernel_mean_abs": float(np.abs(kernel).mean()),
            "kernel_max_abs": float(np.abs(kernel).max()),
            "kernel_small_share": near_zero_share(kernel),
        },
        layer_path,
        kernel,
    )


def data_total(measured: dict[str, float], train: dict[str, float]) -> float:
    """The sum of a split's data terms (`data_terms`); an evaluation of several holds it as "data_total"."""
    return measured["data_total"] if "data_total" in measured else sum(measured[term] for term in data_terms(train))


def data_terms(train: dict[str, float]) -> list[str]:
    """The run's data terms: what `train` (result.json's, in the order of the measurement table)
    holds before the regularization."""
    return list(train)[: list(train).index("regularization")]


def first_kernel(run_dir: str) -> tuple[str, np.ndarray]:
    """The first weighted layer's path and kernel in the run's `model.keras`: the weights the run
    kept (the best or the averaged ones, when it kept those). The saved model, not one rebuilt
    from the settings, so that a run trained on arrays given in Python, which are not on disk, is
    described too.

    Raises:
      UsageError: the model cannot be read, or has no Dense or Conv layer.
    """
    layers = weighted_layers(load_model(run_dir))
    if not layers:
        raise UsageError(f"{run_dir}: its model has no Dense or Conv layer, whose first kernel the table describes.")
    path, layer = layers[0]
    return path, tf.convert_to_tensor(layer.kernel).numpy()


@dataclasses.dataclass(frozen=True)
class Table:
    """Rows by run name, in the order given."""

    rows: dict[str, dict[str, float | None]]

    def markdown(self) -> str:
        headings = ["run", *(heading for heading, _ in COLUMNS.values())]
        lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
        for name, row in self.rows.items():
            cells = [name, *("-" if row[key] is None else form.format(row[key]) for key, (_, form) in COLUMNS.items())]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def table(run_dirs: list[str]) -> Table:
    """The rows of every run that can be read; each one that cannot is left out and named in one
    line on stderr with the reason, so that one odd run does not hide the others.

    Raises:
      UsageError: not one of the runs can be read (the first one's reason).
    """
    rows, refused = {}, {}
    for run_dir in run_dirs:
        name = os.path.basename(os.path.normpath(run_dir))
        try:
            rows[name] = read_run(run_dir).row
        except UsageError as error:
            refused[name] = error
    if not rows:
        first, *others = refused.values()
        if not others:
            raise first
        raise UsageError(f"{str(first).rstrip('.')}; nor can the {len(others)} other run(s) here be read.")
    for name, error in refused.items():
        warn(f"left out run {name}: {error}")
    return Table(rows)
