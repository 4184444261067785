"""A user's model function for the tests: kernel, bias and activity regularizers, an `add_loss`
term and a nested sub-model, as `--model=tests/user_models.py:build` or `model_fn=build`."""

from __future__ import annotations

import keras

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
