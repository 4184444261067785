"""`train(config)`: one run wired top to bottom, in data-flow order, then handed to the controller."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from train_loop.configs import Config
from train_loop.data.streams import InputFunction
from train_loop.model import tasks
from train_loop.model.state import TrainState, build_state
from train_loop.model.user_models import ModelFunction, load_model_function
from train_loop.outputs import checkpoints, positions, runs
from train_loop.outputs.run_outputs import RunOutputs
from train_loop.settings import MODELS, is_stream
from train_loop.training import actions, distribute, divergence, preflight, xla_choice
from train_loop.training.console import Console
from train_loop.training.controller import make_controller
from train_loop.training.evaluation import Evaluation, Weights, make_evaluator
from train_loop.training.finish import finish
from train_loop.training.preemption import SignalStop
from train_loop.training.run_data import RunData, restore_worker_position
from train_loop.training.timing import Stopwatch
from train_loop.user_actions import PeriodicAction


def train(
    config: Config,
    *,
    model_fn: ModelFunction | None = None,
    arrays: Mapping[str, np.ndarray] | None = None,
    task: tasks.UserTask | None = None,
    user_actions: Sequence[PeriodicAction] = (),
    input_fn: InputFunction | None = None,
) -> dict[str, Any]:
    """Trains, validates periodically, tests once at the end, and writes the run; resumes an
    interrupted one. On a multi-worker cluster every worker trains and the chief alone writes.

    `model_fn`, `arrays`, `task` and `input_fn` are a user's model function, data, task and input
    function given as Python objects, and `user_actions` the user's periodic actions (see
    `train_loop.train`). Returns what `<run>/result.json` holds, and "run_dir": the folder the run
    took, absolute (result.json does not hold it: that folder may be moved).

    Raises:
      UsageError: bad settings, missing or corrupt data; raised before anything is written, or, for
        a streamed example that changed shape (met while training), with what the run wrote removed.
      DivergedError, Interrupted, ActionFailed: training stopped early (see `errors`).
    """
    started, stopwatch = time.perf_counter(), Stopwatch()
    # The task and the data first, so that every user error comes before a single file is written.
    run_task = tasks.task_for(config.loss, config.metrics, task or config.task)
    # A task's own data streams, unless the flags name other data.
    task_input = run_task.input_fn if not (is_stream(config) or arrays or config.dataset != Config.dataset) else None
    # Reading a stream runs TensorFlow's ops, and a cluster's strategy must connect before the first one.
    strategy = distribute.make_strategy(config) if is_stream(config) or task_input else None
    with stopwatch.phase("data"):
        data = RunData.read(
            config,
            arrays=arrays,
            input_fn=input_fn or task_input,
            input_name=f"{run_task.flag}'s input_fn" if task_input else "",
            targets=run_task.targets,
        )
    steps_per_epoch = data.steps_per_epoch(config)
    config = config.with_run_length(steps_per_epoch)
    model_fn = model_fn or (None if config.model in MODELS else load_model_function(config.model))
    run_dir = runs.choose_run_dir(config)
    if data.fingerprint:
        runs.check_same_source(run_dir, data.fingerprint, data.summary.source)
    strategy = strategy or distribute.make_strategy(config)
    distribute.check_global_batch(strategy, config.batch_size, config.accumulation_steps)
    divergence.check_strategy(config, strategy)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    chief = distribute.is_chief(strategy)
    position = data.position(config, strategy)
    with (
        data.quiet_failed_reads(),
        runs.owned(config, run_dir, chief=chief) as run_dir,
        checkpoints.save_directory(run_dir, chief) as save_dir,
        checkpoints.no_space_left(run_dir),
    ):
        # The train state, restored where a checkpoint holds it.
        state = build_state(
            config,
            strategy,
            data.input_shape,
            num_classes=data.num_classes,
            model_fn=model_fn,
            task=run_task,
            sample=data.sample_batch(),
        )
        worker = data.worker_position(run_dir, strategy)
        checkpoint, restored_step = _restore(
            state, run_dir, chief=chief, position=position, worker=worker, strategy=strategy
        )
        # Under launch every worker trains; the chief alone shows the progress, once.
        console = Console(steps_per_epoch=steps_per_epoch, num_epochs=config.epochs, show_progress=chief)
        console.say_start(
            run_dir, data.summary, distribute.describe(strategy), restored_step=restored_step, ema=config.ema
        )
        # After the run's model is built: the throwaway models timed here must not shift its layers' names.
        with stopwatch.phase("decide_xla"):
            decision = xla_choice.decide_jit_compile(
                config,
                strategy,
                data.timing_data(config),
                runs.read_settings(run_dir),
                model_fn=model_fn,
                task=run_task,
            )
        console.say(decision.describe())
        if state.best:
            console.say(state.best.describe())
        decided = preflight.run_checks(
            config, strategy, state, data, run_dir=run_dir, decided=decision.to_dict(), console=console
        )
        outputs = RunOutputs.open(
            config,
            run_dir,
            chief=chief,
            restored_step=restored_step,
            decided=decided,
            settings=_hparams(config, strategy),
            table=state.table,
            source=data.fingerprint,
        )
        loop_call = data.loop_call(config, strategy, state, jit_compile=decision.jit_compile)
        # Validation scores the weights as they are (averaged, with --ema); the end scores the kept ones,
        # in batches of the micro-batch: accumulation is there because the whole batch does not fit.
        eval_batch_size = config.batch_size // config.accumulation_steps
        evaluate = make_evaluator(
            strategy, state, batch_size=eval_batch_size, num_classes=data.num_classes, stopwatch=stopwatch
        )
        validate, test = data.evaluations(evaluate, eval_batch_size)
        validation = validate and _validation(
            config, state, validate, outputs=outputs, console=console, steps_per_epoch=steps_per_epoch
        )
        signals, manager = (
            SignalStop(strategy),
            checkpoints.make_manager(checkpoint, save_dir, beside=worker and worker.manager()),
        )
        controller = make_controller(
            config,
            loop_call,
            strategy=strategy,
            steps_per_epoch=steps_per_epoch,
            state=state,
            outputs=outputs,
            validation=validation,
            console=console,
            manager=manager,
            signals=signals,
            stopwatch=stopwatch,
            user_actions=user_actions,
            divergence=divergence.Divergence(
                config,
                strategy,
                state,
                data,
                checkpoint,
                manager,
                outputs,
                console,
                jit_compile=decision.jit_compile,
                worker=worker,
            ),
        )
        # Leaving by a stop or an error ends the bar's line first: its message starts a line.
        with outputs, signals.catching(), console:
            controller.run()
            result = finish(
                config,
                state,
                outputs,
                validate=validate,
                test=test,
                latest_validation=validation and validation.latest,
                strategy=strategy,
                decided=decided,
                throughput=controller.throughput,
                stopwatch=stopwatch,
                started=started,
                console=console,
                signals=signals,
            )
    return {**result, "run_dir": os.path.abspath(run_dir)}


def _restore(
    state: TrainState,
    run_dir: str,
    *,
    chief: bool,
    position: dict[str, object],
    worker: positions.WorkerPosition | None,
    strategy: tf.distribute.Strategy,
) -> tuple[tf.train.Checkpoint, int | None]:
    """The checkpoint of `state` and the data's `position` (a stream's iterator), restored from the
    run's newest checkpoint that restores (one written before the measurements had names too), and
    the step it restored; None: a fresh start. Under several workers, the iterator is each
    `worker`'s, restored from its own checkpoint at the step every worker saved."""
    if position:
        positions.check_saved_alike(run_dir, worker.count if worker else 0)
    checkpoint = tf.train.Checkpoint(**state.trackables(), **({} if worker else position))
    positional = tf.train.Checkpoint(**state.positional_trackables())
    restored = checkpoints.restore_latest(
        checkpoint,
        checkpoints.directory(run_dir),
        repair=chief,
        positional=positional,
        steps=worker and worker.common_steps(),
    )
    state.counters.take_positional()
    if restored and worker:
        restore_worker_position(worker, state.counters.step, strategy)
    return checkpoint, state.counters.step if restored else None


def _validation(
    config: Config,
    state: TrainState,
    validate: Callable[[Weights], Evaluation],
    *,
    outputs: RunOutputs,
    console: Console,
    steps_per_epoch: int,
) -> actions.Validation:
    """The validation action: the weights validation scores, the best model kept beside the run."""
    return actions.Validation(
        actions.Cadence(config.eval_every, steps_per_epoch, at_last=True),
        state=state,
        validate=lambda: validate(state.validated_weights),
        summaries=outputs.summaries,
        console=console,
        save_best=lambda: outputs.save_best(state.model),
    )


def _hparams(config: Config, strategy: tf.distribute.Strategy) -> dict[str, Any]:
    """The settings TensorBoard's HParams dashboard compares: where a run is written is left out."""
    settings = {key: value for key, value in config.to_dict().items() if key not in ("logdir", "run_name", "data_dir")}
    return {**settings, "replicas": strategy.num_replicas_in_sync}
