"""Saving the train state: the periodic checkpoint, and the checkpoint a signal's stop takes first."""

from __future__ import annotations

import dataclasses
import functools

import tensorflow as tf

from train_loop.outputs import checkpoints
from train_loop.training.actions.base import Action, Moment, Periodic
from train_loop.training.preemption import SignalStop
from train_loop.training.timing import Stopwatch


@dataclasses.dataclass
class Checkpoint(Periodic):
    """Saves the train state at `--checkpoint_every` and at the last step, so tools reading the
    newest checkpoint see the weights `result.json` describes."""

    manager: tf.train.CheckpointManager
    stopwatch: Stopwatch

    def run(self, at: Moment) -> None:
        with self.stopwatch.phase("checkpoints"):
            checkpoints.save(self.manager, at.step)


@dataclasses.dataclass
class Signals(Action):
    """After every loop call: a SIGTERM or SIGINT received saves a checkpoint and stops the run."""

    signals: SignalStop
    manager: tf.train.CheckpointManager

    def run(self, at: Moment) -> None:
        self.signals.stop_if_signalled(at.step, functools.partial(checkpoints.save, self.manager, at.step))
