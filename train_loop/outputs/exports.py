"""The trained model as files: `model.keras` (also the best model's) and the `saved_model/`
export for serving, each written beside its final name and renamed; and a finished run's
`model.keras` read back."""

from __future__ import annotations

import os
import shutil

import keras

from train_loop import files
from train_loop.errors import UsageError
from train_loop.model.dropout import plain_keras
from train_loop.model.user_models import load_model_function
from train_loop.outputs import checkpoints, runs
from train_loop.settings import MODELS
from train_loop.user_code import load_object


def save_model(model: keras.Model, folder: str) -> None:
    """`<folder>/model.keras` through a temporary name, so a kill leaves no half-written model."""
    os.makedirs(folder, exist_ok=True)
    files.write_atomically(os.path.join(folder, runs.MODEL_FILE), plain_keras(model).save)


def export_saved_model(model: keras.Model, run_dir: str) -> None:
    """`<run>/saved_model/` for serving, through Keras' `model.export`: its `serve` signature takes
    a batch of inputs and returns logits. Written beside it and renamed, as `model.keras` is."""
    final = os.path.join(run_dir, runs.EXPORT_DIR)
    temporary = f"{final}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)

    def export(folder: str) -> None:
        with checkpoints.no_space_left(final, temporary=folder):
            plain_keras(model).export(folder, format="tf_saved_model", verbose=False)

    files.write_atomically(final, export, temporary=temporary)


def load_model(run_dir: str) -> keras.Model:
    """The model a finished run kept: its `model.keras`, which holds the best weights with
    `--best_metric`, else the moving average with `--ema`, else the last ones.

    A run of a user's model function or task imports its module first, so that the layers it
    registers with Keras load (the VAE example's sampling); a module that cannot be imported now
    (a notebook's) is named only if the model then fails to load without it.

    Raises:
      UsageError: `run_dir` is not a finished run, or its model cannot be read.
    """
    path = os.path.join(run_dir, runs.MODEL_FILE)
    if not runs.is_finished(run_dir) or not os.path.isfile(path):
        raise UsageError(
            f"{run_dir!r} is not a finished run (no {runs.RESULT_FILE} and model.keras in it): "
            "give a run folder that finished training, as its last line names it."
        )
    settings = runs.read_settings(run_dir) or {}
    model_name, task_name = settings.get("model", ""), settings.get("task", "")
    imports = [
        *([lambda: load_model_function(model_name)] if model_name and model_name not in MODELS else []),
        *([lambda: load_object("task", task_name, role="a task file", kind="task")] if task_name else []),
    ]
    unimported = ""
    for load_module in imports:
        try:
            load_module()
        except UsageError as error:
            unimported += f"; {error}"
    try:
        return keras.models.load_model(path)
    except (OSError, TypeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot load {path} ({reason}){unimported}.") from None
