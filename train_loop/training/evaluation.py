"""Scoring a split (validation or test): one pass of the traced evaluation over it, with the
weights the caller puts in the model."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from train_loop.data import inputs
from train_loop.model import loop_calls
from train_loop.model.state import TrainState
from train_loop.training.timing import Stopwatch


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One pass over a split: the weighted mean of each term and metric of the task by name, and
    the classifier's confusion matrix (None for other tasks: it means nothing without classes)."""

    metrics: dict[str, float]
    confusion_matrix: np.ndarray | None


Weights = Callable[[], contextlib.AbstractContextManager]  # Inside it, the model holds the weights to score.


def make_evaluator(
    strategy: tf.distribute.Strategy, state: TrainState, *, batch_size: int, num_classes: int, stopwatch: Stopwatch
) -> Callable[[np.ndarray, np.ndarray], Callable[[Weights], Evaluation]]:
    """`for_split(images, labels)` gives `evaluate(weights)`: that split's evaluation, of the model
    while it holds `weights()`.

    Every split shares one traced pass, whatever the number of evaluations: the splits' padded
    batches have one shape, so the validation split's trace serves the test split too (each
    trace took 0.3 s of a one-epoch run).
    """
    traced: list = []  # The one eval pass, made with the first split's input.

    def for_split(images: np.ndarray, labels: np.ndarray) -> Callable[[Weights], Evaluation]:
        eval_fn, num_batches = inputs.eval_dataset_fn(images, labels, batch_size)
        eval_input = inputs.ReplicaInput(strategy, eval_fn)
        if not traced:
            traced.append(
                loop_calls.make_eval_pass(
                    state.model,
                    strategy,
                    eval_input.next_batch,
                    task=state.task,
                    table=state.table,
                    num_classes=num_classes,
                )
            )
        eval_pass = traced[0]

        def evaluate(weights: Weights) -> Evaluation:
            with stopwatch.phase("evaluation"), weights():
                measured = eval_pass(eval_input.iterator(), tf.constant(num_batches))
            return Evaluation(
                {name: float(measured[name]) for name in state.table.evaluated},
                measured["confusion_matrix"].numpy() if state.task.classifier else None,
            )

        return evaluate

    return for_split
