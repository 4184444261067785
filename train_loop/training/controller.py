"""The outer loop, as Orbit's controller has it: `while step < total: run a loop call; run the
actions that are due` (see `actions`). Eager Python: it times, checks and counts; the traced loop
call (`loop_calls.make_loop_call`) trains."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from train_loop.configs import Config
from train_loop.errors import DivergedError
from train_loop.model.measurements import CLASSIFIER, Table
from train_loop.model.state import Counters, TrainState
from train_loop.outputs import checkpoints
from train_loop.outputs.run_outputs import RunOutputs
from train_loop.outputs.summaries import Summaries
from train_loop.training import actions
from train_loop.training.actions import Action, Cadence, Moment
from train_loop.training.console import Console
from train_loop.training.divergence import Divergence
from train_loop.training.preemption import SignalStop
from train_loop.training.timing import Stopwatch, Throughput
from train_loop.user_actions import PeriodicAction


def check_finite(measured: dict[str, float], step: int, num_steps: int, *, table: Table) -> None:
    """Raises DivergedError naming the first loss term (of the task's, then the regularization)
    or the gradient of the last loop call that is not finite."""
    if measured.get("non_finite_gradients", 0.0) > 0:
        measured = {**measured, "gradient_norm": math.inf}  # A step before the last, whose norm was not taken.
    for name in table.checked_finite:
        if not math.isfinite(measured[name]):
            raise DivergedError(
                f"training diverged: {table.tag(name)} became {measured[name]} between steps {step + 1} and "
                f"{step + num_steps}; nothing past step {step} was saved. Lower --learning_rate.",
                steps=(step + 1, step + num_steps),
            )


def call_means(measured: dict[str, float], num_steps: int, *, table: Table) -> dict[str, float]:
    """A loop call's logged measurements by name: the summed ones as means over its steps, the
    gradient's norms as taken at its last step."""
    return {
        name: value / num_steps if name in table.summed else value
        for name, value in measured.items()
        if table.tag(name)
    }


class Interval:
    """Sums since the last train summary, so each logged point is the mean over its interval;
    the gradient's norms, taken at the last step of each loop call, are the latest ones instead."""

    def __init__(self, summed: tuple[str, ...] = CLASSIFIER.summed) -> None:
        self._summed = summed  # The names summed over the interval; the others are the latest.
        self._sums: dict[str, float] = {}
        self._latest: dict[str, float] = {}
        self._steps = 0
        self._examples = 0
        self._seconds = 0.0

    def add(self, measured: dict[str, float], num_steps: int, *, examples: int, seconds: float) -> None:
        for name, value in measured.items():
            if name in self._summed:
                self._sums[name] = self._sums.get(name, 0.0) + value
            else:
                self._latest[name] = value
        self._steps += num_steps
        self._examples += examples
        self._seconds += seconds

    def clear(self) -> None:
        """Starts a new interval, as after a rollback."""
        self.__init__(self._summed)

    def pop_means(self) -> dict[str, float]:
        """The interval's mean measurements, its latest gradient norms and its throughput; starts a
        new interval."""
        if not self._steps:
            return {}  # Only a skipped step since the last summary (`--divergence_skip`).
        means = {name: value / self._steps for name, value in self._sums.items()}
        means.update(self._latest, examples_per_second=self._examples / self._seconds)
        self.clear()
        return means


@dataclasses.dataclass(kw_only=True)
class Controller:
    """Runs loop calls until the last step (or an early stop), each up to the next step an action
    is due at and at most `steps_per_loop` long; after each, runs the actions due, in order."""

    # Trains that many steps; gives their measurements, and the gradient's histograms when asked.
    loop_call: Callable[[int, bool], dict[str, tf.Tensor]]
    counters: Counters
    table: Table
    steps_per_epoch: int
    total_steps: int
    steps_per_loop: int
    batch_size: int
    actions: Sequence[Action]
    interval: Interval = dataclasses.field(default_factory=Interval)
    throughput: Throughput = dataclasses.field(default_factory=Throughput)
    stopping: Callable[[], bool] = lambda: False  # Early stopping, decided by an action.
    calls: int = dataclasses.field(default=0, init=False)  # Loop calls made by this process.
    # What a divergence does (`--on_divergence`); None: it stops the run, unreported.
    divergence: Divergence | None = None

    def run(self) -> None:
        if self.counters.step == 0:
            for action in self.actions:
                action.begin()
            if self.divergence:
                self.divergence.begin()
        try:
            while self.counters.step < self.total_steps and not self.stopping():
                called = self._next_call()
                if called:
                    self._run_due_actions(*called)
        finally:
            for action in self.actions:
                action.end()

    def call_size(self, step: int) -> int:
        """The steps of the loop call starting at `step`: up to the next step an action is due at,
        and up to a step a rollback skips (`--divergence_skip`)."""
        due = (action.next_due(step) for action in self.actions)
        skipped = (skip - 1 for skip in self.divergence.skipped if skip > step) if self.divergence else ()
        return min(
            self.steps_per_loop,
            self.total_steps - step,
            *(when - step for when in due if when is not None),
            *(when - step for when in skipped),
        )

    def _next_call(self) -> tuple[int, dict[str, np.ndarray], dict[str, float]] | None:
        """The next loop call (`_loop_call_checked`), or the step a rollback skips; None after a
        rollback, whose loop call starts from its checkpoint."""
        if self.divergence is not None and self.counters.step + 1 in self.divergence.skipped:
            return self._skip()
        try:
            return self._loop_call_checked()
        except DivergedError as error:
            self._diverged(error)
            return None

    def _skip(self) -> tuple[int, dict[str, np.ndarray], dict[str, float]]:
        """The step a rollback skips: its batch is drawn and not trained on; the step counts, as
        a loop call of no step (its actions run: an epoch may end there)."""
        self.throughput.start()
        self.divergence.data.skip_batch()
        self.counters.skip()
        return 0, {}, {}

    def _diverged(self, error: DivergedError) -> None:
        """Reports the divergence and stops, or goes on from the rollback's checkpoint with a new
        interval, as a resumed run does."""
        if self.divergence is None:
            raise error
        self.loop_call = self.divergence.handle(error)
        self.interval.clear()

    def _loop_call_checked(self) -> tuple[int, dict[str, np.ndarray], dict[str, float]]:
        """One loop call, checked and counted; returns its number of steps, the gradient's
        histograms when an action wants them at the step it ends at, and its `call_means`."""
        step = self.counters.step
        # The first call of a process traces and compiles: one step, so that it is timed apart.
        num_steps = 1 if self.calls == 0 else self.call_size(step)
        self.calls += 1
        for action in self.actions:
            action.before_call(step)
        self.throughput.start()
        started = time.perf_counter()
        histograms = any(action.wants_histograms(step + num_steps) for action in self.actions)
        # Marked for the profiler's trace viewer (`--profile_steps`): the steps this call trains.
        with tf.profiler.experimental.Trace("train", step_num=step + 1, num_steps=num_steps, _r=1):
            output = self.loop_call(num_steps, histograms)
        measured = {name: float(value) for name, value in output.items() if value.shape.rank == 0}
        self.interval.add(
            measured, num_steps, examples=num_steps * self.batch_size, seconds=time.perf_counter() - started
        )
        check_finite(measured, step, num_steps, table=self.table)
        self.counters.advance(measured, num_steps)
        arrays = {name: value.numpy() for name, value in output.items() if histograms and value.shape.rank}
        return num_steps, arrays, call_means(measured, num_steps, table=self.table)

    def _run_due_actions(self, num_steps: int, histograms: dict[str, np.ndarray], measured: dict[str, float]) -> None:
        step = self.counters.step
        for action in self.actions:
            # Asked anew for each action: validation may have just decided to stop early.
            at = Moment(
                step=step,
                epoch_end=step % self.steps_per_epoch == 0,
                last=step == self.total_steps or self.stopping(),
                num_steps=num_steps,
                histograms=histograms,
                measured=measured,
            )
            if action.due(at):
                action.run(at)


def make_controller(
    config: Config,
    loop_call: Callable[[int, bool], dict[str, tf.Tensor]],
    *,
    strategy: tf.distribute.Strategy,
    steps_per_epoch: int,
    state: TrainState,
    outputs: RunOutputs,
    validation: actions.Validation | None,
    console: Console,
    manager: tf.train.CheckpointManager,
    signals: SignalStop,
    stopwatch: Stopwatch,
    user_actions: Sequence[PeriodicAction] = (),
    divergence: Divergence | None = None,
) -> Controller:
    """The run's controller with its actions, in the order they run after a loop call.

    The order keeps a resumed run exact: events are flushed before the checkpoint, and the
    checkpoint comes before a signal's stop. Training time counts the summaries, not the rest.
    A user's actions run after the built-in ones that report the step and before the flush, so
    that what they write is in the checkpoint's events; one that raises stops the run after
    saving them, on every worker (`_user_actions`).
    """
    interval, throughput, summaries = Interval(state.table.summed), Throughput(), outputs.summaries

    def cadence(every: int, **also: bool) -> Cadence:
        return Cadence(every, steps_per_epoch, **also)

    profiled = config.profile_range if outputs.profile_dir else None
    return Controller(
        loop_call=loop_call,
        counters=state.counters,
        table=state.table,
        steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * config.epochs,
        steps_per_loop=config.steps_per_loop,
        batch_size=config.batch_size,
        interval=interval,
        throughput=throughput,
        stopping=lambda: state.best is not None and state.best.stop,
        divergence=divergence,
        actions=[
            *([actions.Profiling(profiled, os.path.join(outputs.profile_dir, "train"))] if profiled else []),
            actions.TrainSummaries(
                cadence(config.summary_every, at_epoch_end=True),
                config=config,
                state=state,
                summaries=summaries,
                console=console,
                means=interval.pop_means,
                stopwatch=stopwatch,
            ),
            actions.Histograms(cadence(config.histogram_every), state=state, summaries=summaries, stopwatch=stopwatch),
            actions.CountTraining(throughput, config.batch_size),
            *([validation] if validation else []),
            actions.EpochEnd(
                cadence(0),
                config=config,
                state=state,
                console=console,
                metrics_file=outputs.metrics_file,
                throughput=throughput,
                validation=validation,
            ),
            *_user_actions(user_actions, cadence, state=state, summaries=summaries, manager=manager, strategy=strategy),
            actions.Flush(summaries),
            actions.Checkpoint(cadence(config.checkpoint_every, at_last=True), manager, stopwatch),
            actions.Signals(signals, manager),
        ],
    )


def _user_actions(
    user_actions: Sequence[PeriodicAction],
    cadence: Callable[..., Cadence],
    *,
    state: TrainState,
    summaries: Summaries,
    manager: tf.train.CheckpointManager,
    strategy: tf.distribute.Strategy,
) -> list[Action]:
    """The user's actions, then the check that stops the run, on every worker, when one of them
    raised on any (`UserActionFailures`); nothing without user actions."""
    if not user_actions:
        return []
    declared_actions = [
        actions.UserAction(
            cadence(declared.every, at_epoch_end=declared.at_epoch_end, at_last=declared.at_last),
            declared=declared,
            state=state,
            summaries=summaries,
        )
        for declared in user_actions
    ]

    def save(step: int) -> None:
        summaries.flush()
        checkpoints.save(manager, step)

    return [*declared_actions, actions.UserActionFailures(declared_actions, strategy, save)]
