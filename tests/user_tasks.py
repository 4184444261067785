"""Tasks of a user's, for tests/test_tasks.py and tests/test_task_equivalence.py (given as
--task=tests/user_tasks.py:NAME): two good ones (two named terms on digits, and an autoencoder whose
batches have no targets) and ones that each break one rule."""

from __future__ import annotations

import keras
import tensorflow as tf

PENALTY = 0.01  # The weight of TwoTerms' penalty on the logits.


def small_classifier() -> keras.Model:
    return keras.Sequential(
        [
            keras.layers.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(10, name="logits"),
        ]
    )


class TwoTerms:
    """A data term and a penalty on the logits' size: two terms logged apart, and a metric."""

    def model(self) -> keras.Model:
        return small_classifier()

    def loss_terms(self, batch, outputs):
        labels = batch[1]
        return {
            "data": tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=outputs),
            "logit_penalty": PENALTY * tf.reduce_mean(tf.square(outputs), axis=-1),
        }

    def metrics(self, batch, outputs):
        hits = tf.equal(tf.argmax(outputs, axis=-1, output_type=batch[1].dtype), batch[1])
        return {"hits": tf.cast(hits, tf.float32)}


class Autoencoder:
    """Reconstructs its inputs: `split` gives no targets, and the labels are never read."""

    def model(self) -> keras.Model:
        return keras.Sequential(
            [
                keras.layers.Input((8, 8, 1)),
                keras.layers.Flatten(),
                keras.layers.Dense(8, activation="relu"),
                keras.layers.Dense(64),
                keras.layers.Reshape((8, 8, 1)),
            ]
        )

    def split(self, batch):
        return batch[0], None

    def loss_terms(self, batch, outputs):
        return {"reconstruction": tf.reduce_mean(tf.square(outputs - batch[0]), axis=[1, 2, 3])}


class WideTerm(TwoTerms):
    """A term of shape (B, 10): not reduced over its last axis."""

    def loss_terms(self, batch, outputs):
        return {"data": tf.square(outputs)}


class IntegerTerm(TwoTerms):
    def loss_terms(self, batch, outputs):
        return {"data": tf.cast(batch[1], tf.int32)}


class TotalTerm(TwoTerms):
    def loss_terms(self, batch, outputs):
        return {"total": tf.reduce_mean(tf.square(outputs), axis=-1)}


class SpacedTerm(TwoTerms):
    def loss_terms(self, batch, outputs):
        return {"my term": tf.reduce_mean(tf.square(outputs), axis=-1)}


class NoLossTerms:
    def model(self) -> keras.Model:
        return small_classifier()


not_a_task = 3


class NonFiniteTerm(TwoTerms):
    """A second term that is -inf from the first step (its gradient is 0: only the term shows it)."""

    def loss_terms(self, batch, outputs):
        terms = super().loss_terms(batch, outputs)
        return {"data": terms["data"], "blowup": tf.math.log(tf.zeros_like(terms["data"]))}


class ReplicaScaledTerm(TwoTerms):
    """Its data term multiplied by the number of replicas, by hand (for tests/test_check_equivalence.py)."""

    def loss_terms(self, batch, outputs):
        terms = super().loss_terms(batch, outputs)
        return {**terms, "data": terms["data"] * tf.distribute.get_strategy().num_replicas_in_sync}


class ReplicaDividedTerm(TwoTerms):
    """Its penalty divided by the number of replicas, by hand: averaged twice."""

    def loss_terms(self, batch, outputs):
        terms = super().loss_terms(batch, outputs)
        return {**terms, "logit_penalty": terms["logit_penalty"] / tf.distribute.get_strategy().num_replicas_in_sync}


INF_EXAMPLE = 200  # The digits training example (x_train[200], as given) that InfOnExample's term is inf on.


class InfOnExample(TwoTerms):
    """A term that is +inf on one example, x_train[INF_EXAMPLE] of the bundled digits (found by its
    pixels), and 0 on every other: a run diverges at the step whose batch holds it, on the replica
    that gets it, and the term's gradient is not finite from the logits down to the first layer."""

    def __init__(self):
        from train_loop import Config
        from train_loop.data import sources

        # A NumPy array, a constant of the traced step: a tensor made here would start TensorFlow
        # before a cluster's strategy, which must configure it first.
        self._image = sources.load_splits(Config(dataset="digits")).x_train[INF_EXAMPLE]

    def loss_terms(self, batch, outputs):
        hit = tf.reduce_all(tf.equal(batch[0], self._image), axis=[1, 2, 3])
        spike = tf.reduce_mean(tf.square(outputs), axis=-1) * tf.where(hit, float("inf"), 0.0)
        return {**super().loss_terms(batch, outputs), "spike": spike}


class SeededTask(TwoTerms):
    """Draws its noise from a seed generator of its own, which no checkpoint would keep."""

    def __init__(self):
        self.seed = keras.random.SeedGenerator(3)

    def loss_terms(self, batch, outputs):
        noisy = outputs + keras.random.normal(tf.shape(outputs), seed=self.seed)
        return super().loss_terms(batch, noisy)
