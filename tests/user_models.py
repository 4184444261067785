"""A user's model function for the tests: kernel, bias and activity regularizers, an `add_loss`
term and a nested sub-model, as `--model=tests/user_models.py:build` or `model_fn=build`; and small
models whose regularization scales wrong under replicas, for tests/test_check_equivalence.py."""

from __future__ import annotations

import keras
import tensorflow as tf

# Factors of the regularizers the model carries (read back by the tests from the layers themselves).
HIDDEN_KERNEL, HIDDEN_BIAS, HIDDEN_ACTIVITY, LOGITS_KERNEL, PENALTY = 2e-3, 1e-3, 1e-3, (1e-4, 1e-3), 1e-2


@keras.saving.register_keras_serializable(package="train_loop_tests")
class MeanSquarePenalty(keras.layers.Layer):
    """Passes its input on and adds `rate` times its mean square, a batch mean, with `add_loss`."""

    def __init__(self, rate: float, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate

    def call(self, inputs):
        self.add_loss(self.rate * keras.ops.mean(keras.ops.square(inputs)))
        return inputs

    def get_config(self) -> dict:
        return {**super().get_config(), "rate": self.rate}


def build() -> keras.Model:
    """digits (8x8x1) to 10 logits through a nested `encoder` whose layer carries every kind of term."""
    inputs = keras.Input((8, 8, 1))
    encoder = keras.Sequential(
        [
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(
                24,
                activation="relu",
                name="hidden",
                kernel_regularizer=keras.regularizers.L2(HIDDEN_KERNEL),
                bias_regularizer=keras.regularizers.L1(HIDDEN_BIAS),
                activity_regularizer=keras.regularizers.L2(HIDDEN_ACTIVITY),
            ),
            MeanSquarePenalty(PENALTY, name="penalty"),
        ],
        name="encoder",
    )
    logits = keras.layers.Dense(10, name="logits", kernel_regularizer=keras.regularizers.L1L2(*LOGITS_KERNEL))
    return keras.Model(inputs, logits(encoder(inputs)), name="user")


# For tests/test_check_equivalence.py: models whose regularization is right or wrong under replicas.


@keras.saving.register_keras_serializable(package="train_loop_tests")
class SummedPenalty(MeanSquarePenalty):
    """The classic bug: adds `rate` times its input's square summed over the batch, not averaged."""

    def call(self, inputs):
        self.add_loss(self.rate * keras.ops.sum(keras.ops.square(inputs)))
        return inputs


@keras.saving.register_keras_serializable(package="train_loop_tests")
class OwnL2Dense(keras.layers.Dense):
    """Adds its kernel regularizer's term itself with `add_loss`, on top of the one Keras adds:
    counted twice, on one device as on N replicas."""

    def call(self, inputs):
        self.add_loss(self.kernel_regularizer(self.kernel))
        return super().call(inputs)


@keras.saving.register_keras_serializable(package="train_loop_tests")
class ReplicaScaledL2Dense(keras.layers.Dense):
    """Adds its kernel's L2 with `add_loss` times the number of replicas, by hand: an attempt to undo
    the division by the replicas that the step makes of every weight term."""

    def call(self, inputs):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        self.add_loss(HIDDEN_KERNEL * keras.ops.sum(keras.ops.square(self.kernel)) * replicas)
        return super().call(inputs)


def _small(hidden: keras.layers.Layer, *after: keras.layers.Layer) -> keras.Model:
    return keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), hidden, *after, keras.layers.Dense(10, name="logits")]
    )


def build_summed_penalty() -> keras.Model:
    return _small(keras.layers.Dense(16, activation="relu", name="hidden"), SummedPenalty(PENALTY, name="summed"))


def build_own_l2_twice() -> keras.Model:
    return _small(OwnL2Dense(16, activation="relu", name="hidden", kernel_regularizer=keras.regularizers.L2(0.01)))


def build_replica_scaled_l2() -> keras.Model:
    return _small(ReplicaScaledL2Dense(16, activation="relu", name="hidden"))


def build_overflowing() -> keras.Model:
    """digits to 10 logits through a hidden layer whose outputs are scaled by 1000: in float16 its
    first gradients overflow at the loss scale's start (2**15), and are finite from 2**6 down."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Rescaling(1000.0, name="amplify"),
            keras.layers.Dense(10, name="logits"),
        ]
    )
