"""The training step: the per-replica update, and its traced wrappers for training and evaluation.

Three layers, as in Orbit and Sonnet: `make_replica_step` is plain math under a GradientTape;
`make_train_loop` traces `strategy.run` over `num_steps` batches in one `tf.function` call;
the eager outer loop in `loop.py` owns timing, summaries and checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from train_loop import losses
from train_loop.configs import Config

TRAIN_MEASUREMENTS = ("cross_entropy", "regularization", "total", "accuracy")
_SUM = tf.distribute.ReduceOp.SUM


def build_optimizer(config: Config) -> keras.optimizers.Optimizer:
    """The Keras optimizer `--optimizer` names; build it inside `strategy.scope()`."""
    optimizers = {
        "rmsprop": keras.optimizers.RMSprop,
        "adam": keras.optimizers.Adam,
        "sgd": keras.optimizers.SGD,
    }
    return optimizers[config.optimizer](learning_rate=config.learning_rate)


def make_replica_step(
    model: keras.Model, optimizer: keras.optimizers.Optimizer, global_batch_size: int,
) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """One update on one replica's slice of the batch.

    The cross-entropy and the regularization are computed apart and added by hand, so each can
    be logged; both are this replica's share, and summing over replicas gives the batch's value.

    Returns:
      A function of (images, labels) giving the stacked `TRAIN_MEASUREMENTS` for this replica.
    """

    def replica_step(images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            cross_entropy = losses.cross_entropy(labels, logits, global_batch_size)
            regularization = losses.regularization(model)
            total = cross_entropy + regularization
        gradients = tape.gradient(total, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        accuracy = losses.correct_share(labels, logits, global_batch_size)
        return tf.stack([cross_entropy, regularization, total, accuracy])

    return replica_step


def make_train_loop(
    strategy: tf.distribute.Strategy, replica_step: Callable[..., tf.Tensor],
    next_batch: Callable[[object], tuple],
) -> Callable[[object, tf.Tensor], dict[str, tf.Tensor]]:
    """`train_loop(iterator, num_steps)`: `num_steps` updates in one traced call.

    `next_batch(iterator)` gives every replica its batch (see `data.ReplicaInput`). Returns the
    measurements summed over the steps (each already summed over replicas); pass `num_steps` as
    a tensor so that every call reuses one trace.
    """

    @tf.function
    def train_loop(iterator, num_steps: tf.Tensor) -> dict[str, tf.Tensor]:
        sums = tf.zeros([len(TRAIN_MEASUREMENTS)])
        for _ in tf.range(num_steps):
            per_replica = strategy.run(replica_step, args=next_batch(iterator))
            sums += strategy.reduce(_SUM, per_replica, axis=None)
        return dict(zip(TRAIN_MEASUREMENTS, tf.unstack(sums)))

    return train_loop


def make_eval_loop(
    model: keras.Model, strategy: tf.distribute.Strategy, next_batch: Callable[[object], tuple],
) -> Callable[[object, tf.Tensor], dict[str, tf.Tensor]]:
    """`eval_loop(iterator, num_batches)`: cross-entropy and accuracy over weighted batches.

    Sums are weighted so the zero-weight padding of the last batch counts for nothing.
    """

    def replica_eval(images: tf.Tensor, labels: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        logits = tf.cast(model(images, training=False), tf.float32)
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels), tf.float32)
        return tf.stack([tf.reduce_sum(per_example * weights), tf.reduce_sum(correct * weights),
                         tf.reduce_sum(weights)])

    @tf.function
    def eval_loop(iterator, num_batches: tf.Tensor) -> dict[str, tf.Tensor]:
        sums = tf.zeros([3])
        for _ in tf.range(num_batches):
            sums += strategy.reduce(_SUM, strategy.run(replica_eval, args=next_batch(iterator)), axis=None)
        return {"cross_entropy": sums[0] / sums[2], "accuracy": sums[1] / sums[2]}

    return eval_loop
