"""Scikit-learn's diabetes data (442 patients, 10 measurements, a disease progression score to
predict) as a Keras-layout npz, for a regression from the command line (`examples/diabetes.sh`).
The data ships with scikit-learn under its BSD 3-clause licence (Efron et al., "Least Angle
Regression", Annals of Statistics, 2004); nothing is downloaded.

    python examples/diabetes.py diabetes.npz
"""

from __future__ import annotations

import sys

import numpy as np
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split


def write_npz(path: str) -> None:
    """x_train, y_train, x_test, y_test as float32; the targets standardized by the training
    split, so that the Huber loss's delta of 1 is one standard deviation of the score."""
    features, targets = load_diabetes(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(features, targets, test_size=0.2, random_state=0)
    mean, scale = x_train.mean(axis=0), x_train.std(axis=0)
    target_mean, target_scale = y_train.mean(), y_train.std()
    np.savez(
        path,
        x_train=((x_train - mean) / scale).astype(np.float32),
        y_train=((y_train - target_mean) / target_scale).astype(np.float32),
        x_test=((x_test - mean) / scale).astype(np.float32),
        y_test=((y_test - target_mean) / target_scale).astype(np.float32),
    )


if __name__ == "__main__":
    write_npz(sys.argv[1] if len(sys.argv) > 1 else "diabetes.npz")
