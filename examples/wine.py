"""A model for scikit-learn's wine data (13 measurements, 3 cultivars), for the command line.

`build` is what `--model=examples/wine.py:build` names; run as a script, this file writes the
data as a Keras-layout npz (`examples/wine.sh` does both):

    python examples/wine.py wine.npz
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import numpy as np
from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split

if TYPE_CHECKING:  # The model's type; keras itself is imported in build().
    import keras


def build() -> keras.Model:
    """A small MLP: 13 standardized measurements in, 3 logits out."""
    import keras  # Here, not at the top: train_loop starts TensorFlow first, without its start-up lines.

    return keras.Sequential(
        [
            keras.Input((13,)),
            keras.layers.Dense(32, activation="relu", name="hidden"),
            keras.layers.Dense(3, name="logits"),
        ],
        name="wine",
    )


def write_npz(path: str) -> None:
    """x_train, y_train, x_test, y_test, float32 measurements standardized by the training split."""
    features, labels = load_wine(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.25, random_state=0, stratify=labels
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    np.savez(
        path,
        x_train=((x_train - mean) / std).astype(np.float32),
        y_train=y_train,
        x_test=((x_test - mean) / std).astype(np.float32),
        y_test=y_test,
    )


if __name__ == "__main__":
    write_npz(sys.argv[1])
