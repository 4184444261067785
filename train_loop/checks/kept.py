"""The state a check runs on, as it was afterwards: every variable put back (`restored`), and
regularized weights that are all zeros given values inside (`nonzero_weights`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras
import numpy as np
import tensorflow as tf

from train_loop.model.models import named_weights
from train_loop.model.state import TrainState


def float_array(value: object) -> np.ndarray:
    return np.asarray(tf.convert_to_tensor(value), np.float64)


@contextlib.contextmanager
def restored(state: TrainState) -> Iterator[None]:
    """Every variable of the model, the optimizer and the loss scale holds its value again outside."""
    variables = [
        *state.model.variables,
        *state.optimizer.variables,
        *(state.loss_scale.variables if state.loss_scale else ()),
    ]
    saved = [tf.identity(tf.convert_to_tensor(variable)) for variable in variables]
    try:
        yield
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)


@contextlib.contextmanager
def nonzero_weights(model: keras.Model) -> Iterator[None]:
    """A regularized weight that is all zeros (a bias at its start) holds seeded values inside: its
    closed form would be 0, which proves nothing (and L1's sign(0) is 0). `restored` puts it back."""
    random = np.random.default_rng(0)
    for _, weight in named_weights(model):
        if weight.regularizer is not None and not np.any(float_array(weight)):
            weight.assign(random.uniform(0.05, 0.5, weight.shape) * random.choice([-1.0, 1.0], weight.shape))
    yield
