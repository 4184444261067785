"""`train(config)`: wires the pieces in data-flow order and runs the eager outer loop."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from train_loop import checkpoints, distribute, inputs, metrics_file, runs, sources, steps, tuning
from train_loop.configs import MODELS, Config
from train_loop.console import Console
from train_loop.epochs import Evaluation, Run, Timer
from train_loop.models import ModelFunction, load_model_function, plain_keras
from train_loop.preemption import SignalStop
from train_loop.profiling import StepProfiler, Stopwatch
from train_loop.state import build_state
from train_loop.summaries import Summaries, drop_events_after, write_logdir_experiment


def train(config: Config, *, model_fn: ModelFunction | None = None,
          arrays: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Trains, validates periodically, tests once at the end, and writes the run; resumes an
    interrupted one.

    On a multi-worker cluster every worker trains; the chief alone writes the run. `model_fn`
    and `arrays` are a user's model function and data, when given as Python objects (see
    `train_loop.train`); otherwise `config.model` and `config.dataset` say where they are.

    Returns:
      The content of `<run>/result.json`.

    Raises:
      UsageError: bad settings, missing or corrupt data; raised before anything is written.
      DivergedError, Interrupted: training stopped early (see `errors`).
    """
    started, stopwatch = time.perf_counter(), Stopwatch()
    # Inputs first, so that every user error comes before a single file is written.
    with stopwatch.phase("data"):
        splits = sources.hold_out(sources.load_splits(config, arrays), config.validation_split, seed=config.seed)
    steps_per_epoch = inputs.steps_per_epoch(splits, config.batch_size)
    if model_fn is None and config.model not in MODELS:
        model_fn = load_model_function(config.model)
    run_dir = runs.choose_run_dir(config)
    strategy = distribute.make_strategy(config)
    distribute.check_global_batch(strategy, config.batch_size)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    chief = distribute.is_chief(strategy)
    with runs.owned(config, run_dir, chief=chief) as run_dir, checkpoints.save_directory(run_dir, chief) as save_dir, \
            checkpoints.no_space_left(run_dir):
        return _train(config, splits, steps_per_epoch=steps_per_epoch, strategy=strategy, run_dir=run_dir,
                      chief=chief, save_dir=save_dir, started=started, stopwatch=stopwatch, model_fn=model_fn)


def _train(config: Config, splits: sources.Splits, *, steps_per_epoch: int, strategy: tf.distribute.Strategy,
           run_dir: str, chief: bool, save_dir: str, started: float, stopwatch: Stopwatch,
           model_fn: ModelFunction | None) -> dict[str, Any]:
    """`train` after the checks; a worker that is not the chief writes nothing into `run_dir`."""
    state = build_state(config, strategy, splits.x_train.shape[1:], num_classes=splits.num_classes,
                        model_fn=model_fn)
    model, optimizer, best, counters = state.model, state.optimizer, state.best, state.counters
    checkpoint = tf.train.Checkpoint(**state.trackables())
    resumed = checkpoints.restore_latest(checkpoint, checkpoints.directory(run_dir), repair=chief)
    manager = checkpoints.make_manager(checkpoint, save_dir)
    # Under launch every worker trains; the chief alone shows the progress, once.
    console = Console(steps_per_epoch=steps_per_epoch, num_epochs=config.epochs, show_progress=chief)
    console.say(f"resuming {run_dir} from step {counters.step}" if resumed
                else f"training {run_dir} on {splits.source}")
    held_out = 0 if splits.x_validation is None else len(splits.x_validation)
    console.say(f"{len(splits.x_train):,} training, {held_out:,} validation and {len(splits.x_test):,} test "
                f"examples; {distribute.describe(strategy)}")
    # After the run's model is built: the throwaway models timed here must not shift its layers' names.
    with stopwatch.phase("decide_xla"):
        decision = tuning.decide_jit_compile(config, strategy, splits, runs.read_settings(run_dir),
                                             model_fn=model_fn)
    console.say(decision.describe())
    if config.ema:
        console.say(f"evaluation and model.keras use the weights' moving average (--ema={config.ema:g})")
    summaries = _open_run(config, run_dir if chief else None, model, strategy, counters.step if resumed else -1,
                          decision=decision)

    # The step, and the data it pulls from, starting where the restored state stands.
    train_input = inputs.ReplicaInput(strategy, inputs.train_dataset_fn(
        splits, global_batch_size=config.batch_size, seed=config.seed,
        num_epochs=config.epochs, start_step=counters.step))
    replica_gradients = steps.make_replica_gradients(
        model, config.batch_size, loss_scale=state.loss_scale, jit_compile=decision.jit_compile)
    train_step = steps.make_train_step(strategy, model, optimizer, replica_gradients, loss_scale=state.loss_scale,
                                       global_clipnorm=config.global_clipnorm)
    train_loop = steps.make_train_loop(train_step, steps.gradient_norm_names(model), train_input.next_batch)
    iterator = train_input.iterator()

    # Validation scores the weights as they are (averaged, with --ema); the end scores the kept ones.
    averaged = state.validated_weights
    kept = state.kept_weights
    evaluator = functools.partial(_evaluator, strategy, model, config=config, num_classes=splits.num_classes,
                                  stopwatch=stopwatch)
    validate = None if splits.x_validation is None else evaluator(splits.x_validation, splits.y_validation)

    profiler = StepProfiler(config.profile_range if chief else None, os.path.join(run_dir, "train"))
    signals = SignalStop(strategy)

    def save_best() -> None:
        if chief:
            _save_model(model, os.path.join(run_dir, "best"))

    run = Run(config=config, steps_per_epoch=steps_per_epoch, state=state, manager=manager, summaries=summaries,
              metrics_file=metrics_file.MetricsFile(run_dir if chief else None), console=console,
              profiler=profiler, signals=signals, stopwatch=stopwatch, save_best=save_best)
    try:
        with signals.catching():
            timer = run.run_epochs(lambda num_steps: train_loop(iterator, tf.constant(num_steps)),
                                   validate and functools.partial(validate, averaged))
        # The kept model's validation: the best weights' again, or the last (resumed past the last
        # step, the restored weights').
        validation = validate and (validate(kept) if best else run.validation or validate(averaged))
        # Once, at the end: the test split chooses nothing, so its score does not leak into the run.
        test = evaluator(splits.x_test, splits.y_test)(kept)
        summaries.write_evaluation("test", counters.step, test.metrics, test.confusion_matrix)
    finally:
        summaries.close()
    console.tested(test.metrics)

    result = {
        "dataset": config.dataset,
        "strategy": distribute.resolve_strategy_name(config.strategy),
        "replicas": strategy.num_replicas_in_sync,
        "decided": decision.to_dict(),
        "steps": counters.step,
        "epochs": int(counters.epoch),
        "train": counters.epoch_means(),
        "validation": validation.metrics if validation else None,
        "best_step": best.step if best else None,
        "stopped_early": bool(best and best.stop),
        "test": test.metrics,
        # Rows: true label, columns: predicted label, over the test split.
        "confusion_matrix": test.confusion_matrix.tolist(),
        "examples_per_second": timer.examples_per_second,
        # From train() to the end of the first step: data, model, tracing, compiling.
        "seconds_to_first_step": timer.first_done_at - started if timer.first else None,
    }
    if chief:
        with stopwatch.phase("save_model"), kept():
            _save_model(model, run_dir)
            if config.export == "saved_model":
                _export_saved_model(model, run_dir)
    result["seconds"] = _phases(stopwatch, timer, started)
    if chief:
        runs.write_json(os.path.join(run_dir, runs.RESULT_FILE), result)
    console.finished(run_dir, config.logdir)
    return result


def _evaluator(strategy: tf.distribute.Strategy, model: keras.Model, images: np.ndarray, labels: np.ndarray, *,
               config: Config, num_classes: int, stopwatch: Stopwatch,
               ) -> Callable[[Callable[[], contextlib.AbstractContextManager]], Evaluation]:
    """`evaluate(weights)`: one split's evaluation, of the model while it holds `weights()`."""
    eval_fn, num_batches = inputs.eval_dataset_fn(images, labels, config.batch_size)
    eval_input = inputs.ReplicaInput(strategy, eval_fn)
    eval_loop = steps.make_eval_loop(model, strategy, eval_input.next_batch, num_classes=num_classes)

    def evaluate(weights: Callable[[], contextlib.AbstractContextManager]) -> Evaluation:
        with stopwatch.phase("evaluation"), weights():
            measured = eval_loop(eval_input.iterator(), tf.constant(num_batches))
        return Evaluation({name: float(measured[name]) for name in ("cross_entropy", "accuracy")},
                          measured["confusion_matrix"].numpy())
    return evaluate


def _phases(stopwatch: Stopwatch, timer: Timer, started: float) -> dict[str, float]:
    """Where the run's time went, from `train()` on: "training" is the steady state, "first_step"
    the process's first loop call (tracing, compiling); what no phase names is building the
    model, restoring and opening the run."""
    seconds = dict(stopwatch.seconds)
    if timer.first:
        seconds["first_step"] = timer.first[1]
    seconds["training"] = timer.seconds
    seconds["total"] = time.perf_counter() - started
    return seconds


def _open_run(config: Config, run_dir: str | None, model: keras.Model, strategy: tf.distribute.Strategy,
              restored_step: int, *, decision: tuning.Decision) -> Summaries:
    """The run folder and its writers; a fresh start logs the settings and the initial weights.

    Events logged after the restored checkpoint (by the process that was killed) are dropped
    first, so the resumed run's curves continue without repeated steps.
    """
    if run_dir is None:
        return Summaries(None)
    runs.create(run_dir, config, decided=decision.to_dict())
    drop_events_after(run_dir, restored_step)
    metrics_file.drop_lines_after(run_dir, restored_step)
    summaries = Summaries(run_dir, class_names=sources.class_names(config.dataset))
    if restored_step < 0:
        summaries.write_settings(os.path.basename(run_dir), _hparams(config, strategy))
        # Step 0 shows the initial weights: what the regularizers start from.
        initial_term = summaries.write_layer_scalars(model, 0)
        summaries.write_scalars("train", 0, {"loss/regularization": initial_term})
        summaries.write_weight_histograms(model, 0)
        summaries.flush()
        write_logdir_experiment(run_dir)  # Its HParams table shows what differs, this run's settings included.
    return summaries


def _hparams(config: Config, strategy: tf.distribute.Strategy) -> dict[str, Any]:
    settings = {key: value for key, value in config.to_dict().items()
                if key not in ("logdir", "run_name", "data_dir")}
    return {**settings, "replicas": strategy.num_replicas_in_sync}


def _save_model(model: keras.Model, folder: str) -> None:
    """`<folder>/model.keras` through a temporary name, so a kill leaves no half-written model."""
    os.makedirs(folder, exist_ok=True)
    runs.write_atomically(os.path.join(folder, "model.keras"), plain_keras(model).save)


def _export_saved_model(model: keras.Model, run_dir: str) -> None:
    """`<run>/saved_model/` for serving, through Keras' `model.export`: its `serve` signature takes
    a batch of inputs and returns logits. Written beside it and renamed, as `model.keras` is."""
    final, temporary = os.path.join(run_dir, "saved_model"), os.path.join(run_dir, "saved_model.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    with checkpoints.no_space_left(final, temporary=temporary):
        plain_keras(model).export(temporary, format="tf_saved_model", verbose=False)
    shutil.rmtree(final, ignore_errors=True)  # A killed process's export, before its result.json.
    os.replace(temporary, final)
