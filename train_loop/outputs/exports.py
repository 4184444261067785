"""What a finished run leaves beside its checkpoints: `model.keras` (also the best model's),
the `saved_model/` export for serving, and the figures of `result.json`."""

from __future__ import annotations

import os
import shutil
from typing import Any

import keras
import tensorflow as tf

from train_loop.configs import Config
from train_loop.model.models import plain_keras
from train_loop.model.state import TrainState
from train_loop.outputs import checkpoints, runs
from train_loop.training import distribute
from train_loop.training.evaluation import Evaluation
from train_loop.training.timing import Throughput


def save_model(model: keras.Model, folder: str) -> None:
    """`<folder>/model.keras` through a temporary name, so a kill leaves no half-written model."""
    os.makedirs(folder, exist_ok=True)
    runs.write_atomically(os.path.join(folder, "model.keras"), plain_keras(model).save)


def export_saved_model(model: keras.Model, run_dir: str) -> None:
    """`<run>/saved_model/` for serving, through Keras' `model.export`: its `serve` signature takes
    a batch of inputs and returns logits. Written beside it and renamed, as `model.keras` is."""
    final, temporary = os.path.join(run_dir, "saved_model"), os.path.join(run_dir, "saved_model.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    with checkpoints.no_space_left(final, temporary=temporary):
        plain_keras(model).export(temporary, format="tf_saved_model", verbose=False)
    shutil.rmtree(final, ignore_errors=True)  # A killed process's export, before its result.json.
    os.replace(temporary, final)


def result(config: Config, strategy: tf.distribute.Strategy, state: TrainState, *, decided: dict[str, Any],
           validation: Evaluation | None, test: Evaluation, throughput: Throughput,
           started: float) -> dict[str, Any]:
    """The content of `result.json`, but for its "seconds" (taken once the model is saved)."""
    best, counters = state.best, state.counters
    return {
        "dataset": config.dataset,
        "strategy": distribute.resolve_strategy_name(config.strategy),
        "replicas": strategy.num_replicas_in_sync,
        "decided": decided,
        "steps": counters.step,
        "epochs": int(counters.epoch),
        "train": counters.epoch_means(),
        "validation": validation.metrics if validation else None,
        "best_step": best.step if best else None,
        "stopped_early": bool(best and best.stop),
        "test": test.metrics,
        # Rows: true label, columns: predicted label, over the test split.
        "confusion_matrix": test.confusion_matrix.tolist(),
        "examples_per_second": throughput.examples_per_second,
        # From train() to the end of the first step: data, model, tracing, compiling.
        "seconds_to_first_step": throughput.first_done_at - started if throughput.first else None,
    }
