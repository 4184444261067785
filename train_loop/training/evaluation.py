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
) -> Evaluator:
    """An `Evaluator`: `for_split(images, labels)` or `for_input(dataset_fn, num_batches)` gives
    `evaluate(weights)`, that split's evaluation of the model while it holds `weights()`.

    Every split shares one traced pass, whatever the number of evaluations: the splits' padded
    batches have one shape, so the validation split's trace serves the test split too (each
    trace took 0.3 s of a one-epoch run).
    """
    return Evaluator(strategy, state, batch_size=batch_size, num_classes=num_classes, stopwatch=stopwatch)


class Evaluator:
    """Makes each split's `evaluate(weights)` (see `make_evaluator`)."""

    def __init__(
        self,
        strategy: tf.distribute.Strategy,
        state: TrainState,
        *,
        batch_size: int,
        num_classes: int,
        stopwatch: Stopwatch,
    ):
        self._strategy, self._state, self._batch_size = strategy, state, batch_size
        self._num_classes, self._stopwatch = num_classes, stopwatch
        self._traced: list = []  # The one eval pass, made with the first split's input.

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> Callable[[Weights], Evaluation]:
        """An in-memory split's evaluation."""
        return self.for_input(*inputs.eval_dataset_fn(images, labels, self._batch_size))

    def for_input(
        self, eval_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset], num_batches: int
    ) -> Callable[[Weights], Evaluation]:
        """The evaluation of the split `eval_fn` gives in `num_batches` padded batches."""
        eval_input = inputs.ReplicaInput(self._strategy, eval_fn)
        if not self._traced:
            self._traced.append(
                loop_calls.make_eval_pass(
                    self._state.model,
                    self._strategy,
                    eval_input.next_batch,
                    task=self._state.task,
                    table=self._state.table,
                    num_classes=self._num_classes,
                )
            )
        eval_pass = self._traced[0]

        def evaluate(weights: Weights) -> Evaluation:
            with self._stopwatch.phase("evaluation"), weights():
                measured = eval_pass(eval_input.iterator(), tf.constant(num_batches))
            return Evaluation(
                {name: float(measured[name]) for name in self._state.table.evaluated},
                measured["confusion_matrix"].numpy() if self._state.task.classifier else None,
            )

        return evaluate
