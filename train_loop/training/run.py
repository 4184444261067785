"""`train(config)`: wires the pieces in data-flow order and runs the controller."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from train_loop.configs import MODELS, Config
from train_loop.data import inputs, sources
from train_loop.model import steps
from train_loop.model.models import ModelFunction, load_model_function
from train_loop.model.state import TrainState, build_state
from train_loop.outputs import checkpoints, exports, metrics_file, runs
from train_loop.outputs.summaries import Summaries, drop_events_after, write_logdir_experiment
from train_loop.training import distribute, xla_choice
from train_loop.training.console import Console
from train_loop.training.controller import Wiring, make_controller
from train_loop.training.evaluation import make_evaluator
from train_loop.training.preemption import SignalStop
from train_loop.training.timing import Stopwatch, phases


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
    # The train state, restored where a checkpoint holds it.
    state = build_state(config, strategy, splits.x_train.shape[1:], num_classes=splits.num_classes,
                        model_fn=model_fn)
    checkpoint = tf.train.Checkpoint(**state.trackables())
    resumed = checkpoints.restore_latest(checkpoint, checkpoints.directory(run_dir), repair=chief,
                                         positional=tf.train.Checkpoint(**state.positional_trackables()))
    state.counters.take_positional()
    manager = checkpoints.make_manager(checkpoint, save_dir)
    # Under launch every worker trains; the chief alone shows the progress, once.
    console = Console(steps_per_epoch=steps_per_epoch, num_epochs=config.epochs, show_progress=chief)
    _say_start(console, config, splits, strategy, run_dir, state.counters.step if resumed else None)
    # After the run's model is built: the throwaway models timed here must not shift its layers' names.
    with stopwatch.phase("decide_xla"):
        decision = xla_choice.decide_jit_compile(config, strategy, splits, runs.read_settings(run_dir),
                                             model_fn=model_fn)
    console.say(decision.describe())
    summaries = _open_run(config, run_dir if chief else None, state, strategy,
                          state.counters.step if resumed else -1, decision=decision)

    # The loop call, and the data it pulls from, starting where the restored state stands.
    train_input = inputs.ReplicaInput(strategy, inputs.train_dataset_fn(
        splits, global_batch_size=config.batch_size, seed=config.seed,
        num_epochs=config.epochs, start_step=state.counters.step))
    loop_call = steps.make_loop_call(strategy, state, train_input.next_batch, global_batch_size=config.batch_size,
                                     jit_compile=decision.jit_compile, global_clipnorm=config.global_clipnorm)
    iterator = train_input.iterator()

    # Validation scores the weights as they are (averaged, with --ema); the end scores the kept ones.
    evaluator = make_evaluator(strategy, state.model, batch_size=config.batch_size,
                               num_classes=splits.num_classes, stopwatch=stopwatch)
    validate = None if splits.x_validation is None else evaluator(splits.x_validation, splits.y_validation)
    signals = SignalStop(strategy)
    save_best = functools.partial(exports.save_model, state.model, os.path.join(run_dir, "best"))
    controller, validation_action = make_controller(
        config, lambda num_steps, histograms: loop_call(iterator, tf.constant(num_steps), tf.constant(histograms)),
        steps_per_epoch=steps_per_epoch,
        wiring=Wiring(state=state, summaries=summaries, console=console, manager=manager,
                      metrics_file=metrics_file.MetricsFile(run_dir if chief else None),
                      signals=signals, stopwatch=stopwatch,
                      profile_dir=run_dir if chief else None,
                      validate=validate and functools.partial(validate, state.validated_weights),
                      save_best=save_best if chief else lambda: None))
    try:
        with signals.catching():
            controller.run()
        # The kept model's validation: the best weights' again, or the last (resumed past the last
        # step, the restored weights').
        latest = validation_action and validation_action.latest
        validation = validate and (validate(state.kept_weights) if state.best
                                   else latest or validate(state.validated_weights))
        # Once, at the end: the test split chooses nothing, so its score does not leak into the run.
        test = evaluator(splits.x_test, splits.y_test)(state.kept_weights)
        summaries.write_evaluation("test", state.counters.step, test.metrics, test.confusion_matrix)
    finally:
        summaries.close()
    console.tested(test.metrics)

    result = exports.result(config, strategy, state, decided=decision.to_dict(), validation=validation, test=test,
                            throughput=controller.throughput, started=started)
    if chief:
        with stopwatch.phase("save_model"), state.kept_weights():
            exports.save_model(state.model, run_dir)
            if config.export == "saved_model":
                exports.export_saved_model(state.model, run_dir)
    result["seconds"] = phases(stopwatch, controller.throughput, started)
    if chief:
        runs.write_json(os.path.join(run_dir, runs.RESULT_FILE), result)
    console.finished(run_dir, config.logdir)
    return result


def _say_start(console: Console, config: Config, splits: sources.Splits, strategy: tf.distribute.Strategy,
               run_dir: str, resumed_step: int | None) -> None:
    """What the run starts from: its folder, its data and its devices."""
    console.say(f"resuming {run_dir} from step {resumed_step}" if resumed_step is not None
                else f"training {run_dir} on {splits.source}")
    held_out = 0 if splits.x_validation is None else len(splits.x_validation)
    console.say(f"{len(splits.x_train):,} training, {held_out:,} validation and {len(splits.x_test):,} test "
                f"examples; {distribute.describe(strategy)}")
    if config.ema:
        console.say(f"evaluation and model.keras use the weights' moving average (--ema={config.ema:g})")


def _open_run(config: Config, run_dir: str | None, state: TrainState, strategy: tf.distribute.Strategy,
              restored_step: int, *, decision: xla_choice.Decision) -> Summaries:
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
        layers = state.layer_measurements()
        initial_term = sum(value for tag, value in layers.items() if tag.startswith("regularization/"))
        summaries.write_scalars("train", 0, {**layers, "loss/regularization": initial_term})
        summaries.write_histograms(0, state.weight_values())
        summaries.flush()
        write_logdir_experiment(run_dir)  # Its HParams table shows what differs, this run's settings included.
    return summaries


def _hparams(config: Config, strategy: tf.distribute.Strategy) -> dict[str, Any]:
    settings = {key: value for key, value in config.to_dict().items()
                if key not in ("logdir", "run_name", "data_dir")}
    return {**settings, "replicas": strategy.num_replicas_in_sync}
