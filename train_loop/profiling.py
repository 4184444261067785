"""Where a run's time goes: the seconds of each phase, and `--profile_steps=START,END`, a trace of
those steps for TensorBoard's profile dashboard."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
from collections.abc import Iterator

import tensorflow as tf

PLUGIN = "tensorboard_plugin_profile"


class StepProfiler:
    """Starts TensorFlow's profiler when the run reaches step START and stops it at step END.

    The trace goes to `<logdir>/plugins/profile/<time>/`, where the dashboard looks for it. The
    outer loop makes START and END loop-call boundaries (see `boundaries`), so the trace holds
    exactly those steps.
    """

    def __init__(self, steps: tuple[int, int] | None, logdir: str):
        self._steps, self._logdir, self._running = steps, logdir, False
        if steps and importlib.util.find_spec(PLUGIN) is None:
            # The trace is written either way (it can be viewed elsewhere); say what shows it.
            print("train_loop: note: --profile_steps writes a trace; TensorBoard shows it with the "
                  "profile plugin: pip install 'train_loop[profile]'.", file=sys.stderr)

    def boundaries(self) -> tuple[int, ...]:
        return self._steps or ()

    def before(self, step: int) -> None:
        """Called before the loop call that starts at `step`."""
        if self._steps and step == self._steps[0]:
            tf.profiler.experimental.start(self._logdir)
            self._running = True

    def after(self, step: int, last: bool = False) -> None:
        """Called after the loop call that ended at `step`; stops at END or at the run's end."""
        if self._running and (step >= self._steps[1] or last):
            tf.profiler.experimental.stop()
            self._running = False


class Stopwatch:
    """Seconds spent in each named phase of a run (data, building, evaluation, checkpoints, ...),
    summed over its occurrences: `result.json` keeps them and the bench prints the breakdown."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
