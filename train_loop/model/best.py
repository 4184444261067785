"""The best model and early stopping: the best validation score, its step, the validations since,
and the weights it was scored with, kept in variables so that checkpoints carry them."""

from __future__ import annotations

import contextlib
import math

import keras
import tensorflow as tf

from train_loop.configs import Config
from train_loop.errors import UsageError
from train_loop.model.measurements import Table
from train_loop.model.optimizers import swapped_weights


class BestModel:
    """Tracks `--best_metric` over validations; create it inside `strategy.scope()`.

    Keras' `ModelCheckpoint(save_best_only=True)` forgets its best value when a run restarts
    (keras-team/keras#17012), so a resumed run would keep a worse model; here the best value, its
    step, the patience counter and the weights are part of the run's checkpoint.
    """

    def __init__(self, config: Config, model: keras.Model, table: Table):
        """Raises UsageError when `--best_metric` names nothing the run's validation measures."""
        self.name = config.best_metric
        measured = self.name.removeprefix("validation/")
        if measured not in table.evaluated:
            raise UsageError(
                f"--best_metric={self.name}: the validation measures "
                f"{', '.join('validation/' + name for name in table.evaluated)}; name one of them."
            )
        self._higher_is_better = table.higher_is_better(measured)
        self.patience, self.min_delta = config.early_stopping_patience, config.early_stopping_min_delta
        self._model_weights = model.weights
        self.value = tf.Variable(-math.inf if self._higher_is_better else math.inf, dtype=tf.float64, trainable=False)
        self._step = tf.Variable(-1, dtype=tf.int64, trainable=False)
        self._since = tf.Variable(0, dtype=tf.int64, trainable=False)  # Validations without improvement.
        self._weights = [
            tf.Variable(tf.zeros(weight.shape, weight.dtype), trainable=False) for weight in self._model_weights
        ]

    def describe(self) -> str:
        """What is kept, with the direction that counts as better: a user's metric may go either way."""
        better = "higher" if self._higher_is_better else "lower"
        return f"keeping the weights of the best {self.name} ({better} is better)"

    @property
    def step(self) -> int | None:
        """The step of the best validation so far; None before the first."""
        step = int(self._step.numpy())  # int() cannot read a mirrored variable; numpy() can.
        return step if step >= 0 else None

    def trackables(self) -> dict[str, object]:
        return {
            "best_value": self.value,
            "best_step": self._step,
            "best_since": self._since,
            "best_weights": self._weights,
        }

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Records a validation of the model's current weights; says whether it is the new best
        (better than the best by more than `--early_stopping_min_delta`)."""
        value = metrics[self.name.removeprefix("validation/")]
        best = float(self.value.numpy())
        gain = value - best if self._higher_is_better else best - value
        if gain > self.min_delta or self.step is None:
            self.value.assign(value)
            self._step.assign(step)
            self._since.assign(0)
            for kept, weight in zip(self._weights, self._model_weights):
                kept.assign(weight)
            return True
        self._since.assign_add(1)
        return False

    @property
    def stop(self) -> bool:
        """Whether `--early_stopping_patience` validations in a row have not improved."""
        return bool(self.patience) and int(self._since.numpy()) >= self.patience

    def weights_in_model(self) -> contextlib.AbstractContextManager:
        """The model holds the best weights inside, its own outside."""

        def replace() -> None:
            for weight, kept in zip(self._model_weights, self._weights):
                weight.assign(kept)

        return swapped_weights(self._model_weights, replace)
