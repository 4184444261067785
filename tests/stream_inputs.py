"""Input functions for `--input=tests/stream_inputs.py:NAME` (tests/test_streams.py): the bundled
digits as a stream, and the ways an input function goes wrong; and tasks of dict examples, one
bringing its own data (tests/test_stream_workers.py)."""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

import train_loop.data

# Found through the package, so that a copy of this file elsewhere reads them too.
_DIGITS = np.load(os.path.join(os.path.dirname(train_loop.data.__file__), "digits.npz"))


def _split(split: str) -> tf.data.Dataset:
    prefix = "test" if split == "test" else "train"
    images = (_DIGITS[f"x_{prefix}"][..., None] / 16.0).astype(np.float32)
    labels = _DIGITS[f"y_{prefix}"].astype(np.int32)
    return tf.data.Dataset.from_tensor_slices((images, labels))


def digits(split: str, context: tf.distribute.InputContext) -> tf.data.Dataset | None:
    """The digits' train and test splits, no validation split."""
    return None if split == "validation" else _split(split)


def endless(split: str, context: tf.distribute.InputContext) -> tf.data.Dataset | None:
    """An infinite training stream: it needs --steps_per_epoch."""
    return None if split == "validation" else _split(split).repeat() if split == "train" else _split(split)


def batched(split: str, context: tf.distribute.InputContext) -> tf.data.Dataset:
    return _split(split).batch(8).map(lambda images, labels: (images, labels))


def raises(split: str, context: tf.distribute.InputContext) -> tf.data.Dataset:
    raise FileNotFoundError(f"no such shard for {split}")


def _changes_shape_at(index: int):
    def changes_shape(split: str, context: tf.distribute.InputContext) -> tf.data.Dataset | None:
        if split == "validation":
            return None
        dataset = _split(split).enumerate()
        return dataset.map(
            lambda at, example: (tf.cond(at == index, lambda: example[0][:7], lambda: example[0]), example[1])
        )

    changes_shape.__doc__ = f"Training example {index} (from 0) is cut to 7 rows (a ragged source)."
    return changes_shape


changes_shape = _changes_shape_at(4)
changes_shape_late = _changes_shape_at(1000)  # At batch 16 unshuffled: in step 62.


def values(split: str, context: tf.distribute.InputContext) -> tf.data.Dataset | None:
    """The digits with float targets to predict (a regression): the digit times 1.5, plus 0.25."""
    if split == "validation":
        return None
    return _split(split).map(lambda image, label: (image, tf.cast(label, tf.float32) * 1.5 + 0.25))


def no_nines_in_test(split: str, context: tf.distribute.InputContext) -> tf.data.Dataset | None:
    """The digits, with the 9s left out of the test split (no validation split): the classes a
    test split's labels make are one short of the training split's."""
    if split == "validation":
        return None
    dataset = _split(split)
    return dataset.filter(lambda image, label: label < 9) if split == "test" else dataset


def digits_dicts(split: str, context: tf.distribute.InputContext) -> tf.data.Dataset | None:
    """The digits as dicts {"image", "label"}: examples that are no (inputs, label) pair."""
    return None if split == "validation" else _split(split).map(lambda image, label: {"image": image, "label": label})


class DictDigits:
    """A task of dict examples (`digits_dicts`): its split reads them by key."""

    def model(self) -> keras.Model:
        return keras.Sequential([keras.layers.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])

    def split(self, batch: dict) -> tuple[tf.Tensor, tf.Tensor]:
        return batch["image"], batch["label"]

    def loss_terms(self, batch: dict, outputs: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"cross_entropy": tf.nn.sparse_softmax_cross_entropy_with_logits(labels=batch["label"], logits=outputs)}


class DictDigitsWithData(DictDigits):
    """The same task bringing its own data: its input_fn is the run's stream, without --input."""

    def input_fn(self, split: str, context: tf.distribute.InputContext) -> tf.data.Dataset | None:
        return digits_dicts(split, context)
