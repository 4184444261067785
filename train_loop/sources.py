"""Finding, reading and validating the data sets (npz, IDX, caches, digits, synthetic): NumPy only."""

from __future__ import annotations

import gzip
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from train_loop.configs import Config
from train_loop.errors import UsageError

IDX_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# Set to skip the last resort, Keras' download (air-gapped clusters, tests).
OFFLINE_ENV = "TRAIN_LOOP_OFFLINE"
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_IDX_MAGIC = {1: 0x801, 3: 0x803}  # unsigned bytes, 1 or 3 dimensions


class DataError(UsageError):
    """A data set that is missing, unreadable or inconsistent; the message names the file."""


class Splits(NamedTuple):
    """Images as float32 in [0, 1] with a channel axis, labels as int32 in 0-9."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str


def load_splits(config: Config) -> Splits:
    """Reads `config.dataset` from the first place that has it.

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


def image_shape(dataset: str) -> tuple[int, int, int]:
    """The shape of one image of `dataset`, channel last, without reading it."""
    return (8, 8, 1) if dataset == "digits" else (28, 28, 1)


def _search_folders(config: Config) -> Iterator[str]:
    if config.data_dir:
        if not os.path.isdir(config.data_dir) or not os.access(config.data_dir, os.R_OK | os.X_OK):
            raise DataError(
                f"--data_dir={config.data_dir!r} is not a readable folder: give the folder that "
                f"holds {config.dataset}.npz or its four IDX files, or leave --data_dir empty.")
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
        return _read_npz(npz)
    paths = [_existing(os.path.join(folder, name)) for name in IDX_FILES]
    if all(paths):
        return _read_idx_set(paths, folder)
    return None


def _existing(path: str) -> str | None:
    for candidate in (path, path + ".gz"):
        if os.path.isfile(candidate):
            return candidate
    return None


def _read_npz(path: str) -> Splits:
    try:
        with open(path, "rb") as stream, np.load(stream, allow_pickle=False) as archive:
            missing = [key for key in _NPZ_KEYS if key not in archive.files]
            arrays = [archive[key] for key in _NPZ_KEYS if key in archive.files]
    except (OSError, ValueError, zlib.error, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path}: not a readable npz archive ({error}); download it again.") from None
    if missing:
        raise DataError(
            f"{path}: missing arrays {', '.join(missing)}; a Keras-layout npz holds {', '.join(_NPZ_KEYS)}.")
    return _to_splits(*arrays, source=path, names=[path] * 4)


def _read_idx_set(paths: list[str], folder: str) -> Splits:
    arrays = [_read_idx(path, ndim) for path, ndim in zip(paths, (3, 1, 3, 1))]
    return _to_splits(*arrays, source=folder, names=paths)


def _read_idx(path: str, ndim: int) -> np.ndarray:
    """Parses one IDX file (optionally gzipped): magic number, dimensions, then unsigned bytes."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: cannot be read ({error}); download it again.") from None
    header = 4 + 4 * ndim
    if len(raw) < header or struct.unpack(">I", raw[:4])[0] != _IDX_MAGIC[ndim]:
        raise DataError(
            f"{path}: bad magic number; expected an IDX file of {ndim}-dimensional unsigned bytes "
            f"(0x{_IDX_MAGIC[ndim]:08x}).")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(
            f"{path}: its header promises {'x'.join(map(str, shape))} bytes of data but it holds "
            f"{len(raw) - header}: the file is truncated or corrupt; download it again.")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _to_splits(x_train, y_train, x_test, y_test, *, source: str, names: list[str]) -> Splits:
    """Checks shapes, counts and label range, then scales pixels to [0, 1] as the study does."""
    for images, labels, image_name, label_name in (
        (x_train, y_train, names[0], names[1]), (x_test, y_test, names[2], names[3])):
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"{image_name}: images have shape {images.shape}, expected (N, 28, 28).")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(
                f"{label_name}: {labels.shape[0] if labels.ndim else 0} labels for {len(images)} "
                f"images in {image_name}: the counts must agree.")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise DataError(
                f"{label_name}: labels range over {labels.min()}..{labels.max()}, expected 0..9.")
    return Splits(_scale(x_train, 255.0), y_train.astype(np.int32),
                  _scale(x_test, 255.0), y_test.astype(np.int32), source)


def _scale(images: np.ndarray, maximum: float) -> np.ndarray:
    return (images.astype(np.float32) / maximum)[..., np.newaxis]


def _download(dataset: str, searched: list[str]) -> Splits:
    """Keras' own download, checksum included; the last resort, and one clear line when it fails."""
    places = ", ".join(searched)
    if dataset == "fashion_mnist":
        places += " (apt-get install dataset-fashion-mnist fills the last)"
    hint = (f"no {dataset} data found in {places}; "
            f"put {dataset}.npz or its four IDX files in --data_dir, or use --dataset=digits "
            "(bundled, offline)")
    if os.environ.get(OFFLINE_ENV):
        raise DataError(f"{hint}; downloading is off ({OFFLINE_ENV} is set).")
    import keras  # Imported here: only the download needs it.

    loader = keras.datasets.mnist if dataset == "mnist" else keras.datasets.fashion_mnist
    try:
        (x_train, y_train), (x_test, y_test) = loader.load_data()
    except Exception as error:  # Any failure of the download is the same user problem.
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{hint}; the download failed ({first_line}).") from None
    names = ["keras download"] * 4
    return _to_splits(x_train, y_train, x_test, y_test, source="keras download", names=names)


def _digits() -> Splits:
    """scikit-learn's bundled 8x8 digits with a fixed, stratified 80/20 split."""
    from sklearn.datasets import load_digits  # Only this data set needs scikit-learn.
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=0.2, random_state=0, stratify=digits.target)
    return Splits(_scale(x_train, 16.0), y_train.astype(np.int32),
                  _scale(x_test, 16.0), y_test.astype(np.int32), "scikit-learn digits")


def _synthetic(seed: int) -> Splits:
    """Random MNIST-shaped images and labels: for smoke tests and benchmarks, not for accuracy."""
    rng = np.random.default_rng(seed)

    def split(count: int) -> tuple[np.ndarray, np.ndarray]:
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        return _scale(images, 255.0), rng.integers(0, 10, size=count, dtype=np.int32)

    (x_train, y_train), (x_test, y_test) = split(60_000), split(10_000)
    return Splits(x_train, y_train, x_test, y_test, "synthetic")
