"""Restore-or-initialize and save, through `tf.train.CheckpointManager`."""

from __future__ import annotations

import os

import tensorflow as tf

MAX_TO_KEEP = 3


def make_manager(run_dir: str, **objects: tf.Module) -> tf.train.CheckpointManager:
    """A manager for `<run>/checkpoints/` over the named objects (model, optimizer, counters)."""
    checkpoint = tf.train.Checkpoint(**objects)
    return tf.train.CheckpointManager(
        checkpoint, os.path.join(run_dir, "checkpoints"), max_to_keep=MAX_TO_KEEP)


def restore_latest(manager: tf.train.CheckpointManager) -> bool:
    """Restores the newest checkpoint if there is one; says whether it did."""
    if manager.latest_checkpoint is None:
        return False
    manager.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    return True


def save(manager: tf.train.CheckpointManager, step: int) -> str:
    """Saves under the global step's number, so file names say where training stood."""
    return manager.save(checkpoint_number=step)
