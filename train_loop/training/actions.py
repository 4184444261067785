"""Periodic actions, run by the controller after a loop call when they are due: summaries,
histograms, validation (best model, early stopping), the epoch's end, checkpoints, profiling,
signals. One rule says when one is due (`Cadence`, as CLU's `every_steps`); the controller asks
each `due(at)`, then `run(at)`, and `next_due(step)` to end a loop call there. Each runs on its
own, without training."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import sys
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from train_loop.configs import Config
from train_loop.model import measurements, optimizers
from train_loop.model.state import TrainState
from train_loop.outputs import checkpoints
from train_loop.outputs.metrics_file import MetricsFile, epoch_record
from train_loop.outputs.summaries import Summaries
from train_loop.training import timing
from train_loop.training.console import Console
from train_loop.training.evaluation import Evaluation
from train_loop.training.preemption import SignalStop
from train_loop.training.timing import Stopwatch, Throughput


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When a periodic action is due: every `every` steps, or with `every` = 0 at the end of each
    epoch; with `at_epoch_end` at each epoch's end as well, with `at_last` at the run's last step."""

    every: int
    steps_per_epoch: int
    at_epoch_end: bool = False
    at_last: bool = False

    def due(self, at: Moment) -> bool:
        periodic = at.step % self.every == 0 if self.every else at.epoch_end
        return periodic or (self.at_epoch_end and at.epoch_end) or (self.at_last and at.last)

    def due_at(self, step: int) -> bool:
        """Whether it is due at `step` by count alone: known before the loop call ending there."""
        return self.due(Moment(step, epoch_end=step % self.steps_per_epoch == 0))

    def next_due(self, step: int) -> int:
        """The next step past `step` it is due at by count (the last step is always a boundary)."""
        epoch_end = step + self.steps_per_epoch - step % self.steps_per_epoch
        periodic = step + self.every - step % self.every if self.every else epoch_end
        return min(periodic, epoch_end) if self.at_epoch_end else periodic


@dataclasses.dataclass(frozen=True)
class Moment:
    """Where training stands after a loop call of `num_steps` that ended at `step`: whether an
    epoch ended there, whether it is the run's last step (the last of all, or an early stop),
    and the gradient's histograms at `step` when an action asked for them."""

    step: int
    epoch_end: bool = False
    last: bool = False
    num_steps: int = 1
    histograms: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


class Action:
    """An action after every loop call; `Periodic` ones say when they are due."""

    def due(self, at: Moment) -> bool:
        return True

    def next_due(self, step: int) -> int | None:
        """The next step past `step` that must end a loop call for this action; None: any step."""
        return None

    def wants_histograms(self, step: int) -> bool:
        """Whether the loop call ending at `step` must measure the gradient's histograms."""
        return False

    def begin(self) -> None:
        """Called once before the first loop call of a run that starts at step 0."""

    def before_call(self, step: int) -> None:
        """Called before the loop call that starts at `step`."""

    def end(self) -> None:
        """Called when the controller stops, by reaching the end or by an error."""

    def run(self, at: Moment) -> None:
        raise NotImplementedError


@dataclasses.dataclass
class Periodic(Action):
    """An action due as its `cadence` says."""

    cadence: Cadence

    def due(self, at: Moment) -> bool:
        return self.cadence.due(at)

    def next_due(self, step: int) -> int | None:
        return self.cadence.next_due(step)


@dataclasses.dataclass
class TrainSummaries(Periodic):
    """The train writer's scalars (the interval's means, the regularization's ratio to the
    cross-entropy, the learning rate, each layer's terms, norms and sparsity, the decoupled decay's
    penalty) and the console's progress."""

    config: Config
    state: TrainState
    summaries: Summaries
    console: Console
    means: Callable[[], dict[str, float]]  # The means since the last summary (`controller.Interval`).
    stopwatch: Stopwatch  # Timed as "summaries" (within training time), so the bench shows what logging costs.

    def begin(self) -> None:
        """Step 0: each layer's measurements of the initial weights, the regularizers' starting point."""
        layers = self.state.layer_measurements()
        initial_term = sum(value for tag, value in layers.items() if tag.startswith("regularization/"))
        self.summaries.write_scalars("train", 0, {**layers, "loss/regularization": initial_term})

    def run(self, at: Moment) -> None:
        with self.stopwatch.phase("summaries"):
            self._write(at)

    def _write(self, at: Moment) -> None:
        means, state = self.means(), self.state
        self.summaries.write_scalars(
            "train",
            at.step,
            {
                **measurements.tagged(means),
                "regularization_ratio": means["regularization"] / means["cross_entropy"],
                "learning_rate": optimizers.applied_learning_rate(self.config, state.optimizer),
                **({"loss_scale": float(state.loss_scale.scale.numpy())} if state.loss_scale else {}),
                **state.layer_measurements(),
                **(
                    {
                        f"weight_decay/{path}": term
                        for path, term in optimizers.layer_decay_terms(state.model, self.config.weight_decay).items()
                    }
                    if self.config.weight_decay
                    else {}
                ),
            },
        )
        self.console.progress(at.step, {name: means[name] for name in measurements.PER_EPOCH})


@dataclasses.dataclass
class Histograms(Periodic):
    """Every trainable weight's histogram, and each weighted layer's kernel gradient's (of the
    whole batch, before clipping: "gradient/<layer path>"), at `--histogram_every`."""

    state: TrainState
    summaries: Summaries
    stopwatch: Stopwatch  # Timed as "summaries", as `TrainSummaries`.

    def wants_histograms(self, step: int) -> bool:
        return self.cadence.due_at(step)

    def begin(self) -> None:
        self.summaries.write_histograms(0, self.state.weight_values())

    def run(self, at: Moment) -> None:
        with self.stopwatch.phase("summaries"):
            self.summaries.write_histograms(at.step, {**self.state.weight_values(), **at.histograms})


@dataclasses.dataclass
class CountTraining(Action):
    """Adds the loop call, and the actions before this one, to the training time: evaluation and
    checkpoints, after it, are not training."""

    throughput: Throughput
    batch_size: int

    def run(self, at: Moment) -> None:
        self.throughput.stop(at.num_steps * self.batch_size)


@dataclasses.dataclass
class Validation(Periodic):
    """Scores the validation split, with the weights validation uses (averaged, with `--ema`);
    keeps the best model and decides early stopping, when the run has a best metric."""

    state: TrainState
    validate: Callable[[], Evaluation]
    summaries: Summaries
    console: Console
    save_best: Callable[[], None] = lambda: None  # Writes <run>/best/ from the model as validated.
    latest: Evaluation | None = None

    def run(self, at: Moment) -> None:
        self.latest = self.validate()
        self.summaries.write_evaluation("validation", at.step, self.latest.metrics, self.latest.confusion_matrix)
        best = self.state.best
        # The weights validated, which with --ema are the averaged ones, are the ones to keep.
        with self.state.validated_weights():
            if best and best.update(at.step, self.latest.metrics):
                self.save_best()
        if best and best.stop:
            self.console.show(
                f"stopping early at step {at.step}: {best.name} has not improved by more than "
                f"{best.min_delta:g} in {best.patience} validations; "
                f"the best, {float(best.value.numpy()):.4f}, was at step {best.step}"
            )


@dataclasses.dataclass
class EpochEnd(Periodic):
    """Counts the epoch, says its means on the console (with the latest validation) and in
    `metrics.jsonl` (with the validation of this step, if any), and starts the next epoch's sums;
    the last step keeps them, for `result.json`. Before a loop call, the `Epoch i/N` header of the
    epoch it trains in."""

    config: Config
    state: TrainState
    console: Console
    metrics_file: MetricsFile
    throughput: Throughput
    validation: Validation | None = None

    def before_call(self, step: int) -> None:
        self.console.begin_epoch(step)

    def run(self, at: Moment) -> None:
        counters, examples_per_second = self.state.counters, self.throughput.examples_per_second
        counters.epoch.assign_add(1)
        epoch, train = int(counters.epoch), counters.epoch_means()
        latest = self.validation.latest if self.validation else None
        self.console.epoch_done(epoch, train, latest and latest.metrics, examples_per_second)
        validated_now = latest is not None and self.validation.due(at)
        self.metrics_file.append(
            epoch_record(
                step=at.step,
                epoch=epoch,
                train=train,
                validation=latest.metrics if validated_now else None,
                learning_rate=optimizers.applied_learning_rate(self.config, self.state.optimizer),
                examples_per_second=examples_per_second,
                wall_time=time.time(),
            )
        )
        if not at.last:
            counters.start_epoch()


@dataclasses.dataclass
class Flush(Action):
    """Writes the events so far to disk, after every loop call: before the checkpoint, so a run
    resumed from it keeps every event up to its step."""

    summaries: Summaries

    def begin(self) -> None:
        self.summaries.flush()

    def run(self, at: Moment) -> None:
        self.summaries.flush()


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
