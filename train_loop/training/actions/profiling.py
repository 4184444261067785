"""`--profile_steps`: TensorFlow's profiler over a range of loop calls."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import tensorflow as tf

from train_loop.training import timing
from train_loop.training.actions.base import Action, Moment


@dataclasses.dataclass
class Profiling(Action):
    """`--profile_steps=START,END`: TensorFlow's profiler runs over the loop calls from step START
    to step END (both made call boundaries), written to `logdir` for TensorBoard's profile
    dashboard; a run that stops inside the range stops it there."""

    steps: tuple[int, int]
    logdir: str
    running: bool = False

    def __post_init__(self) -> None:
        if importlib.util.find_spec(timing.PLUGIN) is None:
            # The trace is written either way (it can be viewed elsewhere); say what shows it.
            print(
                "train_loop: note: --profile_steps writes a trace; TensorBoard shows it with the "
                "profile plugin: pip install 'train_loop[profile]'.",
                file=sys.stderr,
            )

    def next_due(self, step: int) -> int | None:
        return next((boundary for boundary in self.steps if boundary > step), None)

    def due(self, at: Moment) -> bool:
        return self.running and (at.step >= self.steps[1] or at.last)

    def before_call(self, step: int) -> None:
        if step == self.steps[0]:
            tf.profiler.experimental.start(self.logdir)
            self.running = True

    def run(self, at: Moment) -> None:
        self.end()

    def end(self) -> None:
        if self.running:
            tf.profiler.experimental.stop()
            self.running = False
