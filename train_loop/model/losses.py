"""The loss's parts, each scaled for replicas: a data term's share of the global batch, and the regularization."""

from __future__ import annotations

import keras
import tensorflow as tf

from train_loop.model.models import named_layers


def global_share(per_example: tf.Tensor, global_batch_size: int) -> tf.Tensor:
    """This replica's share of the global batch's mean of a per-example value (a loss term, a metric).

    Divided by the global batch, not the replica's, so that summing over replicas gives exactly
    the mean one device computes on the whole batch. This is `tf.nn.compute_average_loss` minus
    its run-time asserts on `global_batch_size`, a Python constant here, which XLA drops with a
    warning at every compile.
    """
    return tf.reduce_sum(per_example) / global_batch_size


def regularization(model: keras.Model) -> tf.Tensor:
    """This replica's share of the sum of `model.losses`; exactly 0 when no layer carries a term.

    Every term is divided by the number of replicas, for two reasons that give the same factor.
    A weight term (kernel and bias regularizers) is computed whole on every replica's copy of
    the weights, so the sum over replicas must count it once. An activity term depends on the
    replica's slice of the batch: Keras divides each activity regularizer's value by the batch it
    saw, making it a mean over the replica's examples, and the mean of N replicas' equal-sized
    means is the global batch's mean. `add_loss` terms must follow the same rule (a mean over
    the batch, as Keras' `fit` assumes too); a sum over the batch would count 1/N of itself.

    A frozen layer's (`layer.trainable = False`) weight regularizers are not in `model.losses`
    (Keras 3 sums the regularizers of trainable weights only): a constant would add nothing to
    any gradient. Its activity regularizer and `add_loss` terms still count, as they do in Keras.
    """
    if not model.losses:
        return tf.constant(0.0)
    return tf.nn.scale_regularization_loss(tf.add_n(model.losses))


def layer_regularization(model: keras.Model) -> dict[str, tf.Tensor]:
    """Each layer's part of `regularization`, by layer path: its weight terms, its activity term
    and its `add_loss` terms of the last call, this replica's share as there. Call after the
    model, in the same trace; a term a model adds itself (not one of its layers) is in none."""
    return {
        path: tf.nn.scale_regularization_loss(tf.add_n(layer.losses))
        for path, layer in named_layers(model)
        if layer.losses
    }


def layer_weight_terms(model: keras.Model) -> dict[str, tf.Tensor]:
    """Each layer's weight regularization (kernel, bias, any trainable weight's regularizer), by
    layer path: the weight terms of `regularization`, so a frozen layer has none.

    Computed from the weights alone, so it can be logged outside the step and at step 0; the
    activity and `add_loss` terms need a batch and count in the step's total only.
    """
    terms = {}
    for path, layer in named_layers(model):
        parts = [weight.regularizer(weight) for weight in layer.trainable_weights if weight.regularizer]
        if parts:
            terms[path] = tf.add_n(parts)
    return terms
