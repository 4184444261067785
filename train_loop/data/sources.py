"""Where a run's data comes from: a named data set (`named_sets`), an .npz path (`npz`) or the
user's arrays; NumPy only. What is read is checked and made inputs by `arrays`."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from train_loop.configs import Config
from train_loop.data.arrays import NPZ_KEYS, DataError, Splits, checked_splits, fingerprint
from train_loop.data.named_sets import read_named_set
from train_loop.data.npz import read_npz
from train_loop.settings import ARRAYS_PREFIX, DATASETS


def load_splits(config: Config, arrays: Mapping[str, np.ndarray] | None = None, *, targets: str = "classes") -> Splits:
    """Reads `config.dataset` from the first place that has it, or checks the user's `arrays`.

    `arrays` (the four Keras-layout arrays) go with a `config.dataset` of `arrays:<fingerprint>`,
    which is what `train_loop.train(data=...)` records. `targets` is what the labels must be for
    the run's task (see `arrays.checked_splits`); a named data set's digits 0..9 are taken as
    values too, as float32.

    Raises:
      DataError: the data is nowhere to be found, or a file or array that holds it is corrupt.
    """
    if config.dataset.startswith(ARRAYS_PREFIX) or arrays is not None:
        return _given_arrays(config.dataset, arrays, targets)
    if config.dataset.endswith(".npz"):
        return read_npz(config.dataset, named=False, targets=targets)
    splits = read_named_set(config)
    if targets != "values":
        return splits
    return splits._replace(
        y_train=splits.y_train.astype(np.float32), y_test=splits.y_test.astype(np.float32), num_classes=1
    )


def class_names(dataset: str) -> tuple[str, ...]:
    """The labels' names, for a data set whose labels are not the digits they stand for; else ()."""
    return _CLASS_NAMES.get(dataset, ())


_CLASS_NAMES = {
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),  # Zalando's labels, in order
}


def input_spec(config: Config) -> tuple[tuple[int, ...], int]:
    """One example's shape and the number of classes; a named data set is not read for them."""
    if config.dataset in DATASETS:
        return ((8, 8, 1) if config.dataset == "digits" else (28, 28, 1)), 10
    splits = load_splits(config)
    return splits.x_train.shape[1:], splits.num_classes


def _given_arrays(dataset: str, arrays: Mapping[str, np.ndarray] | None, targets: str) -> Splits:
    if arrays is None or dataset != ARRAYS_PREFIX + fingerprint(arrays):
        raise DataError(
            f"--dataset={dataset!r} names arrays given to train_loop.train(data=...); give the same "
            "arrays again, or a data set name or an .npz path."
        )
    missing = [key for key in NPZ_KEYS if key not in arrays]
    if missing:
        raise DataError(
            f"{', '.join(f'data[{key!r}]' for key in missing)} missing: train_loop.train(data=...) takes a mapping of "
            f"{', '.join(NPZ_KEYS)} (or an .npz path)."
        )
    return checked_splits(
        {key: np.asarray(arrays[key]) for key in NPZ_KEYS},
        names={key: f"data[{key!r}]" for key in NPZ_KEYS},
        source="data",
        named=False,
        targets=targets,
    )
