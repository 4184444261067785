"""Each worker's data position under several workers: its stream's iterator, saved by a checkpoint
of its own beside the run's, at the same steps.

Only the chief writes the run's checkpoint, and TensorFlow 2.21 cannot checkpoint a strategy's
distributed iterator, so each worker saves its own host iterator (`inputs.ReplicaInput`) into
`checkpoints/positions/worker-<i>-of-<n>/` of the run folder, which every worker must reach (a
shared file system), before the run's checkpoint of the same step. A resume restores the newest
step that the run's checkpoint and every worker's position all hold: a kill between the writes
leaves one of them a step ahead, which is skipped, never weights and a data position of
different steps.
"""

from __future__ import annotations

import os
import re

import tensorflow as tf

from train_loop.errors import UsageError
from train_loop.outputs import checkpoints

POSITIONS_DIR = "positions"
_WORKER_FOLDER = re.compile(r"worker-(\d+)-of-(\d+)")
# One more than the run's checkpoints: a kill after a worker's position and before the run's
# checkpoint of that step leaves the position a step ahead, and the run's oldest must still match one.
_MAX_TO_KEEP = checkpoints.MAX_TO_KEEP + 1


def positions_dir(run_dir: str) -> str:
    return os.path.join(checkpoints.directory(run_dir), POSITIONS_DIR)


class WorkerPosition:
    """Worker `index` of `count`'s data position: its `iterator` in a checkpoint of its own."""

    def __init__(self, run_dir: str, iterator: object, *, index: int, count: int):
        self.run_dir, self.index, self.count = run_dir, index, count
        self.folder = os.path.join(positions_dir(run_dir), f"worker-{index}-of-{count}")
        self.checkpoint = tf.train.Checkpoint(data_position=iterator)

    def common_steps(self) -> set[int]:
        """The steps at which every worker of this run's count saved its position."""
        folders = [os.path.join(positions_dir(self.run_dir), f"worker-{i}-of-{self.count}") for i in range(self.count)]
        return set.intersection(*(_steps(folder) for folder in folders))

    def restore(self, step: int) -> None:
        """Restores this worker's position at `step`, the run's restored step.

        Raises:
          UsageError: the position's checkpoint is damaged.
        """
        prefix = os.path.join(self.folder, f"ckpt-{step}")
        try:
            self.checkpoint.restore(prefix).assert_existing_objects_matched()
        except checkpoints.RESTORE_ERRORS as error:
            raise UsageError(
                f"{prefix}: worker {self.index}'s data position at step {step} does not restore "
                f"({str(error).splitlines()[0][:200]}); pass a new --run_name to start over."
            ) from None

    def manager(self) -> tf.train.CheckpointManager:
        """The manager that saves this worker's position (see `checkpoints.make_manager`), its
        folder cleared of what a kill during a save left."""
        checkpoints.remove_temporaries(self.folder)
        return tf.train.CheckpointManager(self.checkpoint, self.folder, max_to_keep=_MAX_TO_KEEP)


def check_saved_alike(run_dir: str, count: int) -> None:
    """Refuses to resume a streamed run on another number of workers (`count`; 0 for one
    machine's devices, whose one iterator is in the run's checkpoint) than saved its data
    position at the run's checkpoints' steps: a position is one input pipeline's.

    Raises:
      UsageError: the positions at those steps were saved by another number of workers.
    """
    steps = _steps(checkpoints.directory(run_dir))
    if not steps:
        return
    saved_by = set()
    if os.path.isdir(positions_dir(run_dir)):
        for name in os.listdir(positions_dir(run_dir)):
            match = _WORKER_FOLDER.fullmatch(name)
            if match and _steps(os.path.join(positions_dir(run_dir), name)) & steps:
                saved_by.add(int(match[2]))
    saved_by = saved_by or {0}
    if saved_by != {count}:
        raise UsageError(
            f"{run_dir} holds a streamed run whose data position was saved by {_describe(saved_by)}, and this "
            f"run has {_describe({count})}: a position is one input pipeline's; resume it on as many workers, or "
            "pass a new --run_name."
        )


def _describe(counts: set[int]) -> str:
    return " and ".join(f"{count} workers" if count else "one machine's devices" for count in sorted(counts))


def _steps(folder: str) -> set[int]:
    return {int(prefix.rpartition("-")[2]) for prefix in checkpoints.saved_checkpoints(folder)}
