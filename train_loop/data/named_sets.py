"""Finding a named data set: the bundled digits, synthetic images, MNIST or Fashion-MNIST in the
first folder that holds them (an npz or the IDX files), else Keras' download; NumPy only."""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Iterator

import numpy as np

from train_loop.configs import Config
from train_loop.data.arrays import NPZ_KEYS, DataError, Splits, checked_splits, scaled_with_channel
from train_loop.data.idx import IDX_FILES, read_idx_set
from train_loop.data.npz import read_npz

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# Set to skip the last resort, Keras' download (air-gapped clusters, tests).
OFFLINE_ENV = "TRAIN_LOOP_OFFLINE"


def read_named_set(config: Config) -> Splits:
    """`config.dataset`, a named data set, from the first place that has it.

    Raises:
      DataError: the data is nowhere to be found, or a file that holds it is corrupt.
    """
    if config.dataset == "digits":
        return _digits()
    if config.dataset == "synthetic":
        return _synthetic(config.seed)
    folders = list(_search_folders(config))
    for folder in folders:
        found = _read_folder(folder, config.dataset)
        if found is not None:
            return found
    return _download(config.dataset, folders)


def _search_folders(config: Config) -> Iterator[str]:
    if config.data_dir:
        if not os.path.isdir(config.data_dir) or not os.access(config.data_dir, os.R_OK | os.X_OK):
            raise DataError(
                f"--data_dir={config.data_dir!r} is not a readable folder: give the folder that "
                f"holds {config.dataset}.npz or its four IDX files, or leave --data_dir empty."
            )
        yield config.data_dir
    keras_datasets = os.path.join(_keras_home(), "datasets")
    yield keras_datasets
    if config.dataset == "fashion_mnist":
        yield os.path.join(keras_datasets, "fashion-mnist")
        yield DEBIAN_FASHION_MNIST


def _keras_home() -> str:
    return os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))


def _read_folder(folder: str, dataset: str) -> Splits | None:
    """The data set from `folder` if it holds it, else None; corrupt files raise DataError."""
    npz = os.path.join(folder, f"{dataset}.npz")
    if os.path.isfile(npz):
        return read_npz(npz, named=True)
    paths = [_existing(os.path.join(folder, name)) for name in IDX_FILES]
    if all(paths):
        return read_idx_set(paths, folder, dataset)
    if any(paths):  # Half a data set is a mistake to name, not a reason to download another copy.
        missing = [name for name, path in zip(IDX_FILES, paths) if path is None]
        raise DataError(
            f"{folder} holds only some of the four {dataset} IDX files: {', '.join(missing)} (or .gz) "
            f"missing; add them, or put {dataset}.npz there."
        )
    return None


def _existing(path: str) -> str | None:
    for candidate in (path, path + ".gz"):
        if os.path.isfile(candidate):
            return candidate
    return None


def _download(dataset: str, searched: list[str]) -> Splits:
    """Keras' own download, checksum included; the last resort, and one clear line when it fails."""
    places = ", ".join(searched)
    if dataset == "fashion_mnist":
        places += " (apt-get install dataset-fashion-mnist fills the last)"
    hint = (
        f"no {dataset} data found in {places}; "
        f"put {dataset}.npz or its four IDX files in --data_dir, or use --dataset=digits "
        "(bundled, offline)"
    )
    if os.environ.get(OFFLINE_ENV):
        raise DataError(f"{hint}; downloading is off ({OFFLINE_ENV} is set).")
    import keras  # Imported here: only the download needs it.

    loader = keras.datasets.mnist if dataset == "mnist" else keras.datasets.fashion_mnist
    try:
        (x_train, y_train), (x_test, y_test) = loader.load_data()
    except Exception as error:  # Any failure of the download is the same user problem.
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{hint}; the download failed ({first_line}).") from None
    arrays = dict(zip(NPZ_KEYS, (x_train, y_train, x_test, y_test)))
    return checked_splits(
        arrays, names={key: f"{key} of the keras download" for key in NPZ_KEYS}, source="keras download", named=True
    )


def _digits() -> Splits:
    """The bundled 8x8 digits (UCI, CC BY 4.0; see data/DIGITS.md), already split 80/20: the
    split scikit-learn gives, shipped so that this data set needs no scikit-learn and SciPy."""
    with importlib.resources.files("train_loop").joinpath("data", "digits.npz").open("rb") as stream:
        arrays = dict(np.load(stream))
    return Splits(
        scaled_with_channel(arrays["x_train"], 16.0),
        arrays["y_train"].astype(np.int32),
        scaled_with_channel(arrays["x_test"], 16.0),
        arrays["y_test"].astype(np.int32),
        "bundled UCI digits",
    )


def _synthetic(seed: int) -> Splits:
    """Random MNIST-shaped images and labels: for smoke tests and benchmarks, not for accuracy."""
    rng = np.random.default_rng(seed)

    def split(count: int) -> tuple[np.ndarray, np.ndarray]:
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        return scaled_with_channel(images, 255.0), rng.integers(0, 10, size=count, dtype=np.int32)

    (x_train, y_train), (x_test, y_test) = split(60_000), split(10_000)
    return Splits(x_train, y_train, x_test, y_test, "synthetic")
