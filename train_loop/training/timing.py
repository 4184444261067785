"""Where a run's time goes: the seconds of each phase, and the training's steady-state throughput.
(`--profile_steps`, a trace for TensorBoard's profile dashboard, is `actions.Profiling`.)"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

PLUGIN = "tensorboard_plugin_profile"


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


@dataclasses.dataclass
class Throughput:
    """Steady-state examples per second: a process's first loop call, which traces, is timed apart."""

    first: tuple[int, float] | None = None  # Its examples and seconds.
    first_done_at: float = 0.0
    examples: int = 0
    seconds: float = 0.0
    _started: float = dataclasses.field(default=0.0, init=False, repr=False)

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self, examples: int) -> None:
        """Counts `examples` trained since `start`."""
        ended = time.perf_counter()
        if self.first is None:
            self.first, self.first_done_at = (examples, ended - self._started), ended
        else:
            self.examples += examples
            self.seconds += ended - self._started

    @property
    def examples_per_second(self) -> float:
        examples, seconds = (self.examples, self.seconds) if self.seconds else (self.first or (0, 1.0))
        return examples / seconds if seconds else 0.0


def phases(stopwatch: Stopwatch, throughput: Throughput, started: float) -> dict[str, float]:
    """Where the run's time went, from `train()` on: "training" is the steady state, "first_step"
    the process's first loop call (tracing, compiling); what no phase names is building the
    model, restoring and opening the run."""
    seconds = dict(stopwatch.seconds)
    if throughput.first:
        seconds["first_step"] = throughput.first[1]
    seconds["training"] = throughput.seconds
    seconds["total"] = time.perf_counter() - started
    return seconds
