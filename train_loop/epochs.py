"""The eager outer loop: runs the traced training loop between events, and handles each event
(summaries, histograms, evaluations, checkpoints, signals, divergence)."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from train_loop import checkpoints, optimizers, steps
from train_loop.configs import Config
from train_loop.console import Console
from train_loop.errors import DivergedError
from train_loop.preemption import SignalStop
from train_loop.profiling import StepProfiler, Stopwatch
from train_loop.state import TrainState
from train_loop.summaries import Summaries


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One pass over a split (validation or test): cross-entropy and accuracy, and the confusion
    matrix."""

    metrics: dict[str, float]
    confusion_matrix: np.ndarray


def check_finite(sums: dict[str, float], step: int, num_steps: int) -> None:
    """Raises DivergedError if a loss component or the gradient of the last loop call is not finite."""
    if sums.get("non_finite_gradients", 0.0) > 0:
        sums = {**sums, "gradient_norm": math.inf}  # A step before the last, whose norm was not taken.
    for name in ("cross_entropy", "regularization", "gradient_norm"):
        if not math.isfinite(sums[name]):
            raise DivergedError(
                f"training diverged: {name} became {sums[name]} between steps {step + 1} and "
                f"{step + num_steps}; nothing past step {step} was saved. Lower --learning_rate.")


@dataclasses.dataclass(kw_only=True)
class Run:
    """The eager outer loop: calls the traced loop between events, and handles each event."""

    config: Config
    steps_per_epoch: int
    state: TrainState
    manager: tf.train.CheckpointManager
    summaries: Summaries
    console: Console
    profiler: StepProfiler
    signals: SignalStop
    stopwatch: Stopwatch = dataclasses.field(default_factory=Stopwatch)
    save_best: Callable[[], None] = lambda: None  # Writes <run>/best/ from the model as validated.
    validation: Evaluation | None = None  # The latest.

    def run_epochs(self, train_steps: Callable[[int], dict], validate: Callable[[], Evaluation] | None) -> Timer:
        """Runs until the last epoch ends, validating every `eval_every` steps (or at each epoch's
        end) when there is a validation split; returns the throughput timer."""
        config, state, timer, interval = self.config, self.state.counters, Timer(), _Interval()
        total = self.steps_per_epoch * config.epochs
        while state.step < total and not self._stopping_early():
            if state.step % self.steps_per_epoch == 0:
                state.epoch_sums.assign(tf.zeros_like(state.epoch_sums))
            # The first call of a process traces and compiles: one step, so that it is timed apart.
            num_steps = 1 if timer.first is None else self._steps_to_next_event()
            self.profiler.before(state.step)
            started = time.perf_counter()
            sums = _floats(train_steps(num_steps))
            interval.add(sums, num_steps, num_steps * config.batch_size, time.perf_counter() - started)
            check_finite(sums, state.step, num_steps)
            state.advance(sums, num_steps)

            step, epoch_end = state.step, state.step % self.steps_per_epoch == 0
            self.profiler.after(step, last=step == total)
            if step % config.summary_every == 0 or epoch_end:
                self._write_train_summaries(step, interval.pop_means())
            if _due(step, config.histogram_every, epoch_end):
                self.summaries.write_weight_histograms(self.state.model, step)
            # Training time counts the steps and their summaries; evaluation and checkpoints not.
            timer.add(num_steps * config.batch_size, started, time.perf_counter())
            if validate and (_due(step, config.eval_every, epoch_end) or step == total):
                # The last step too, so that the run ends with a validation of its final weights.
                self._validate(step, validate)
            last = step == total or self._stopping_early()
            if epoch_end:
                state.epoch.assign_add(1)
                self.console.epoch_done(int(state.epoch), state.epoch_means(),
                                        self.validation.metrics if self.validation else None,
                                        timer.examples_per_second)
            # Events before the checkpoint: a run resumed from it keeps every event up to its step.
            self.summaries.flush()
            # The last step too: tools reading the newest checkpoint see the weights result.json describes.
            if _due(step, config.checkpoint_every, epoch_end) or last:
                with self.stopwatch.phase("checkpoints"):
                    checkpoints.save(self.manager, step)
            self.signals.stop_if_signalled(step, functools.partial(checkpoints.save, self.manager, step))
        self.profiler.after(state.step, last=True)  # Stopped early inside the traced range.
        return timer

    def _validate(self, step: int, validate: Callable[[], Evaluation]) -> None:
        self.validation = validate()
        self.summaries.write_evaluation("validation", step, self.validation.metrics, self.validation.confusion_matrix)
        best = self.state.best
        # The weights validated, which with --ema are the averaged ones, are the ones to keep.
        with self.state.validated_weights():
            if best and best.update(step, self.validation.metrics):
                self.save_best()
        if self._stopping_early():
            self.console.say(
                f"stopping early at step {step}: {best.name} has not improved by more than "
                f"{self.config.early_stopping_min_delta:g} in {self.config.early_stopping_patience} validations; "
                f"the best, {float(best.value.numpy()):.4f}, was at step {best.step}")

    def _stopping_early(self) -> bool:
        return self.state.best is not None and self.state.best.stop

    def _steps_to_next_event(self) -> int:
        """Steps until the next summary, histogram, validation, checkpoint or epoch end, at most
        steps_per_loop."""
        step, config = self.state.counters.step, self.config
        intervals = [config.summary_every, self.steps_per_epoch]
        intervals += [every for every in (config.histogram_every, config.eval_every, config.checkpoint_every) if every]
        boundaries = [boundary - step for boundary in self.profiler.boundaries() if boundary > step]
        return min(config.steps_per_loop, *(every - step % every for every in intervals), *boundaries)

    def _write_train_summaries(self, step: int, means: dict[str, float]) -> None:
        self.summaries.write_scalars("train", step, {
            "loss/cross_entropy": means["cross_entropy"],
            "loss/regularization": means["regularization"],
            "loss/total": means["total"],
            "regularization_ratio": means["regularization"] / means["cross_entropy"],
            "accuracy": means["accuracy"],
            "learning_rate": optimizers.applied_learning_rate(self.config, self.state.optimizer),
            "examples_per_second": means["examples_per_second"],
            **{name: value for name, value in means.items() if name.startswith("gradient_norm")},
            **({"clipped_share": means["clipped"]} if self.config.global_clipnorm else {}),
            **({"loss_scale": float(self.state.loss_scale.scale.numpy())} if self.state.loss_scale else {}),
        })
        self.summaries.write_layer_scalars(self.state.model, step)
        if self.config.weight_decay:
            self.summaries.write_scalars("train", step, {
                f"weight_decay/{path}": term
                for path, term in optimizers.layer_decay_terms(self.state.model, self.config.weight_decay).items()})
        self.console.progress(step, {name: means[name] for name in steps.TRAIN_MEASUREMENTS})


class _Interval:
    """Sums since the last scalar summary, so each logged point is the mean over its interval;
    the gradient's norms, taken at the last step of each loop call, are the latest ones instead."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._sums: dict[str, float] = {}
        self._latest: dict[str, float] = {}
        self._steps = self._examples = 0
        self._seconds = 0.0

    def add(self, sums: dict[str, float], num_steps: int, examples: int, seconds: float) -> None:
        for name, value in sums.items():
            if name.startswith("gradient_norm"):
                self._latest[name] = value
            else:
                self._sums[name] = self._sums.get(name, 0.0) + value
        self._steps += num_steps
        self._examples += examples
        self._seconds += seconds

    def pop_means(self) -> dict[str, float]:
        """The interval's mean measurements, its latest gradient norms and its throughput; starts a
        new interval."""
        means = {name: value / self._steps for name, value in self._sums.items()}
        means.update(self._latest, examples_per_second=self._examples / self._seconds)
        self._reset()
        return means


@dataclasses.dataclass
class Timer:
    """Steady-state throughput: a process's first loop call, which traces, is left out."""

    first: tuple[int, float] | None = None
    first_done_at: float = 0.0
    examples: int = 0
    seconds: float = 0.0

    def add(self, examples: int, started: float, ended: float) -> None:
        if self.first is None:
            self.first, self.first_done_at = (examples, ended - started), ended
        else:
            self.examples += examples
            self.seconds += ended - started

    @property
    def examples_per_second(self) -> float:
        examples, seconds = (self.examples, self.seconds) if self.seconds else (self.first or (0, 1.0))
        return examples / seconds if seconds else 0.0


def _due(step: int, every: int, epoch_end: bool) -> bool:
    """Whether a periodic action runs at `step`; `every` = 0 means at the end of each epoch."""
    return step % every == 0 if every else epoch_end


def _floats(tensors: dict[str, tf.Tensor]) -> dict[str, float]:
    return {name: float(value) for name, value in tensors.items()}
