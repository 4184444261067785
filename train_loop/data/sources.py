"""Finding and reading the data sets (npz, IDX, caches, digits, synthetic, the user's arrays):
NumPy only. What is read is checked and made inputs by `arrays`."""

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

import numpy as np

from train_loop import files
from train_loop.configs import ARRAYS_PREFIX, DATASETS, Config
from train_loop.data.arrays import (
    NPZ_KEYS,
    DataError,
    Splits,
    checked_splits,
    fingerprint,
    memory_for,
    scaled_with_channel,
)

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# Set to skip the last resort, Keras' download (air-gapped clusters, tests).
OFFLINE_ENV = "TRAIN_LOOP_OFFLINE"
# A folder for decoded IDX sets, or "off" to decode every time (default: the user's cache folder).
DATA_CACHE_ENV = "TRAIN_LOOP_DATA_CACHE"
_DATA_CACHE_FORMAT = 1  # Bumped when what the cache holds changes, so older files are not read.
_IDX_MAGIC = {1: 0x801, 3: 0x803}  # unsigned bytes, 1 or 3 dimensions


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


def _given_arrays(dataset: str, arrays: Mapping[str, np.ndarray] | None) -> Splits:
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
    )


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
        return _read_npz(npz, named=True)
    paths = [_existing(os.path.join(folder, name)) for name in IDX_FILES]
    if all(paths):
        return _read_idx_set(paths, folder, dataset)
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


def _read_npz(path: str, *, named: bool) -> Splits:
    """A Keras-layout npz: MNIST-shaped for a named data set, any shape and classes otherwise.

    Only a regular file is opened (a FIFO would block the open), and only a zip is handed to
    NumPy: anything else it would take for a pickle, and advise loading unsafely.
    """
    fix = "download it again" if named else "write it again with np.savez"
    try:
        with files.open_regular(path) as stream:
            if not zipfile.is_zipfile(stream):
                raise DataError(f"{path}: not an npz archive (a zip of .npy files); {fix}.")
            stream.seek(0)
            with np.load(stream, allow_pickle=False) as archive:
                missing = [key for key in NPZ_KEYS if key not in archive.files]
                arrays = {key: _read_npz_array(archive, key, path, fix) for key in NPZ_KEYS if key in archive.files}
    except FileNotFoundError:
        raise DataError(f"--dataset={path}: no such file (a path is taken from {os.getcwd()}).") from None
    except OSError as error:  # A FIFO, a device, a folder, no permission: the error says which.
        raise DataError(f"--dataset={path}: cannot be read ({error.strerror}); give an .npz file.") from None
    except (zlib.error, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path}: not a readable npz archive ({error}); {fix}.") from None
    if missing:
        raise DataError(f"{path}: missing arrays {', '.join(missing)}; a Keras-layout npz holds {', '.join(NPZ_KEYS)}.")
    return checked_splits(arrays, names={key: f"{key} in {path}" for key in NPZ_KEYS}, source=path, named=named)


def _read_npz_array(archive: np.lib.npyio.NpzFile, key: str, path: str, fix: str) -> np.ndarray:
    """One array of the archive; NumPy's own message for a pickled one would advise loading it unsafely."""
    member = next(info for info in archive.zip.infolist() if info.filename in (key, f"{key}.npy"))
    with memory_for(f"{key} in {path}", member.file_size):  # Outside the `try`: its DataError is a ValueError.
        try:
            return archive[key]
        except ValueError:
            raise DataError(
                f"{key} in {path}: not an array of numbers (Python objects, which are never unpickled, or a "
                f"damaged .npy); {fix}."
            ) from None


def _read_idx_set(paths: list[str], folder: str, dataset: str) -> Splits:
    """The four IDX files, decoded once and kept in the user's cache when gzipped: reading
    Fashion-MNIST's took 0.27-0.31 s of CPU per run, hashing them and loading the cached arrays
    0.08 s (both with the scaling to float32).

    A cache must never fail a run: an unreadable or damaged one is decoded again, and one that
    cannot be written is left alone.
    """
    names = dict(zip(NPZ_KEYS, paths))
    cache = _decoded_cache_path(paths, dataset)
    cached = _read_decoded_cache(cache)
    if cached is not None:
        with contextlib.suppress(DataError):  # Arrays that fail the checks are a damaged cache.
            return checked_splits(cached, names=names, source=folder, named=True)
    arrays = {key: _read_idx(path, ndim) for key, path, ndim in zip(NPZ_KEYS, paths, (3, 1, 3, 1))}
    splits = checked_splits(arrays, names=names, source=folder, named=True)
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
        with files.open_regular(path) as stream, np.load(stream, allow_pickle=False) as archive:
            return {key: archive[key] for key in NPZ_KEYS}
    except (OSError, ValueError, KeyError, EOFError, zlib.error, zipfile.BadZipFile):
        return None


def _write_decoded_cache(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Uncompressed (loading it is the point), through a temporary name, so a killed run leaves no
    half-written cache; never over a FIFO or a device."""
    files.replace_quietly(path, lambda stream: np.savez(stream, **arrays))


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
            f"(0x{_IDX_MAGIC[ndim]:08x})."
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(
            f"{path}: its header promises {'x'.join(map(str, shape))} bytes of data but it holds "
            f"{len(raw) - header}: the file is truncated or corrupt; download it again."
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


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
