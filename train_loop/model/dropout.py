"""`ExampleDropout`: dropout whose masks do not depend on the replica count, keyed by the step
(`use_step`); and the model with Keras' own Dropout in its place, for saving (`plain_keras`)."""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from train_loop.data.inputs import global_positions


class ExampleDropout(keras.layers.Layer):
    """Dropout whose mask for an example depends only on the seed, the step and the example's
    place in the global batch.

    Keras' Dropout draws one mask per call from a seed generator whose state every replica
    shares: N replicas each drew the same [batch/N, ...] mask where one device drew one
    [batch, ...] mask, so the replica count changed the run (a digits run stopped early at step
    375 on two replicas, 555 on one). Here the mask of the whole global batch at step s is one
    stateless Philox draw keyed by (seed, s), and each replica keeps the rows of its examples:
    one op, as fast as Keras' own on one device (a draw per example, by `tf.map_fn`, took 2.4x
    as long without XLA and 20x with it), and N replicas draw what one device draws.
    The step is the optimizer's (`use_step`), which the checkpoint already holds: the layer has
    no state of its own, and a resumed run draws the masks an uninterrupted one would.

    Same rate and scaling as Keras' layer; saved models hold Keras' own Dropout (`plain_keras`).
    """

    def __init__(self, rate: float, *, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.seed = rate, seed
        self.supports_masking = True
        self.step: Callable[[], tf.Tensor] | None = None

    def call(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        if not training or not self.rate:
            return inputs
        if self.step is None:
            raise RuntimeError(f"{self.name} trains only with a step to key its masks by: call dropout.use_step.")
        # XLA's Philox gives other numbers than TensorFlow's kernels for a seed known only at run
        # time: compiled or not changes the masks (as it changes rounding), the replica count does not.
        key = tf.random.experimental.stateless_fold_in(tf.constant([self.seed, 0], tf.int32), self.step())

        rows, replicas = tf.shape(inputs)[0], tf.distribute.get_strategy().num_replicas_in_sync
        shape = tf.concat([[rows * replicas], tf.shape(inputs)[1:]], axis=0)
        uniform = tf.gather(tf.random.stateless_uniform(shape, seed=key, alg="philox"), _global_positions(rows))
        return tf.where(uniform >= self.rate, inputs / tf.cast(1.0 - self.rate, inputs.dtype), tf.zeros_like(inputs))

    def get_config(self) -> dict:
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


def _global_positions(rows: tf.Tensor) -> tf.Tensor:
    """This replica's examples' places in the global batch (`global_positions`); outside
    a strategy, its rows."""
    if not tf.distribute.has_strategy():
        return tf.range(rows)
    strategy = tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    # A strategy holds this worker's replicas; each worker has one input pipeline.
    pipelines = replicas // len(strategy.extended.worker_devices)
    replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
    return global_positions(rows, replica_id, replicas, pipelines)


def use_step(model: keras.Model, step: Callable[[], tf.Tensor]) -> None:
    """Keys the masks of `model`'s dropout layers by `step()` (the optimizer's `iterations`).

    A function rather than the variable: a Keras layer tracks a variable it holds, which would
    then count among the model's own variables and its checkpoint's.
    """
    for layer in model.layers:
        if isinstance(layer, ExampleDropout):
            layer.step = step


def plain_keras(model: keras.Model) -> keras.Model:
    """`model` with Keras' own Dropout layers, so that its saved file loads with Keras alone."""
    if not any(isinstance(layer, ExampleDropout) for layer in model.layers):
        return model  # A user's model, which cloning might not handle, or a built-in one without dropout.

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        kind = keras.layers.Dropout if isinstance(layer, ExampleDropout) else type(layer)
        return kind.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy
