"""Model functions for fine-tuning (tests/test_model_faults.py): frozen layers, and BatchNorm,
as `--model=tests/fine_tuning_models.py:NAME` or `model_fn=NAME`."""

from __future__ import annotations

import keras

FROZEN = ("features", "hidden")  # The frozen layers' paths.
FROZEN_KERNEL_L2, LOGITS_KERNEL_L2 = 1e-2, 1e-3


def frozen() -> keras.Model:
    """digits to 10 logits through a frozen Conv2D (whose kernel carries an L2 regularizer) and a
    frozen Dense, with a trainable head: a fine-tuning's shape."""
    inputs = keras.Input((8, 8, 1))
    features = keras.layers.Conv2D(
        4, 3, activation="relu", name="features", kernel_regularizer=keras.regularizers.L2(FROZEN_KERNEL_L2)
    )
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")
    logits = keras.layers.Dense(10, name="logits", kernel_regularizer=keras.regularizers.L2(LOGITS_KERNEL_L2))
    outputs = logits(hidden(keras.layers.Flatten(name="flatten")(features(inputs))))
    features.trainable = hidden.trainable = False
    return keras.Model(inputs, outputs, name="frozen")


def all_frozen() -> keras.Model:
    model = frozen()
    model.trainable = False
    return model


def batch_norm() -> keras.Model:
    """digits to 10 logits through a Conv2D, BatchNormalization (its moving statistics are
    non-trainable variables the step updates) and a Dense.

    Synchronized: Keras' default normalizes each replica's share of the batch by its own
    statistics, so N replicas would differ from one device."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, use_bias=False, name="conv"),  # BatchNorm subtracts any bias.
            keras.layers.BatchNormalization(synchronized=True, name="norm"),
            keras.layers.ReLU(name="relu"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(10, name="logits"),
        ],
        name="batch_norm",
    )
