"""`--dataset=tfrecord:FOLDER`: `FOLDER/train*.tfrecord*` and `FOLDER/test*.tfrecord*`, each record
a `tf.train.Example` with an `image` (PNG or JPEG bytes) and an integer `label`, as a `streams`
input function yielding `(image, label)`: the image as float32 in [0, 1] with its channel axis,
the label as int32, as the in-memory sets.

Every file is read once at the start, before anything is written: its records are counted (an
epoch's length), their checksums checked (a damaged record is named by file and index) and its
labels' largest taken (the classes); its first record is parsed in full (a missing feature).

The validation split is held out of the training files' records by position: with
`--validation_split=s`, record i (counted over the files in name order) is held out when
floor((i + 1) s) > floor(i s), evenly spread, the same in every run and on every worker.

`write_shards` writes arrays in this layout (the example `tfrecord_shards.py` and the bench use it).
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np
import tensorflow as tf

from train_loop.data.streams import Stream, first_shapes
from train_loop.errors import UsageError
from train_loop.settings import TFRECORD_PREFIX
from train_loop.user_code import one_line

_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}
_SCAN_BATCH = 4096  # Records read at once while counting; a damaged batch is read again one by one.
_INTERLEAVED = 4  # Training files read at once, for mixing beyond the shuffle buffer.
_SHARE_SCALE = 1 << 20  # Exact for 2**43 records in int64.
_DECODE_CALLS = 2  # Images decoded in parallel (in order: the stream stays deterministic).


def open_folder(folder: str, *, validation_split: float, deterministic: bool, targets: str = "classes") -> Stream:
    """The TFRecord folder as a checked `Stream`; sharded by file over several workers unless
    `deterministic` (by example then, so that the global batches are one device's). Its labels are
    classes 0 to the largest label of every file, or for a loss that takes values (`targets`, see
    `tasks.Task`), one value each.

    Raises:
      UsageError: a pattern matches no file, a record is damaged or lacks a feature.
    """
    name = f"--dataset={TFRECORD_PREFIX}{folder}"
    files = {split: _files(name, folder, split) for split in ("train", "test")}
    counts, largest = {}, 0
    for paths in files.values():
        for path in paths:
            counts[path], file_largest = _scan(name, path)
            largest = max(largest, file_largest)
    train_total = sum(counts[path] for path in files["train"])
    held_out = _held_out_count(name, train_total, validation_split)
    input_fn = _input_fn(files, counts, validation_split=validation_split, by_file=not deterministic)
    return Stream(
        name,
        input_fn,
        {
            "train": train_total - held_out,
            **({"validation": held_out} if held_out else {}),
            "test": sum(counts[path] for path in files["test"]),
        },
        first_shapes(name, input_fn("test", tf.distribute.InputContext()), "test"),
        num_classes=largest + 1 if targets == "classes" else 1,
        fingerprint="".join(_file_fingerprint(path) for paths in files.values() for path in paths),
        shards_by_file=not deterministic,
    )


def _files(name: str, folder: str, split: str) -> list[str]:
    pattern = os.path.join(folder, f"{split}*.tfrecord*")
    paths = sorted(path for path in glob.glob(pattern) if os.path.isfile(path))
    if not paths:
        raise UsageError(
            f"{name}: no file matches {pattern}; the folder holds train*.tfrecord* and test*.tfrecord* shards "
            "(see docs/streams.md for how to write them)."
        )
    return paths


def _scan(name: str, path: str) -> tuple[int, int]:
    """The records of `path` and their largest label, every checksum checked.

    Raises:
      UsageError: a record is damaged (which one is found by reading the failed batch one by one),
        or the first one lacks a feature.
    """
    _check_features(name, path)
    count, largest = 0, 0
    batches = tf.data.TFRecordDataset(path).batch(_SCAN_BATCH)
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator, None)
        except tf.errors.OpError:
            raise _damaged(name, path, count) from None
        if batch is None:
            return count, largest
        labels = tf.io.parse_example(batch, {"label": _FEATURES["label"]})["label"]
        count, largest = count + len(batch), max(largest, int(tf.reduce_max(labels)))


def _damaged(name: str, path: str, start: int) -> UsageError:
    """The line for a damaged record at or after record `start` of `path`, found by reading on."""
    index = start
    try:
        for _ in tf.data.TFRecordDataset(path).skip(start):
            index += 1
    except tf.errors.OpError as error:
        return UsageError(
            f"{name}: {path} is damaged at record {index} (counting from 0; {_reason(error)}); the records "
            "after it cannot be read: write the file again, or move it out of the folder."
        )
    return UsageError(f"{name}: {path} could not be read past record {start}; write the file again.")


def _reason(error: tf.errors.OpError) -> str:
    """TensorFlow's message without the op that failed ("{{function_node ...}}", "[Op:...]")."""
    return re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:.*$", "", error.message.splitlines()[0]) or type(error).__name__


def _check_features(name: str, path: str) -> None:
    """Parses the file's first record in full and decodes its image."""
    try:
        first = next(iter(tf.data.TFRecordDataset(path).take(1)), None)
    except tf.errors.OpError:
        raise _damaged(name, path, 0) from None
    if first is None:
        raise UsageError(f"{name}: {path} holds no record; remove it, or write it again.")
    try:
        example = tf.train.Example.FromString(first.numpy())
    except Exception as error:  # The protocol buffer's own parse error: what the bytes are is unknown.
        raise UsageError(f"{name}: record 0 of {path} is not a tf.train.Example ({one_line(error)}).") from None
    found = example.features.feature
    for feature, kind in (("image", "bytes_list"), ("label", "int64_list")):
        if feature not in found or found[feature].WhichOneof("kind") != kind:
            raise UsageError(
                f"{name}: record 0 of {path} has no {kind} feature {feature!r} (it has: "
                f"{', '.join(sorted(found)) or 'none'}); each record needs image (PNG or JPEG bytes) and label "
                "(an integer)."
            )


def _input_fn(files: dict[str, list[str]], counts: dict[str, int], *, validation_split: float, by_file: bool):
    """The folder's input function (see `streams.InputFunction`)."""
    starts, total = {}, 0
    for path in files["train"]:
        starts[path], total = total, total + counts[path]
    held_out = total * _share_step(validation_split) // _SHARE_SCALE

    def input_fn(split: str, context: tf.distribute.InputContext) -> tf.data.Dataset | None:
        if split == "validation" and not held_out:
            return None
        paths = files["test" if split == "test" else "train"]
        if split == "train" and by_file and context.num_input_pipelines > 1:
            if len(paths) < context.num_input_pipelines:
                raise UsageError(
                    f"{len(paths)} training files for {context.num_input_pipelines} workers: sharding by file "
                    "needs a file for each worker; write more shards, or pass --deterministic (sharding by example)."
                )
            paths = paths[context.input_pipeline_id :: context.num_input_pipelines]
        keep = None if split == "test" or not held_out else split == "validation"
        records = _records(paths, [starts.get(path, 0) for path in paths], validation_split, keep=keep)
        return records.map(_decode, num_parallel_calls=_DECODE_CALLS, deterministic=True)

    return input_fn


def _records(paths: list[str], starts: list[int], validation_split: float, *, keep: bool | None) -> tf.data.Dataset:
    """The records of `paths`, interleaved; with `keep` True only those held out for validation,
    False only the others (a record's index over every training file is its file's start plus its
    place in the file: see the module's docstring), None all."""

    def read(path: tf.Tensor, start: tf.Tensor) -> tf.data.Dataset:
        records = tf.data.TFRecordDataset(path)
        if keep is None:
            return records
        indexed = records.enumerate(start).filter(lambda index, _: _is_held_out(index, validation_split) == keep)
        return indexed.map(lambda _, record: record)

    files = tf.data.Dataset.from_tensor_slices((paths, tf.constant(starts, tf.int64)))
    return files.interleave(read, cycle_length=min(len(paths), _INTERLEAVED), block_length=1)


def _is_held_out(index: tf.Tensor, share: float) -> tf.Tensor:
    """Whether training record `index` is held out: floor((i + 1) s) > floor(i s), in exact integers."""
    step = _share_step(share)
    return (index + 1) * step // _SHARE_SCALE > index * step // _SHARE_SCALE


def _share_step(share: float) -> int:
    """The share in steps of 1 / `_SHARE_SCALE`, so that holding out is exact integer arithmetic."""
    return round(share * _SHARE_SCALE)


def _held_out_count(name: str, total: int, share: float) -> int:
    """The training records `_is_held_out` holds out of `total`.

    Raises:
      UsageError: `share` is not 0 and holds out none.
    """
    count = total * _share_step(share) // _SHARE_SCALE
    if share and not count:
        raise UsageError(
            f"--validation_split={share:g} of the {total} training records of {name} holds out none: use at "
            f"least {1 / total:.2g}, or 0 for no validation split."
        )
    return count


def _decode(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`(image, label)`: the image decoded (PNG or JPEG) and scaled to [0, 1], the label as int32."""
    example = tf.io.parse_single_example(record, _FEATURES)
    image = tf.io.decode_image(example["image"], expand_animations=False)
    return tf.cast(image, tf.float32) / 255.0, tf.cast(example["label"], tf.int32)


def write_shards(folder: str, split: str, images: np.ndarray, labels: np.ndarray, *, num_shards: int) -> list[str]:
    """Writes `images` (N, H, W) or (N, H, W, C) uint8 and their integer `labels` as `num_shards`
    TFRecord files named `<split>-<i>-of-<n>.tfrecord`, the examples dealt in order."""
    os.makedirs(folder, exist_ok=True)
    images = images if images.ndim == 4 else images[..., None]
    paths = []
    for shard in range(num_shards):
        path = os.path.join(folder, f"{split}-{shard:04d}-of-{num_shards:04d}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for image, label in zip(images[shard::num_shards], labels[shard::num_shards]):
                feature = {
                    "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[tf.io.encode_png(image).numpy()])),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
                }
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
        paths.append(path)
    return paths


def _file_fingerprint(path: str) -> str:
    stat = os.stat(path)
    return f"{path} {stat.st_size} {stat.st_mtime_ns}\n"
