"""Finding, reading and validating the data sets (npz, IDX, caches, digits, synthetic): NumPy only."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.resources
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np

from train_loop import regular_files
from train_loop.configs import ARRAYS_PREFIX, DATASETS, Config
from train_loop.errors import UsageError

IDX_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# Set to skip the last resort, Keras' download (air-gapped clusters, tests).
OFFLINE_ENV = "TRAIN_LOOP_OFFLINE"
# A folder for decoded IDX sets, or "off" to decode every time (default: the user's cache folder).
DATA_CACHE_ENV = "TRAIN_LOOP_DATA_CACHE"
_DATA_CACHE_FORMAT = 1  # Bumped when what the cache holds changes, so older files are not read.
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_IDX_MAGIC = {1: 0x801, 3: 0x803}  # unsigned bytes, 1 or 3 dimensions


class DataError(UsageError):
    """A data set that is missing, unreadable or inconsistent; the message names the file."""


class Splits(NamedTuple):
    """Inputs as float32, labels as int32 in 0..num_classes-1.

    uint8 images are scaled to [0, 1], and (N, H, W) ones get a channel axis, as the study's
    MNIST; float inputs are kept as they are.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    num_classes: int = 10
    # Held out of the training split by `hold_out`; empty when there is no validation split.
    x_validation: np.ndarray | None = None
    y_validation: np.ndarray | None = None


def load_splits(config: Config, arrays: Mapping[str, np.ndarray] | None = None) -> Splits:
    """Reads `config.dataset` from the first place that has it, or checks the user's `arrays`.

    `arrays` (the four Keras-layout arrays) go with a `config.dataset` of `arrays:<fingerprint>`,
    which is what `train_loop.train(data=...)` records.

    Raises:
      DataError: the data is nowhere to be found, or a file or array that holds it is corrupt.
    """
    if config.dataset.startswith(ARRAYS_PREFIX) or arrays is not None:
        return _given_arrays(config.dataset, arrays)
    if config.dataset.endswith(".npz"):
        return _read_npz(config.dataset, named=False)
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


def class_names(dataset: str) -> tuple[str, ...]:
    """The labels' names, for a data set whose labels are not the digits they stand for; else ()."""
    return _CLASS_NAMES.get(dataset, ())


_CLASS_NAMES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),  # Zalando's labels, in order
}


def hold_out(splits: Splits, share: float, seed: int) -> Splits:
    """Moves a seeded `share` of the training split into a validation split.

    The examples are drawn by `seed` alone, so every worker, replica count and resumed run holds
    out the same ones; the rest keep their order. The test split is left for the end of the run.

    Raises:
      UsageError: the share holds out no example at all.
    """
    if not share:
        return splits
    count = round(share * len(splits.x_train))
    if count == 0:
        raise UsageError(
            f"--validation_split={share:g} of {len(splits.x_train)} training examples holds out none: "
            f"use at least {1 / len(splits.x_train):.2g}, or 0 for no validation split.")
    held = np.zeros(len(splits.x_train), bool)
    held[np.random.default_rng(seed).permutation(len(held))[:count]] = True
    return splits._replace(x_train=splits.x_train[~held], y_train=splits.y_train[~held],
                           x_validation=splits.x_train[held], y_validation=splits.y_train[held])


def input_spec(config: Config) -> tuple[tuple[int, ...], int]:
    """One example's shape and the number of classes; a named data set is not read for them."""
    if config.dataset in DATASETS:
        return ((8, 8, 1) if config.dataset == "digits" else (28, 28, 1)), 10
    splits = load_splits(config)
    return splits.x_train.shape[1:], splits.num_classes


def fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    """A digest of the arrays' names, types, shapes and bytes: what a resumed run must be given again."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes() if array.dtype.kind != "O" else repr(array.tolist()).encode())
    return digest.hexdigest()[:16]


def _given_arrays(dataset: str, arrays: Mapping[str, np.ndarray] | None) -> Splits:
    if arrays is None or dataset != ARRAYS_PREFIX + fingerprint(arrays):
        raise DataError(
            f"--dataset={dataset!r} names arrays given to train_loop.train(data=...); give the same "
            "arrays again, or a data set name or an .npz path.")
    missing = [key for key in _NPZ_KEYS if key not in arrays]
    if missing:
        raise DataError(
            f"{', '.join(f'data[{key!r}]' for key in missing)} missing: train_loop.train(data=...) takes a mapping of "
            f"{', '.join(_NPZ_KEYS)} (or an .npz path).")
    return _checked_splits({key: np.asarray(arrays[key]) for key in _NPZ_KEYS},
                           names={key: f"data[{key!r}]" for key in _NPZ_KEYS}, source="data", named=False)


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
        return _read_npz(npz, named=True)
    paths = [_existing(os.path.join(folder, name)) for name in IDX_FILES]
    if all(paths):
        return _read_idx_set(paths, folder, dataset)
    if any(paths):  # Half a data set is a mistake to name, not a reason to download another copy.
        missing = [name for name, path in zip(IDX_FILES, paths) if path is None]
        raise DataError(
            f"{folder} holds only some of the four {dataset} IDX files: {', '.join(missing)} (or .gz) "
            f"missing; add them, or put {dataset}.npz there.")
    return None


def _existing(path: str) -> str | None:
    for candidate in (path, path + ".gz"):
        if os.path.isfile(candidate):
            return candidate
    return None


def _read_npz(path: str, *, named: bool) -> Splits:
    """A Keras-layout npz: MNIST-shaped for a named data set, any shape and classes otherwise."""
    if not named and not os.path.isfile(path):
        raise DataError(f"--dataset={path}: no such file (a path is taken from {os.getcwd()}).")
    try:
        with open(path, "rb") as stream, np.load(stream, allow_pickle=False) as archive:
            missing = [key for key in _NPZ_KEYS if key not in archive.files]
            arrays = [archive[key] for key in _NPZ_KEYS if key in archive.files]
    except (OSError, ValueError, zlib.error, EOFError, zipfile.BadZipFile) as error:
        fix = "download it again" if named else "write it again with np.savez"
        raise DataError(f"{path}: not a readable npz archive ({error}); {fix}.") from None
    if missing:
        raise DataError(
            f"{path}: missing arrays {', '.join(missing)}; a Keras-layout npz holds {', '.join(_NPZ_KEYS)}.")
    return _checked_splits(dict(zip(_NPZ_KEYS, arrays)), names={key: f"{key} in {path}" for key in _NPZ_KEYS},
                           source=path, named=named)


def _read_idx_set(paths: list[str], folder: str, dataset: str) -> Splits:
    """The four IDX files, decoded once and kept in the user's cache when gzipped: reading
    Fashion-MNIST's took 0.27-0.31 s of CPU per run, hashing them and loading the cached arrays
    0.08 s (both with the scaling to float32).

    A cache must never fail a run: an unreadable or damaged one is decoded again, and one that
    cannot be written is left alone.
    """
    names = dict(zip(_NPZ_KEYS, paths))
    cache = _decoded_cache_path(paths, dataset)
    cached = _read_decoded_cache(cache)
    if cached is not None:
        with contextlib.suppress(DataError):  # Arrays that fail the checks are a damaged cache.
            return _checked_splits(cached, names=names, source=folder, named=True)
    arrays = {key: _read_idx(path, ndim) for key, path, ndim in zip(_NPZ_KEYS, paths, (3, 1, 3, 1))}
    splits = _checked_splits(arrays, names=names, source=folder, named=True)
    if cache:
        _write_decoded_cache(cache, arrays)
    return splits


def user_cache_folder() -> str:
    """train_loop's folder in the user's cache (`$XDG_CACHE_HOME/train_loop`, else `~/.cache/train_loop`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "train_loop")


def _decoded_cache_path(paths: list[str], dataset: str) -> str | None:
    """Where the decoded arrays of these gzipped files are kept, named by a digest of their bytes
    (hashing them takes a tenth of un-gzipping them, and no changed file can hit an old entry);
    None when the cache is off or the files are not gzipped (reading those is decoding them)."""
    folder = os.environ.get(DATA_CACHE_ENV, "") or user_cache_folder()
    if folder.lower() == "off" or not any(path.endswith(".gz") for path in paths):
        return None
    digest = hashlib.sha256(str(_DATA_CACHE_FORMAT).encode())
    try:
        for path in paths:
            with open(path, "rb") as stream:
                digest.update(stream.read())
    except OSError:
        return None  # Decoding names the file that cannot be read.
    return os.path.join(folder, f"{dataset}-{digest.hexdigest()[:16]}.npz")


def _read_decoded_cache(path: str | None) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when there are none or they cannot be read (npz checks each
    array's CRC, so flipped bytes read as damaged too; a FIFO or a device is not read at all)."""
    if path is None:
        return None
    try:
        with regular_files.open_regular(path) as stream, np.load(stream, allow_pickle=False) as archive:
            return {key: archive[key] for key in _NPZ_KEYS}
    except (OSError, ValueError, KeyError, EOFError, zlib.error, zipfile.BadZipFile):
        return None


def _write_decoded_cache(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Uncompressed (loading it is the point), through a temporary name, so a killed run leaves no
    half-written cache; never over a FIFO or a device."""
    regular_files.replace_quietly(path, lambda stream: np.savez(stream, **arrays))


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


def _checked_splits(arrays: dict[str, np.ndarray], *, names: dict[str, str], source: str,
                    named: bool) -> Splits:
    """Checks every array (a named data set must be MNIST-shaped with labels 0..9), then converts.

    `names` says how each array is named in an error: its file, or where in a file it sits.
    """
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        _check_inputs(images, names[f"x_{split}"], named=named)
        arrays[f"y_{split}"] = _checked_labels(
            labels, len(images), names[f"y_{split}"], names[f"x_{split}"], expected="0..9" if named else "0..K-1")
    x_train, y_train, x_test, y_test = (arrays[key] for key in _NPZ_KEYS)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{names['x_test']}: examples of shape {x_test.shape[1:]}, but {names['x_train']} has "
            f"{x_train.shape[1:]}: both splits must hold examples of one shape.")
    top = max(int(y_train.max()), int(y_test.max()))
    if named and top > 9:
        label_name = names["y_train" if y_train.max() == top else "y_test"]
        raise DataError(f"{label_name}: labels range up to {top}, expected 0..9.")
    return Splits(_as_inputs(x_train), y_train, _as_inputs(x_test), y_test, source, top + 1)


def _check_inputs(images: np.ndarray, name: str, *, named: bool) -> None:
    """One example per row, at least one row, uint8 or finite floats (MNIST-shaped when `named`)."""
    if named and (images.ndim != 3 or images.shape[1:] != (28, 28)):
        raise DataError(f"{name}: images have shape {images.shape}, expected (N, 28, 28).")
    if images.ndim < 2 or images.dtype.kind not in "uf" or (images.dtype.kind == "u" and images.dtype != np.uint8):
        raise DataError(
            f"{name}: inputs of shape {images.shape} and type {images.dtype}; expected one example "
            "per row, (N, ...), as uint8 images (scaled to [0, 1]) or floats (used as they are).")
    if len(images) == 0:
        raise DataError(f"{name}: holds no examples; training and evaluation each need at least one.")
    if images.dtype.kind == "f":
        _check_finite(images, name, "values")


def _checked_labels(labels: np.ndarray, count: int, name: str, images_name: str, *, expected: str) -> np.ndarray:
    """`labels` as int32 class indices, one per example; else DataError saying what they are instead."""
    if labels.dtype.kind not in "iuf":
        example = f" (e.g. {labels.flat[0].item()!r})" if labels.size else ""
        raise DataError(
            f"{name}: labels of type {labels.dtype}{example}; expected integer class indices "
            f"{expected}, which np.unique(labels, return_inverse=True)[1] makes from names.")
    if labels.ndim == 2 and labels.shape[0] == count and labels.shape[1] > 1:
        raise DataError(
            f"{name}: labels of shape {labels.shape}, one row per example (one-hot or scores); expected "
            "class indices of shape (N,): labels.argmax(axis=1) gives them.")
    if labels.ndim != 1 or len(labels) != count:
        raise DataError(
            f"{name}: labels of shape {labels.shape} for {count} examples in {images_name}: expected "
            f"one class index per example, shape ({count},).")
    if labels.dtype.kind == "f":
        _check_finite(labels, name, "labels")
        fractional = np.flatnonzero(labels != np.round(labels))
        if fractional.size:
            raise DataError(
                f"{name}: {fractional.size} labels are not whole numbers (e.g. {labels[fractional[0]]} "
                f"at index {fractional[0]}); expected class indices {expected}.")
    if labels.min() < 0:
        raise DataError(f"{name}: labels range over {labels.min():g}..{labels.max():g}, expected {expected}.")
    return labels.astype(np.int32)


def _check_finite(array: np.ndarray, name: str, what: str) -> None:
    """Non-finite data would show up later as a diverged loss; name it here, where it is."""
    bad = ~np.isfinite(array)
    if bad.any():
        first = tuple(int(i) for i in np.unravel_index(np.argmax(bad), array.shape))
        kinds = sorted({str(value) for value in np.unique(array[bad])})
        fix = "drop those examples" if what == "labels" else "replace them (np.nan_to_num) or drop those examples"
        raise DataError(
            f"{name}: {int(bad.sum())} non-finite {what} ({', '.join(kinds)}), the first at index "
            f"{first[0] if len(first) == 1 else first}; {fix}.")


def _as_inputs(images: np.ndarray) -> np.ndarray:
    """uint8 images scaled to [0, 1], with a channel axis when they have none; floats as they are."""
    if images.dtype != np.uint8:
        return images.astype(np.float32)
    return _scale(images, 255.0) if images.ndim == 3 else _divided(images, 255.0)


def _scale(images: np.ndarray, maximum: float) -> np.ndarray:
    return _divided(images, maximum)[..., np.newaxis]


def _divided(images: np.ndarray, maximum: float) -> np.ndarray:
    """`images.astype(float32) / maximum`, bit for bit, in one float32 array instead of two: for
    Fashion-MNIST's 188 MB that halved the time (0.10-0.74 s to 0.05-0.08 s, on a busy machine)."""
    return np.divide(images, np.float32(maximum), dtype=np.float32)


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
    arrays = dict(zip(_NPZ_KEYS, (x_train, y_train, x_test, y_test)))
    return _checked_splits(arrays, names={key: f"{key} of the keras download" for key in _NPZ_KEYS},
                           source="keras download", named=True)


def _digits() -> Splits:
    """The bundled 8x8 digits (UCI, CC BY 4.0; see data/DIGITS.md), already split 80/20: the
    split scikit-learn gives, shipped so that this data set needs no scikit-learn and SciPy."""
    with importlib.resources.files("train_loop").joinpath("data", "digits.npz").open("rb") as stream:
        arrays = dict(np.load(stream))
    return Splits(_scale(arrays["x_train"], 16.0), arrays["y_train"].astype(np.int32),
                  _scale(arrays["x_test"], 16.0), arrays["y_test"].astype(np.int32), "bundled UCI digits")


def _synthetic(seed: int) -> Splits:
    """Random MNIST-shaped images and labels: for smoke tests and benchmarks, not for accuracy."""
    rng = np.random.default_rng(seed)

    def split(count: int) -> tuple[np.ndarray, np.ndarray]:
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        return _scale(images, 255.0), rng.integers(0, 10, size=count, dtype=np.int32)

    (x_train, y_train), (x_test, y_test) = split(60_000), split(10_000)
    return Splits(x_train, y_train, x_test, y_test, "synthetic")
