"""Reading a Keras-layout npz (`x_train`, `y_train`, `x_test`, `y_test`), a user's or a named
data set's, safely: only a regular file, only a zip, never a pickle; checked by `arrays`."""

from __future__ import annotations

import os
import zipfile
import zlib

import numpy as np

from train_loop import files
from train_loop.data.arrays import NPZ_KEYS, DataError, Splits, checked_splits, memory_for


def read_npz(path: str, *, named: bool, targets: str = "classes") -> Splits:
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
    names = {key: f"{key} in {path}" for key in NPZ_KEYS}
    return checked_splits(arrays, names=names, source=path, named=named, targets=targets)


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
