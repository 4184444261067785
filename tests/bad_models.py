"""Model functions that `--model` must refuse in one line (tests/test_cli_errors.py)."""

from __future__ import annotations

import keras


def raises() -> keras.Model:
    raise RuntimeError("this model needs a GPU")


def returns_a_layer() -> keras.layers.Layer:
    return keras.layers.Dense(10)


def five_classes() -> keras.Model:
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(5)])


def wants_vectors() -> keras.Model:
    return keras.Sequential([keras.Input((13,)), keras.layers.Dense(10)])


def regularized() -> keras.Model:
    dense = keras.layers.Dense(10, kernel_regularizer=keras.regularizers.L2(1e-3), name="dense")
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), dense])


NOT_A_FUNCTION = 3
