"""Model functions for the regularizer check's tests (`--model=tests/check_models.py:NAME`):
weights the global --l2 does not reach, and a regularization that does not reach its weight."""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf

DETACHED_L2 = 1e-2


def embedding() -> keras.Model:
    """digits' pixels (0..16, read as indices) through an Embedding table, a LayerNormalization and a Dense."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Embedding(17, 2, name="embed"),
            keras.layers.Flatten(name="flat_embed"),
            keras.layers.LayerNormalization(name="norm"),
            keras.layers.Dense(10, name="dense"),
        ]
    )


@keras.saving.register_keras_serializable(package="train_loop_check_tests")
class DetachedDense(keras.layers.Layer):
    """A dense layer whose L2 term is computed on `tf.stop_gradient` of its kernel: it adds to the
    loss and never moves the kernel."""

    factor = 1.0  # Times the penalty: 0 makes a term of value 0, which is not flagged.

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 10), initializer="glorot_uniform", name="kernel")

    def call(self, inputs):
        self.add_loss(self.factor * DETACHED_L2 * tf.reduce_sum(tf.square(tf.stop_gradient(self.kernel))))
        return inputs @ self.kernel


def detached() -> keras.Model:
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), DetachedDense(name="detached")])


def embedding_only() -> keras.Model:
    """digits' pixels through an Embedding table of 10 values each, averaged: no layer --l2 reaches."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Embedding(17, 10, name="embed"),
            keras.layers.GlobalAveragePooling1D(name="mean"),
        ]
    )


@keras.saving.register_keras_serializable(package="train_loop_check_tests")
class ScaledLogits(keras.Model):
    """A subclassed model that makes a weight on itself in `build`, in no layer: a scale per class
    of its Dense layer's logits (with `regularizer`, if given)."""

    def __init__(self, regularizer=None, **kwargs):
        super().__init__(**kwargs)
        self.regularizer = regularizer
        self.flatten = keras.layers.Flatten(name="flatten")
        self.dense = keras.layers.Dense(10, name="dense")

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(10,), initializer="ones", regularizer=self.regularizer, name="scale")

    def call(self, inputs):
        return self.dense(self.flatten(inputs)) * self.scale


def own_weight() -> keras.Model:
    return ScaledLogits(name="scaled")


def own_regularized_weight() -> keras.Model:
    return ScaledLogits(keras.regularizers.L2(0.01), name="scaled")


def detached_on_worker_1() -> keras.Model:
    """A Dense layer --l2 reaches after a detached penalty that is non-zero on worker 1 only (read
    from TF_CONFIG): a term that depends on each worker's own data, so the chief passes where
    worker 1 fails."""
    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
    detached = DetachedDense(name="detached")
    detached.factor = float(task.get("index") == 1)
    return keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), detached, keras.layers.Dense(10, name="dense")]
    )


def unit_norm() -> keras.Model:
    """A Dense kernel with its own L2 under a UnitNorm constraint, which scales each column back to
    norm 1 after every update: the L2's pull towards 0 is undone, whatever its size."""
    dense = keras.layers.Dense(
        10,
        kernel_regularizer=keras.regularizers.L2(0.01),
        kernel_constraint=keras.constraints.UnitNorm(axis=0),
        name="dense",
    )
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(name="flatten"), dense])
