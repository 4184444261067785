"""The loss components, each scaled for replicas: cross-entropy, regularization, and their total."""

from __future__ import annotations

import keras
import tensorflow as tf


def cross_entropy(labels: tf.Tensor, logits: tf.Tensor, global_batch_size: int) -> tf.Tensor:
    """This replica's share of the global batch's mean cross-entropy.

    Divided by the global batch, not the replica's, so that summing over replicas gives exactly
    the mean one device computes on the whole batch. This is `tf.nn.compute_average_loss` minus
    its run-time asserts on `global_batch_size`, a Python constant here, which XLA drops with a
    warning at every compile.
    """
    return tf.reduce_sum(per_example_cross_entropy(labels, logits)) / global_batch_size


def per_example_cross_entropy(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


def regularization(model: keras.Model) -> tf.Tensor:
    """This replica's share of the sum of `model.losses`; exactly 0 when no layer carries a term.

    Every replica computes the whole term on its copy of the weights, so it is divided by the
    number of replicas for the sum over replicas (and the gradients' sum) to count it once.
    """
    if not model.losses:
        return tf.constant(0.0)
    return tf.nn.scale_regularization_loss(tf.add_n(model.losses))


def correct_share(labels: tf.Tensor, logits: tf.Tensor, global_batch_size: int) -> tf.Tensor:
    """This replica's correct predictions over the global batch: accuracy once summed over replicas."""
    return tf.reduce_sum(correct(labels, logits)) / global_batch_size


def correct(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """1.0 where the highest logit is the label, else 0.0, per example."""
    return tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=labels.dtype), labels), tf.float32)
