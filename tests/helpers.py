"""Shared by the tests: NumPy recomputations and readers of the event files a run wrote."""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from train_loop import Config, models


def numpy_regularization(model: keras.Model, config: Config) -> float:
    """λ·Σw² and λ·Σ|w| over kernels and biases, recomputed from the weights in NumPy."""
    total = 0.0
    for _, layer in models.weighted_layers(model):
        kernel, bias = (np.asarray(weights, np.float64) for weights in layer.get_weights())
        total += config.l1 * np.abs(kernel).sum() + config.l2 * np.square(kernel).sum()
        total += config.bias_l1 * np.abs(bias).sum() + config.bias_l2 * np.square(bias).sum()
    return total


def events(run_dir: str, writer: str) -> event_accumulator.EventAccumulator:
    accumulator = event_accumulator.EventAccumulator(
        os.path.join(run_dir, writer), size_guidance={event_accumulator.TENSORS: 0})
    return accumulator.Reload()


def scalar_series(run_dir: str, writer: str, tag: str) -> dict[int, float]:
    return {event.step: float(tf.make_ndarray(event.tensor_proto))
            for event in events(run_dir, writer).Tensors(tag)}
