"""`ExampleNoise`: random draws that do not depend on the replica count or the micro-batches, keyed
by the step (`use_step`, `use_micro_batches`), for `ExampleDropout` and a user's noisy layers; and
the model with Keras' own Dropout in its place, for saving (`plain_keras`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import keras
import tensorflow as tf

from train_loop.data.inputs import global_positions


class ExampleNoise(keras.layers.Layer):
    """A layer whose random draws for an example depend only on its seed, the step and the
    example's place in the global batch: the base of `ExampleDropout`, and of a user's layer
    that draws noise (a VAE's sampling: see docs/tasks.md), so that 1 device, N replicas, N
    workers, K micro-batches and a resumed run draw the same noise for the same example.

    Keras' layers draw from a seed generator whose state every replica shares: N replicas each
    drew the same [batch/N, ...] noise where one device drew one [batch, ...] draw. Here the
    draw of the whole global batch at step s is one stateless Philox draw keyed by (seed, s),
    and each replica keeps the rows of its examples: one op, as fast as Keras' own on one device
    (a draw per example, by `tf.map_fn`, took 2.4x as long without XLA and 20x with it); K
    micro-batches (`--accumulation_steps`) each keep their slice of their replica's rows. The
    step is the optimizer's (`use_step`), which the checkpoint already holds: the layer has no
    state of its own.
    """

    def __init__(self, *, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.step: Callable[[], tf.Tensor] | None = None
        # With gradient accumulation: the micro-batch being run and their number (`use_micro_batches`).
        self.micro_batch: Callable[[], tf.Tensor] | None = None
        self.micro_batches = 1

    def uniform(self, like: tf.Tensor) -> tf.Tensor:
        """Float32 noise uniform in [0, 1), of `like`'s shape: its first axis is the examples'."""
        return self._draw(like, tf.random.stateless_uniform)

    def normal(self, like: tf.Tensor) -> tf.Tensor:
        """Float32 standard normal noise of `like`'s shape: its first axis is the examples'."""
        return self._draw(like, tf.random.stateless_normal)

    def _draw(self, like: tf.Tensor, distribution: Callable[..., tf.Tensor]) -> tf.Tensor:
        if self.step is None:
            raise RuntimeError(
                f"{self.name} draws noise only in a training step (train_loop keys it by the step), "
                "or after dropout.use_step(model, step)."
            )
        # XLA's Philox gives other numbers than TensorFlow's kernels for a seed known only at run
        # time: compiled or not changes the draws (as it changes rounding), the replica count does not.
        key = tf.random.experimental.stateless_fold_in(tf.constant([self.seed, 0], tf.int32), self.step())

        rows, replicas = tf.shape(like)[0], tf.distribute.get_strategy().num_replicas_in_sync
        # A micro-batch's rows are a slice of its replica's batch: the whole update's draw is made.
        replica_rows = rows * self.micro_batches
        shape = tf.concat([[replica_rows * replicas], tf.shape(like)[1:]], axis=0)
        positions = _global_positions(replica_rows)
        if self.micro_batch is not None:
            positions = tf.slice(positions, [self.micro_batch() * rows], [rows])
        return tf.gather(distribution(shape, seed=key, alg="philox"), positions)

    def get_config(self) -> dict:
        return {**super().get_config(), "seed": self.seed}


class ExampleDropout(ExampleNoise):
    """Dropout whose mask for an example depends only on the seed, the step and the example's
    place in the global batch (`ExampleNoise`).

    With Keras' Dropout, the replica count changed the run (a digits run stopped early at step
    375 on two replicas, 555 on one). Same rate and scaling as Keras' layer; saved models hold
    Keras' own Dropout (`plain_keras`).
    """

    def __init__(self, rate: float, *, seed: int, **kwargs):
        super().__init__(seed=seed, **kwargs)
        self.rate = rate
        self.supports_masking = True

    def call(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        if not training or not self.rate:
            return inputs
        uniform = self.uniform(inputs)
        return tf.where(uniform >= self.rate, inputs / tf.cast(1.0 - self.rate, inputs.dtype), tf.zeros_like(inputs))

    def get_config(self) -> dict:
        return {**super().get_config(), "rate": self.rate}


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
    """Keys the draws of `model`'s `ExampleNoise` layers by `step()` (the optimizer's `iterations`).

    A function rather than the variable: a Keras layer tracks a variable it holds, which would
    then count among the model's own variables and its checkpoint's.
    """
    for layer in _noise_layers(model):
        layer.step = step


def use_micro_batches(
    model: keras.Model, strategy: tf.distribute.Strategy, accumulation_steps: int
) -> tf.Variable | None:
    """With gradient accumulation, keys each example's draw by its place in its replica's whole
    batch, as without: the index of the micro-batch being run, a variable for `steps.accumulate`
    to set (local to each replica, and in no checkpoint); None when `model` has no `ExampleNoise`.

    A variable, not an argument: the per-replica function's arguments are the batch alone, and
    under XLA it is compiled once for every micro-batch.
    """
    layers = list(_noise_layers(model))
    if not layers:
        return None
    with strategy.scope():
        index = tf.Variable(
            0,
            trainable=False,
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
    for layer in layers:
        layer.micro_batch, layer.micro_batches = index.read_value, accumulation_steps
    return index


@contextlib.contextmanager
def whole_batches(model: keras.Model) -> Iterator[None]:
    """Inside, `model`'s noise layers (dropout, a user's `ExampleNoise`) take each call's batch as a
    whole update's, as without `use_micro_batches`: for a one-device reference computed beside an
    accumulating run."""
    layers = list(_noise_layers(model))
    kept = [(layer.micro_batch, layer.micro_batches) for layer in layers]
    for layer in layers:
        layer.micro_batch, layer.micro_batches = None, 1
    try:
        yield
    finally:
        for layer, (micro_batch, micro_batches) in zip(layers, kept, strict=True):
            layer.micro_batch, layer.micro_batches = micro_batch, micro_batches


def _noise_layers(model: keras.Model) -> Iterator[ExampleNoise]:
    """`model`'s `ExampleNoise` layers, those of the models inside it too (a user's encoder)."""
    for layer in model.layers:
        if isinstance(layer, ExampleNoise):
            yield layer
        elif isinstance(layer, keras.Model):
            yield from _noise_layers(layer)


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
