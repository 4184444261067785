"""The trained model as files: `model.keras` (also the best model's) and the `saved_model/`
export for serving, each written beside its final name and renamed."""

from __future__ import annotations

import os
import shutil

import keras

from train_loop import files
from train_loop.model.models import plain_keras
from train_loop.outputs import checkpoints, runs


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
