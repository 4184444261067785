"""What a checkpoint holds, by name, and checkpoints written before the measurements had names."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from train_loop import Config
from train_loop.model import measurements
from train_loop.model.dropout import plain_keras
from train_loop.model.state import build_state
from train_loop.outputs import checkpoints

CONFIG = Config(dataset="digits", dropout=0.5, l2=1e-3)


def digits_state():
    return build_state(CONFIG, tf.distribute.OneDeviceStrategy("/cpu:0"), (8, 8, 1))


def test_the_checkpoint_keeps_one_variable_per_epoch_measurement(tmp_path):
    state = digits_state()
    state.counters.advance({"cross_entropy": 1.5, "regularization": 0.5, "total": 2.0, "accuracy": 0.25}, 4)
    checkpoints.save(checkpoints.make_manager(tf.train.Checkpoint(**state.trackables()), str(tmp_path)), 4)
    names = {name.split("/.ATTRIBUTES")[0] for name, _ in tf.train.list_variables(str(tmp_path / "ckpt-4"))}
    assert {f"epoch_sum/{name}" for name in measurements.CLASSIFIER.per_epoch} | {
        "step",
        "epoch",
        "epoch_steps",
    } <= names
    assert "epoch_sums" not in names and "rng" not in names
    restored = digits_state()
    assert checkpoints.restore_latest(tf.train.Checkpoint(**restored.trackables()), str(tmp_path), repair=False)
    assert restored.counters.step == 4
    assert restored.counters.epoch_means() == {
        "cross_entropy": 0.375,
        "regularization": 0.125,
        "total": 0.5,
        "accuracy": 0.0625,
    }


def test_a_checkpoint_written_before_the_names_restores_its_epoch_sums_and_non_trainable_state(tmp_path):
    """Such a checkpoint kept the epoch's sums as one vector (cross-entropy, regularization, total,
    accuracy, then the step count) and the non-trainable variables as "rng": the seed states of
    Keras' Dropout, which the built-in models no longer hold (`ExampleDropout`) and leave unread."""
    old = digits_state()
    old.model = plain_keras(old.model)
    old_names = old.positional_trackables()
    old_names["epoch_sums"].assign([3.0, 1.0, 4.0, 2.0, 8.0])
    old_names["step"].assign(8)
    non_trainable = [variable.numpy() for variable in old_names["rng"]]
    assert non_trainable  # Keras Dropout's seed states.
    for variable in old_names["rng"]:
        variable.assign(variable + 7 if variable.dtype.is_integer else variable + 0.5)
    checkpoints.save(checkpoints.make_manager(tf.train.Checkpoint(**old_names), str(tmp_path)), 8)

    state = digits_state()
    assert checkpoints.restore_latest(
        tf.train.Checkpoint(**state.trackables()),
        str(tmp_path),
        repair=False,
        positional=tf.train.Checkpoint(**state.positional_trackables()),
    )
    state.counters.take_positional()
    assert state.counters.step == 8
    assert state.counters.epoch_means() == {
        "cross_entropy": 0.375,
        "regularization": 0.125,
        "total": 0.5,
        "accuracy": 0.25,
    }
    assert state.trackables()["non_trainable"] == []
    assert len(state.model.weights) == len(old.model.trainable_weights) > 0
    for restored, saved in zip(state.model.weights, old.model.trainable_weights):
        np.testing.assert_array_equal(restored.numpy(), saved.numpy())
