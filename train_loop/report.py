"""The study's table: one row per finished run, from its `result.json` and latest checkpoint."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

from train_loop import checkpoints, runs, sources
from train_loop.configs import Config
from train_loop.errors import UsageError
from train_loop.models import weighted_layers
from train_loop.state import build_state

SMALL_WEIGHT = 1e-3  # |w| under this counts as (nearly) zero: what L1 produces and L2 does not.

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
    "kernel_mean_abs": ("mean abs w", "{:.4f}"),
    "kernel_max_abs": ("max abs w", "{:.4f}"),
    "kernel_small_share": (f"abs w < {SMALL_WEIGHT:g}", "{:.1%}"),
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


def run_row(run_dir: str) -> dict[str, float | None]:
    """One run's final numbers and its first layer's kernel statistics; the validation columns
    are None for a run without a validation split."""
    result = runs.read_result(run_dir)
    train, validation, test = result["train"], result["validation"] or {}, result["test"]
    kernel = np.abs(first_kernel(run_dir))
    return {
        "train_cross_entropy": train["cross_entropy"],
        "regularization": train["regularization"],
        "total": train["total"],
        "train_accuracy": train["accuracy"],
        "validation_cross_entropy": validation.get("cross_entropy"),
        "validation_accuracy": validation.get("accuracy"),
        "test_cross_entropy": test["cross_entropy"],
        "test_accuracy": test["accuracy"],
        "gap": test["cross_entropy"] - train["cross_entropy"],
        "kernel_mean_abs": float(kernel.mean()),
        "kernel_max_abs": float(kernel.max()),
        "kernel_small_share": float(np.mean(kernel < SMALL_WEIGHT)),
    }


def first_kernel(run_dir: str) -> np.ndarray:
    """The first weighted layer's kernel in the run's latest checkpoint.

    The train state is rebuilt from the run's saved settings and restored, so layers are found
    by name, not by a checkpoint key that Keras might rename; the kernel is the one `model.keras`
    holds (the best or the averaged weights, when the run kept those).
    """
    saved = runs.read_settings(run_dir)
    if saved is None:
        raise UsageError(
            f"{run_dir} has a {runs.RESULT_FILE} but no {runs.SETTINGS_FILE}: its model cannot be rebuilt.")
    config = Config(**{name: value for name, value in saved.items() if name in Config.__dataclass_fields__})
    input_shape, num_classes = sources.input_spec(config)
    state = build_state(config, tf.distribute.get_strategy(), input_shape, num_classes=num_classes)
    prefixes = checkpoints.saved_checkpoints(checkpoints.directory(run_dir))
    if not prefixes:
        raise UsageError(f"{run_dir} has a {runs.RESULT_FILE} but no checkpoint: its weights are gone.")
    tf.train.Checkpoint(**state.trackables()).restore(prefixes[0]).expect_partial()
    layers = weighted_layers(state.model)
    if not layers:
        raise UsageError(f"{run_dir}: its model has no Dense or Conv layer, whose first kernel the table describes.")
    with state.kept_weights():
        return tf.convert_to_tensor(layers[0][1].kernel).numpy()


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
    return Table({os.path.basename(os.path.normpath(run_dir)): run_row(run_dir) for run_dir in run_dirs})
