"""`train(config)`: wires the pieces in data-flow order and runs the eager outer loop."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from train_loop import checkpoints, data, distribute, runs, steps
from train_loop.configs import Config
from train_loop.console import Console
from train_loop.errors import DivergedError, Interrupted
from train_loop.models import build_model, plain_keras, weighted_layers
from train_loop.preemption import SignalStop
from train_loop.profiling import StepProfiler
from train_loop.summaries import Summaries, drop_events_after


def train(config: Config) -> dict[str, Any]:
    """Trains, evaluates after every epoch, and writes the run; resumes an interrupted one.

    On a multi-worker cluster every worker trains; the chief alone writes the run.

    Returns:
      The content of `<run>/result.json`.

    Raises:
      UsageError: bad settings, missing or corrupt data; raised before anything is written.
      DivergedError, Interrupted: training stopped early (see `errors`).
    """
    started = time.perf_counter()
    # Inputs first, so that every user error comes before a single file is written.
    splits = data.load_splits(config)
    steps_per_epoch = data.steps_per_epoch(splits, config.batch_size)
    run_dir = runs.choose_run_dir(config)
    strategy = distribute.make_strategy(config)
    distribute.check_global_batch(strategy, config.batch_size)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    chief = distribute.is_chief(strategy)
    with _checkpoint_dir(run_dir, chief) as save_dir:
        return _train(config, splits, steps_per_epoch, strategy, run_dir, chief, save_dir, started)


@contextlib.contextmanager
def _checkpoint_dir(run_dir: str, chief: bool) -> Iterator[str]:
    """Where this process saves checkpoints: the run's folder on the chief; elsewhere a
    temporary folder, removed at the end (saving is collective, so every worker saves)."""
    if chief:
        yield checkpoints.directory(run_dir)
        return
    with tempfile.TemporaryDirectory(prefix="train_loop-worker-") as folder:
        yield folder


def _train(config: Config, splits: data.Splits, steps_per_epoch: int, strategy: tf.distribute.Strategy,
           run_dir: str, chief: bool, save_dir: str, started: float) -> dict[str, Any]:
    """`train` after the checks; a worker that is not the chief writes nothing into `run_dir`."""
    # All state inside the scope: Keras optimizers otherwise build their slots lazily, in a trace.
    with strategy.scope():
        model = build_model(config, splits.x_train.shape[1:])
        optimizer = steps.build_optimizer(config)
        optimizer.build(model.trainable_variables)
        loss_scale = steps.LossScale() if config.precision == "mixed_float16" else None
    state = LoopState()
    scaling = {"loss_scale": loss_scale} if loss_scale else {}
    # The dropout layers' seed states too, so a resumed run draws the masks an uninterrupted one would.
    manager = checkpoints.make_manager(
        save_dir, model=model, optimizer=optimizer, rng=[v.value for v in model.non_trainable_variables],
        **state.trackables(), **scaling)
    resumed = checkpoints.restore_latest(manager, checkpoints.directory(run_dir))
    console = Console(steps_per_epoch=steps_per_epoch, num_epochs=config.epochs)
    console.say(f"resuming {run_dir} from step {state.step}" if resumed else f"training {run_dir} on {splits.source}")
    summaries = _open_run(config, run_dir if chief else None, model, strategy, state.step if resumed else -1)

    # The step, and the data it pulls from, starting where the restored state stands.
    train_input = data.ReplicaInput(strategy, data.train_dataset_fn(
        splits, global_batch_size=config.batch_size, seed=config.seed,
        num_epochs=config.epochs, start_step=state.step))
    replica_gradients = steps.make_replica_gradients(
        model, config.batch_size, loss_scale=loss_scale, jit_compile=config.jit_compile)
    train_step = steps.make_train_step(strategy, model, optimizer, replica_gradients, loss_scale=loss_scale)
    train_loop = steps.make_train_loop(train_step, steps.measurement_names(model), train_input.next_batch)
    iterator = train_input.iterator()
    eval_fn, eval_batches = data.eval_dataset_fn(splits, config.batch_size)
    eval_input = data.ReplicaInput(strategy, eval_fn)
    eval_loop = steps.make_eval_loop(model, strategy, eval_input.next_batch)

    def evaluate() -> Evaluation:
        measured = eval_loop(eval_input.iterator(), tf.constant(eval_batches))
        return Evaluation({name: float(measured[name]) for name in ("cross_entropy", "accuracy")},
                          measured["confusion_matrix"].numpy())

    profiler = StepProfiler(config.profile_range if chief else None, os.path.join(run_dir, "train"))
    signals = SignalStop(strategy)
    run = _Run(config, steps_per_epoch, model, optimizer, manager, summaries, console, state, loss_scale,
               profiler, signals)
    try:
        with signals.catching():
            timer = run.run_epochs(lambda num_steps: train_loop(iterator, tf.constant(num_steps)), evaluate)
    finally:
        summaries.close()
    evaluation = run.evaluation or evaluate()  # Resumed past the last step: the restored weights.

    result = {
        "dataset": config.dataset,
        "strategy": distribute.resolve_strategy_name(config.strategy),
        "replicas": strategy.num_replicas_in_sync,
        "steps": state.step,
        "epochs": int(state.epoch),
        "train": state.epoch_means(),
        "eval": evaluation.metrics,
        # Rows: true label, columns: predicted label, over the test split.
        "confusion_matrix": evaluation.confusion_matrix.tolist(),
        "examples_per_second": timer.examples_per_second,
        # From train() to the end of the first step: data, model, tracing, compiling.
        "seconds_to_first_step": timer.first_done_at - started if timer.first else None,
    }
    if chief:
        _save_model(model, run_dir)
        runs.write_json(os.path.join(run_dir, runs.RESULT_FILE), result)
    return result


def _open_run(config: Config, run_dir: str | None, model: keras.Model, strategy: tf.distribute.Strategy,
              restored_step: int) -> Summaries:
    """The run folder and its writers; a fresh start logs the settings and the initial weights.

    Events logged after the restored checkpoint (by the process that was killed) are dropped
    first, so the resumed run's curves continue without repeated steps.
    """
    if run_dir is None:
        return Summaries(None)
    runs.create(run_dir, config)
    drop_events_after(run_dir, restored_step)
    summaries = Summaries(run_dir)
    if restored_step < 0:
        summaries.write_settings(os.path.basename(run_dir), _hparams(config, strategy))
        # Step 0 shows the initial weights: what the regularizers start from.
        initial_term = _write_layer_scalars(summaries, model, 0)
        summaries.write_scalars("train", 0, {"loss/regularization": initial_term})
        _write_histograms(summaries, model, 0)
    return summaries


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One pass over the test split: cross-entropy and accuracy, and the confusion matrix."""

    metrics: dict[str, float]
    confusion_matrix: np.ndarray


def _check_finite(sums: dict[str, float], step: int, num_steps: int) -> None:
    for name in ("cross_entropy", "regularization", "gradient_norm"):
        if not math.isfinite(sums[name]):
            raise DivergedError(
                f"training diverged: {name} became {sums[name]} between steps {step + 1} and "
                f"{step + num_steps}; nothing past step {step} was saved. Lower --learning_rate.")


class LoopState:
    """The outer loop's counters, kept in variables so that checkpoints carry them.

    `epoch_sums` holds the current epoch's summed measurements and its step count, so a run
    resumed mid-epoch, or after its last checkpoint, still reports the whole epoch's means.
    """

    def __init__(self) -> None:
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.epoch_sums = tf.Variable(tf.zeros([len(steps.TRAIN_MEASUREMENTS) + 1], tf.float64),
                                      trainable=False)

    @property
    def step(self) -> int:
        return int(self._step)

    def trackables(self) -> dict[str, tf.Variable]:
        return {"step": self._step, "epoch": self.epoch, "epoch_sums": self.epoch_sums}

    def advance(self, sums: dict[str, float], num_steps: int) -> None:
        self._step.assign_add(num_steps)
        self.epoch_sums.assign_add([*(sums[name] for name in steps.TRAIN_MEASUREMENTS), num_steps])

    def epoch_means(self) -> dict[str, float]:
        *totals, count = self.epoch_sums.numpy().tolist()
        return {name: total / max(count, 1) for name, total in zip(steps.TRAIN_MEASUREMENTS, totals)}


@dataclasses.dataclass
class _Run:
    """The eager outer loop: calls the traced loop between events, and handles each event."""

    config: Config
    steps_per_epoch: int
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    manager: tf.train.CheckpointManager
    summaries: Summaries
    console: Console
    state: LoopState
    loss_scale: steps.LossScale | None
    profiler: StepProfiler
    signals: SignalStop
    evaluation: Evaluation | None = None

    def run_epochs(self, train_steps: Callable[[int], dict], evaluate: Callable[[], Evaluation]) -> _Timer:
        """Runs until the last epoch ends; returns the throughput timer."""
        config, state, timer, interval = self.config, self.state, _Timer(), _Interval()
        while state.step < self.steps_per_epoch * config.epochs:
            if state.step % self.steps_per_epoch == 0:
                state.epoch_sums.assign(tf.zeros_like(state.epoch_sums))
            # The first call of a process traces and compiles: one step, so that it is timed apart.
            num_steps = 1 if timer.first is None else self._steps_to_next_event()
            self.profiler.before(state.step)
            started = time.perf_counter()
            sums = _floats(train_steps(num_steps))
            interval.add(sums, num_steps, num_steps * config.batch_size, time.perf_counter() - started)
            _check_finite(sums, state.step, num_steps)
            state.advance(sums, num_steps)

            step, epoch_end = state.step, state.step % self.steps_per_epoch == 0
            self.profiler.after(step, last=step == self.steps_per_epoch * config.epochs)
            if step % config.summary_every == 0 or epoch_end:
                self._write_train_summaries(step, interval.pop_means())
            if _due(step, config.histogram_every, epoch_end):
                _write_histograms(self.summaries, self.model, step)
            # Training time counts the steps and their summaries; evaluation and checkpoints not.
            timer.add(num_steps * config.batch_size, started, time.perf_counter())
            if epoch_end:
                self._end_epoch(step, evaluate(), timer.examples_per_second)
            # Events before the checkpoint: a run resumed from it keeps every event up to its step.
            self.summaries.flush()
            stop = self.signals.requested()
            if _due(step, config.checkpoint_every, epoch_end) or stop:
                checkpoints.save(self.manager, step)
            if stop:
                raise Interrupted(f"stopped by {signal.Signals(stop).name} at step {step} with a checkpoint; "
                                  "the same command resumes the run.", stop)
        return timer

    def _steps_to_next_event(self) -> int:
        """Steps until the next summary, histogram, checkpoint or epoch end, at most steps_per_loop."""
        step, config = self.state.step, self.config
        intervals = [config.summary_every, self.steps_per_epoch]
        intervals += [every for every in (config.histogram_every, config.checkpoint_every) if every]
        boundaries = [boundary - step for boundary in self.profiler.boundaries() if boundary > step]
        return min(config.steps_per_loop, *(every - step % every for every in intervals), *boundaries)

    def _write_train_summaries(self, step: int, means: dict[str, float]) -> None:
        self.summaries.write_scalars("train", step, {
            "loss/cross_entropy": means["cross_entropy"],
            "loss/regularization": means["regularization"],
            "loss/total": means["total"],
            "accuracy": means["accuracy"],
            "learning_rate": float(keras.ops.convert_to_numpy(self.optimizer.learning_rate)),
            "examples_per_second": means["examples_per_second"],
            **{name: value for name, value in means.items() if name.startswith("gradient_norm")},
            **({"loss_scale": float(self.loss_scale.scale.numpy())} if self.loss_scale else {}),
        })
        _write_layer_scalars(self.summaries, self.model, step)
        self.console.progress(step, {name: means[name] for name in steps.TRAIN_MEASUREMENTS})

    def _end_epoch(self, step: int, evaluation: Evaluation, examples_per_second: float) -> None:
        self.evaluation = evaluation
        self.summaries.write_scalars("eval", step, {
            "loss/cross_entropy": evaluation.metrics["cross_entropy"], "accuracy": evaluation.metrics["accuracy"]})
        self.summaries.write_confusion_matrix(step, evaluation.confusion_matrix)
        self.state.epoch.assign_add(1)
        self.console.epoch_done(int(self.state.epoch), self.state.epoch_means(), evaluation.metrics,
                                examples_per_second)


class _Interval:
    """Sums since the last scalar summary, so each logged point is the mean over its interval."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._sums: dict[str, float] = {}
        self._steps = self._examples = 0
        self._seconds = 0.0

    def add(self, sums: dict[str, float], num_steps: int, examples: int, seconds: float) -> None:
        for name, value in sums.items():
            self._sums[name] = self._sums.get(name, 0.0) + value
        self._steps += num_steps
        self._examples += examples
        self._seconds += seconds

    def pop_means(self) -> dict[str, float]:
        """The interval's mean measurements and its throughput; starts a new interval."""
        means = {name: value / self._steps for name, value in self._sums.items()}
        means["examples_per_second"] = self._examples / self._seconds
        self._reset()
        return means


@dataclasses.dataclass
class _Timer:
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


def _write_layer_scalars(summaries: Summaries, model: keras.Model, step: int) -> float:
    """Each layer's regularization term and kernel L2 norm, from the weights as they are at
    `step`; returns the terms' sum."""
    terms = {layer.name: float(tf.add_n(layer.losses)) for layer in model.layers if layer.losses}
    summaries.write_scalars("train", step, {
        **{f"regularization/{name}": value for name, value in terms.items()},
        **{f"weight_norm/{layer.name}": float(tf.norm(layer.kernel)) for layer in weighted_layers(model)},
    })
    return sum(terms.values())


def _write_histograms(summaries: Summaries, model: keras.Model, step: int) -> None:
    summaries.write_histograms(step, {
        f"{kind}/{layer.name}": tf.convert_to_tensor(getattr(layer, kind))
        for layer in weighted_layers(model) for kind in ("kernel", "bias")})


def _hparams(config: Config, strategy: tf.distribute.Strategy) -> dict[str, Any]:
    settings = {key: value for key, value in config.to_dict().items()
                if key not in ("logdir", "run_name", "data_dir")}
    return {**settings, "replicas": strategy.num_replicas_in_sync}


def _floats(tensors: dict[str, tf.Tensor]) -> dict[str, float]:
    return {name: float(value) for name, value in tensors.items()}


def _save_model(model: keras.Model, run_dir: str) -> None:
    """`model.keras` through a temporary name, so a kill leaves no half-written model."""
    temporary = os.path.join(run_dir, "model.tmp.keras")
    plain_keras(model).save(temporary)
    os.replace(temporary, os.path.join(run_dir, "model.keras"))
