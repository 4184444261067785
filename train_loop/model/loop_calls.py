"""The traced loops over the step, each one `tf.function` traced once: `num_steps` updates in one
call (a "loop call"), which `make_input_loop_call` binds to the input it pulls from, and the
evaluation pass."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import keras
import tensorflow as tf

from train_loop.configs import Config
from train_loop.data import inputs
from train_loop.model import losses
from train_loop.model.measurements import SUMMED
from train_loop.model.state import TrainState
from train_loop.model.steps import gradient_measurements, make_replica_gradients, make_train_step

_SUM = tf.distribute.ReduceOp.SUM


def make_loop_call(
    strategy: tf.distribute.Strategy,
    state: TrainState,
    next_batch: Callable[[object], tuple],
    *,
    global_batch_size: int,
    jit_compile: bool = False,
    global_clipnorm: float = 0.0,
) -> Callable[[object, tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]:
    """`loop_call(iterator, num_steps, histograms)`: `num_steps` updates of `state` in one traced call.

    `next_batch(iterator)` gives every replica its batch (see `inputs.ReplicaInput`). Returns the
    `measurements.SUMMED` ones ("clipped" only with `global_clipnorm`) summed over the steps, and
    the gradient's (`gradient_measurements`) at the last step, its kernels' only when
    `histograms` is true (else zeros); pass `num_steps` and `histograms` as tensors so that every
    call reuses one trace.
    """
    model = state.model
    replica_gradients = make_replica_gradients(
        model, global_batch_size, loss_scale=state.loss_scale, jit_compile=jit_compile
    )
    train_step = make_train_step(
        strategy,
        model,
        state.optimizer,
        replica_gradients,
        loss_scale=state.loss_scale,
        global_clipnorm=global_clipnorm,
    )
    summed = [name for name in SUMMED if name != "clipped" or global_clipnorm]

    @tf.function(autograph=False)  # The loop is written out: see `_counted_loop`.
    def loop_call(iterator, num_steps: tf.Tensor, histograms: tf.Tensor) -> dict[str, tf.Tensor]:
        def step_once(step: tf.Tensor, sums: dict[str, tf.Tensor], gradient: dict[str, tf.Tensor]) -> tuple:
            measured = train_step(next_batch(iterator), step == num_steps - 1, histograms)
            return ({name: sums[name] + measured[name] for name in summed}, {name: measured[name] for name in gradient})

        sums, gradient = _counted_loop(
            num_steps, step_once, (dict.fromkeys(summed, tf.constant(0.0)), gradient_measurements(model))
        )
        return {**sums, **gradient}

    return loop_call


def make_input_loop_call(
    config: Config,
    strategy: tf.distribute.Strategy,
    state: TrainState,
    replica_input: inputs.ReplicaInput,
    *,
    jit_compile: bool,
    iterator: Iterator | None = None,
) -> Callable[[tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]:
    """`loop_call(num_steps, histograms)`: `state`'s loop call (`make_loop_call`) pulling from
    `iterator` over `replica_input` (made here when not given: a stream's is made before the
    checkpoint that holds it is restored); the run's and the XLA timing's alike."""
    loop_call = make_loop_call(
        strategy,
        state,
        replica_input.next_batch,
        global_batch_size=config.batch_size,
        jit_compile=jit_compile,
        global_clipnorm=config.global_clipnorm,
    )
    iterator = iterator or replica_input.iterator()
    return lambda num_steps, histograms: loop_call(iterator, num_steps, histograms)


def make_eval_pass(
    model: keras.Model,
    strategy: tf.distribute.Strategy,
    next_batch: Callable[[object], tuple],
    *,
    num_classes: int,
) -> Callable[[object, tf.Tensor], dict[str, tf.Tensor]]:
    """`eval_pass(iterator, num_batches)`: cross-entropy, accuracy and the confusion matrix.

    Sums are weighted so the zero-weight padding of the last batch counts for nothing. The
    confusion matrix counts true labels by row and predictions by column.
    """

    def replica_eval(images: tf.Tensor, labels: tf.Tensor, weights: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        logits = tf.cast(model(images, training=False), tf.float32)
        per_example = losses.per_example_cross_entropy(labels, logits)
        confusion = tf.math.confusion_matrix(
            labels,
            tf.argmax(logits, axis=-1, output_type=labels.dtype),
            num_classes=num_classes,
            weights=weights,
            dtype=tf.float32,
        )
        return tf.stack([tf.reduce_sum(per_example * weights), tf.reduce_sum(weights)]), confusion

    @tf.function(autograph=False)  # The loop is written out: see `_counted_loop`.
    def eval_pass(iterator, num_batches: tf.Tensor) -> dict[str, tf.Tensor]:
        def batch_once(_: tf.Tensor, sums: tf.Tensor, confusion: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            batch_sums, batch_confusion = strategy.run(replica_eval, args=next_batch(iterator))
            return (
                sums + strategy.reduce(_SUM, batch_sums, axis=None),
                confusion + strategy.reduce(_SUM, batch_confusion, axis=None),
            )

        sums, confusion = _counted_loop(num_batches, batch_once, (tf.zeros([2]), tf.zeros([num_classes, num_classes])))
        # The correct predictions are the confusion matrix's diagonal.
        return {
            "cross_entropy": sums[0] / sums[1],
            "accuracy": tf.linalg.trace(confusion) / sums[1],
            "confusion_matrix": tf.cast(confusion, tf.int64),
        }

    return eval_pass


def _counted_loop(count: tf.Tensor, body: Callable[..., tuple], initial: tuple) -> tuple:
    """`body(i, *values)` for i in 0..count-1, each call's values fed to the next: the loop
    `for i in tf.range(count)` becomes under AutoGraph, written out.

    The traced functions run without AutoGraph because converting their Python (every function
    they call, 29 of them) took most of the first step's tracing; what they call branches with
    `tf.cond` where it must, and Keras does not convert a model's code either way.
    """
    _, values = tf.while_loop(
        lambda i, _: i < count, lambda i, values: (i + 1, body(i, *values)), (tf.constant(0, count.dtype), initial)
    )
    return values
