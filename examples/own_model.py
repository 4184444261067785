"""Your own Keras model on your own arrays, through train_loop's Python API.

The arrays are scikit-learn's bundled 8x8 digits as (N, 8, 8, 1) floats in [0, 1]; the model
carries an activity regularizer, and --l2 puts an L2 term on its kernels. Run from anywhere:

    python examples/own_model.py [LOGDIR]
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import train_loop

if TYPE_CHECKING:  # The model's type; keras itself is imported in build().
    import keras


def build() -> keras.Model:
    """Called by train_loop inside its distribution strategy's scope; returns logits, uncompiled."""
    import keras  # Here, not at the top: train_loop starts TensorFlow first, without its start-up lines.

    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(
                16, 3, activation="relu", name="conv", activity_regularizer=keras.regularizers.L2(1e-4)
            ),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(10, name="logits"),
        ],
        name="own_model",
    )


def digits_arrays() -> dict[str, np.ndarray]:
    """The four arrays train_loop takes, in the layout of Keras' MNIST."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., np.newaxis]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


if __name__ == "__main__":
    logdir = sys.argv[1] if len(sys.argv) > 1 else "logdir"
    result = train_loop.train(
        model_fn=build, data=digits_arrays(), l2=1e-4, epochs=3, logdir=logdir, run_name="own_model"
    )
    print(f"test accuracy {result['test']['accuracy']:.3f} after {result['steps']} steps")
