"""The four arrays of a data set once read: checked (one line naming the array and the fix), made
model inputs (uint8 scaled to [0, 1], a channel axis added), a validation split held out, and
their fingerprint. NumPy only: a bad array is refused before TensorFlow starts.

Memory: a run holds its inputs once, as float32, in memory TensorFlow takes as it is
(`aligned_empty`); reading uint8 images adds them for a moment (about 5x their size in all).
An allocation that fails is one line saying how much the array needs (`memory_for`).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np

from train_loop.errors import UsageError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# TensorFlow's kernels require a buffer they are handed to start at a multiple of this many bytes.
ALIGNMENT = 64


class DataError(UsageError):
    """A data set that is missing, unreadable or inconsistent; the message names the file."""


class Splits(NamedTuple):
    """Inputs as float32; labels as int32 in 0..num_classes-1 for a classifier, else targets (float32
    values to predict, `num_classes` of them per example; a user task's kept as they are, integers as int32).

    uint8 images are scaled to [0, 1], and (N, H, W) ones get a channel axis, as the study's
    MNIST; float inputs are kept as they are (float (N, H, W) may be images or sequences: the
    convnet adds the axis itself). The inputs are the run's own arrays (never a caller's),
    aligned to `ALIGNMENT` bytes, so that TensorFlow takes them without a copy.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    num_classes: int = 10  # For targets: the model's outputs per example.
    # Held out of the training split by `hold_out`; empty when there is no validation split.
    x_validation: np.ndarray | None = None
    y_validation: np.ndarray | None = None


def hold_out(splits: Splits, share: float, seed: int) -> Splits:
    """Moves a seeded `share` of the training split into a validation split.

    The examples are drawn by `seed` alone, so every worker, replica count and resumed run holds
    out the same ones; the rest keep their order. The test split is left for the end of the run.
    So that the training images are held once (a second float32 copy doubled the run's peak
    memory), the rest are moved to the front of `splits`' own training arrays, and the new
    training split is a view of that front: `splits` comes back reordered, not to be used again.

    Raises:
      UsageError: the share holds out no example at all.
      DataError: the memory for the held-out examples could not be had.
    """
    if not share:
        return splits
    count = round(share * len(splits.x_train))
    if count == 0:
        raise UsageError(
            f"--validation_split={share:g} of {len(splits.x_train)} training examples holds out none: "
            f"use at least {1 / len(splits.x_train):.2g}, or 0 for no validation split."
        )
    held = held_out_mask(len(splits.x_train), count, seed)
    kept = np.flatnonzero(~held)
    with memory_for("the validation split", splits.x_train[:count].nbytes):
        x_validation = aligned_empty(splits.x_train[:count].shape, splits.x_train.dtype)
        # "clip" (the indices are in range), since "raise" writes through a temporary copy.
        np.take(splits.x_train, np.flatnonzero(held), axis=0, out=x_validation, mode="clip")
    y_validation = splits.y_train[held]
    return splits._replace(
        x_train=_kept_in_place(splits.x_train, kept),
        y_train=_kept_in_place(splits.y_train, kept),
        x_validation=x_validation,
        y_validation=y_validation,
    )


def held_out_mask(num_examples: int, count: int, seed: int) -> np.ndarray:
    """Which of `num_examples` training examples `hold_out` moves to validation: `count` drawn by `seed`."""
    held = np.zeros(num_examples, bool)
    held[np.random.default_rng(seed).permutation(num_examples)[:count]] = True
    return held


def given_indices(splits: Splits, seed: int) -> np.ndarray:
    """For each example of the training split after `hold_out`, its index in the training
    arrays as they were given (the split that holds out none keeps them all, in order)."""
    held_count = 0 if splits.x_validation is None else len(splits.x_validation)
    return np.flatnonzero(~held_out_mask(len(splits.x_train) + held_count, held_count, seed))


def _kept_in_place(array: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """`array[kept]` for ascending `kept`, written over `array`'s first rows: the start of `array`.

    A block of rows at a time (`array[rows]` is a copy, made before the block is written), and
    every row comes from at or after where it goes, so no row is overwritten before it is read.
    """
    block = max(1, 2**24 // max(1, array[:1].nbytes))  # 16 MiB of rows at a time
    for start in range(0, len(kept), block):
        rows = kept[start : start + block]
        array[start : start + len(rows)] = array[rows]
    return array[: len(kept)]


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialized C-ordered array starting at a multiple of `ALIGNMENT` bytes (a misaligned
    buffer handed to TensorFlow aborts the process)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % ALIGNMENT
    return buffer[start : start + nbytes].view(dtype).reshape(shape)


@contextlib.contextmanager
def memory_for(name: str, nbytes: int, *, form: str = "") -> Iterator[None]:
    """A MemoryError in the block (an allocation over the process's memory limit, or more than
    the machine has) becomes one line saying how much `name` needs, instead of a traceback."""
    try:
        yield
    except MemoryError:
        raise DataError(
            f"{name} needs {nbytes / 2**30:.2f} GiB{form} and this process could not get it (the run holds its "
            "inputs once as float32, and uint8 images once more while they are read): use a smaller data set, "
            "or run where more memory is free."
        ) from None


def fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    """A digest of the arrays' names, types, shapes and bytes: what a resumed run must be given again."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes() if array.dtype.kind != "O" else repr(array.tolist()).encode())
    return digest.hexdigest()[:16]


def checked_splits(
    arrays: dict[str, np.ndarray], *, names: dict[str, str], source: str, named: bool, targets: str = "classes"
) -> Splits:
    """Checks every array (a named data set must be MNIST-shaped with labels 0..9), then converts.

    `names` says how each array is named in an error: its file, or where in a file it sits.
    `targets` is what the run's task takes (`tasks.Task.targets`): "classes" (integer class
    indices), "values" (numbers to predict, as float32) or "any" (a user task's, kept as they are).
    """
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        _check_inputs(images, names[f"x_{split}"], named=named)
        if targets != "classes":
            arrays[f"y_{split}"] = _checked_targets(
                labels, len(images), names[f"y_{split}"], floats=targets == "values"
            )
            continue
        arrays[f"y_{split}"] = _checked_labels(
            labels, len(images), names[f"y_{split}"], names[f"x_{split}"], expected="0..9" if named else "0..K-1"
        )
    x_train, y_train, x_test, y_test = (arrays[key] for key in NPZ_KEYS)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{names['x_test']}: examples of shape {x_test.shape[1:]}, but {names['x_train']} has "
            f"{x_train.shape[1:]}: both splits must hold examples of one shape."
        )
    if x_train.dtype.kind != x_test.dtype.kind:  # uint8 is scaled to [0, 1], floats are not: the splits would differ.
        raise DataError(
            f"{names['x_train']} is {x_train.dtype} but {names['x_test']} is {x_test.dtype}: uint8 images are "
            "scaled to [0, 1] and floats used as they are, so the two splits would be on different scales; "
            "give both as uint8, or both as float32 (scaled alike)."
        )
    if targets != "classes":
        width = int(np.prod(y_train.shape[1:]))
        return Splits(
            _as_inputs(x_train, names["x_train"]), y_train, _as_inputs(x_test, names["x_test"]), y_test, source, width
        )
    top = max(int(y_train.max()), int(y_test.max()))
    if named and top > 9:
        label_name = names["y_train" if y_train.max() == top else "y_test"]
        raise DataError(f"{label_name}: labels range up to {top}, expected 0..9.")
    _check_classes_supported(y_train, top + 1, names["y_train"])
    return Splits(
        _as_inputs(x_train, names["x_train"]), y_train, _as_inputs(x_test, names["x_test"]), y_test, source, top + 1
    )


def _check_inputs(images: np.ndarray, name: str, *, named: bool) -> None:
    """One example per row, at least one row, uint8 or finite floats (MNIST-shaped when `named`)."""
    if named and (images.ndim != 3 or images.shape[1:] != (28, 28)):
        raise DataError(f"{name}: images have shape {images.shape}, expected (N, 28, 28).")
    if images.ndim < 2:
        raise DataError(
            f"{name}: inputs of shape {images.shape}, one number per example; expected one example per row "
            "with at least one feature, (N, F) or (N, H, W): inputs.reshape(-1, 1) gives one feature each."
        )
    if images.dtype.kind not in "uf" or (images.dtype.kind == "u" and images.dtype != np.uint8):
        raise DataError(
            f"{name}: inputs of type {images.dtype}; expected uint8 images (scaled to [0, 1]) or floats "
            "(used as they are): convert them with inputs.astype(np.float32), scaled as the model needs."
        )
    if len(images) == 0:
        raise DataError(f"{name}: holds no examples; training and evaluation each need at least one.")
    if images.dtype.kind == "f":
        _check_finite(images, name)


def _checked_labels(labels: np.ndarray, count: int, name: str, images_name: str, *, expected: str) -> np.ndarray:
    """`labels` as int32 class indices, one per example; else DataError saying what they are instead."""
    if labels.dtype.kind not in "iuf":
        example = f" (e.g. {labels.flat[0].item()!r})" if labels.size else ""
        raise DataError(
            f"{name}: labels of type {labels.dtype}{example}; expected integer class indices "
            f"{expected}, which np.unique(labels, return_inverse=True)[1] makes from names."
        )
    if labels.ndim == 2 and labels.shape[0] == count and labels.shape[1] > 1:
        raise DataError(
            f"{name}: labels of shape {labels.shape}, one row per example (one-hot or scores); expected "
            "class indices of shape (N,): labels.argmax(axis=1) gives them."
        )
    if labels.dtype.kind == "f":  # Even whole numbers: diabetes' targets 25..346 trained a 347-class classifier.
        raise DataError(
            f"{name}: labels of type {labels.dtype}: float labels are targets (values to predict), not classes, "
            f"and the default classifier takes integer class indices {expected}; for values pass a loss that "
            "takes them (--loss=mean_squared_error, --loss=huber), or if these are classes give them as "
            "integers (labels.astype(int))."
        )
    if labels.shape == (count, 1):  # A column, as pandas and scikit-learn often give.
        raise DataError(
            f"{name}: labels of shape {labels.shape}, a column; expected class indices of shape ({count},): "
            "labels.reshape(-1) gives them."
        )
    if labels.ndim != 1 or len(labels) != count:
        raise DataError(
            f"{name}: labels of shape {labels.shape} for {count} examples in {images_name}: expected "
            f"one class index per example, shape ({count},)."
        )
    if labels.min() < 0:
        raise DataError(f"{name}: labels range over {labels.min():g}..{labels.max():g}, expected {expected}.")
    return labels.astype(np.int32)


def _checked_targets(labels: np.ndarray, count: int, name: str, *, floats: bool) -> np.ndarray:
    """`labels` as targets, one row per example: float32 values (`floats`), else as they are
    (integers as int32); else DataError saying what they are instead."""
    if labels.dtype.kind not in "iufb" or labels.ndim == 0 or len(labels) != count:
        raise DataError(
            f"{name}: labels of type {labels.dtype} and shape {labels.shape} for {count} examples; expected "
            f"numbers, one row per example: shape ({count},) or ({count}, K)."
        )
    if labels.dtype.kind == "f":
        _check_finite(labels, name)
    if floats or labels.dtype.kind == "f":
        return labels.astype(np.float32)
    return labels.astype(np.int32)


def _check_classes_supported(labels: np.ndarray, num_classes: int, name: str) -> None:
    """Most classes with fewer than 2 training examples cannot be learnt, only memorized: such
    labels are values to predict (diabetes' 25..346 on 442 examples) or ids, not classes."""
    rare = int(np.count_nonzero(np.bincount(labels, minlength=num_classes) < 2))
    if 2 * rare > num_classes:
        raise DataError(
            f"{name}: {num_classes} classes (labels 0..{num_classes - 1}) for {len(labels)} examples, and {rare} "
            "classes have fewer than 2 examples each: these look like regression targets or ids, not classes; "
            "a classifier needs several examples of most classes."
        )


def _check_finite(images: np.ndarray, name: str) -> None:
    """Non-finite inputs would show up later as a diverged loss; name them here, where they are."""
    bad = ~np.isfinite(images)
    if bad.any():
        first = tuple(int(i) for i in np.unravel_index(np.argmax(bad), images.shape))
        kinds = sorted({str(value) for value in np.unique(images[bad])})
        raise DataError(
            f"{name}: {int(bad.sum())} non-finite values ({', '.join(kinds)}), the first at index {first}; "
            "replace them (np.nan_to_num) or drop those examples."
        )


def _as_inputs(images: np.ndarray, name: str) -> np.ndarray:
    """uint8 images scaled to [0, 1], with a channel axis when they have none; floats as they are
    (as float32, in a copy of the run's own)."""
    shape = (*images.shape, 1) if images.dtype == np.uint8 and images.ndim == 3 else images.shape
    with memory_for(name, 4 * images.size, form=" as float32"):
        inputs = aligned_empty(shape, np.float32)
    if images.dtype == np.uint8:
        _divided(images, 255.0, out=inputs.reshape(images.shape))
    else:
        np.copyto(inputs, images, casting="unsafe")
    return inputs


def scaled_with_channel(images: np.ndarray, maximum: float) -> np.ndarray:
    return _divided(images, maximum, out=aligned_empty(images.shape, np.float32))[..., np.newaxis]


def _divided(images: np.ndarray, maximum: float, *, out: np.ndarray) -> np.ndarray:
    """`images.astype(float32) / maximum`, bit for bit, into `out` instead of two new arrays: for
    Fashion-MNIST's 188 MB that halved the time (0.10-0.74 s to 0.05-0.08 s, on a busy machine)."""
    return np.divide(images, np.float32(maximum), out=out, dtype=np.float32)
