"""Restore-or-initialize and save, through `tf.train.CheckpointManager`."""

from __future__ import annotations

import os

import tensorflow as tf

MAX_TO_KEEP = 3


def directory(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def make_manager(checkpoint_dir: str, **objects: tf.Module) -> tf.train.CheckpointManager:
    """A manager saving the named objects (model, optimizer, counters) into `checkpoint_dir`."""
    return tf.train.CheckpointManager(tf.train.Checkpoint(**objects), checkpoint_dir, max_to_keep=MAX_TO_KEEP)


def restore_latest(manager: tf.train.CheckpointManager, checkpoint_dir: str) -> bool:
    """Restores the newest checkpoint in `checkpoint_dir` if there is one; says whether it did.

    `checkpoint_dir` is the run's: a worker that saves its copies elsewhere restores the chief's.
    """
    latest = tf.train.latest_checkpoint(checkpoint_dir)
    if latest is None:
        return False
    manager.checkpoint.restore(latest).assert_existing_objects_matched()
    return True


def save(manager: tf.train.CheckpointManager, step: int) -> str:
    """Saves under the global step's number, so file names say where training stood; a step
    already saved (a stop requested right after a periodic checkpoint) is not written twice."""
    latest = manager.latest_checkpoint
    if latest is not None and latest.endswith(f"-{step}"):
        return latest
    return manager.save(checkpoint_number=step)
