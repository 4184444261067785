"""The end of a run, after its last step or an early stop: the kept model's validation, the test
split scored once, the saved model and its export, and `result.json`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from train_loop.configs import Config
from train_loop.model.state import TrainState
from train_loop.outputs.run_outputs import RunOutputs
from train_loop.training import distribute
from train_loop.training.console import Console
from train_loop.training.evaluation import Evaluation, Weights
from train_loop.training.preemption import SignalStop
from train_loop.training.timing import Stopwatch, Throughput, phases

Evaluate = Callable[[Weights], Evaluation]


def finish(
    config: Config,
    state: TrainState,
    outputs: RunOutputs,
    *,
    validate: Evaluate | None,
    test: Evaluate,
    latest_validation: Evaluation | None,
    strategy: tf.distribute.Strategy,
    decided: dict[str, Any],
    throughput: Throughput,
    stopwatch: Stopwatch,
    started: float,
    console: Console,
    signals: SignalStop,
) -> dict[str, Any]:
    """Scores the kept weights, saves them, writes `result.json` and says where the run is.

    A SIGTERM or SIGINT while the kept weights are scored (on a large split, the longest part)
    stops the run there, before anything is written: the last step's checkpoint is saved, so
    the same command resumes into this end again. Once the writing has begun, it finishes.

    The kept model's validation is the best weights' again, or the last validation (resumed past
    the last step, the restored weights'). The test split is scored once, here: it chooses
    nothing, so its score does not leak into the run.

    Returns:
      The content of `result.json`.
    """
    validation = validate and (
        validate(state.kept_weights) if state.best else latest_validation or validate(state.validated_weights)
    )
    tested = test(state.kept_weights)
    signals.stop_if_signalled(state.counters.step)
    scalars = state.table.tagged(tested.metrics)
    outputs.summaries.write_evaluation("test", state.counters.step, scalars, tested.confusion_matrix)
    outputs.summaries.flush()  # Before result.json, which marks the run finished.
    console.tested(tested.metrics)
    result = _result(
        config,
        strategy,
        state,
        decided=decided,
        validation=validation,
        test=tested,
        throughput=throughput,
        started=started,
    )
    with stopwatch.phase("save_model"), state.kept_weights():
        outputs.save_model(state.model, export=config.export)
    result["seconds"] = phases(stopwatch, throughput, started)
    outputs.write_result(result)
    console.finished(outputs.run_dir, config.logdir)
    return result


def _result(
    config: Config,
    strategy: tf.distribute.Strategy,
    state: TrainState,
    *,
    decided: dict[str, Any],
    validation: Evaluation | None,
    test: Evaluation,
    throughput: Throughput,
    started: float,
) -> dict[str, Any]:
    """The content of `result.json`, but for its "seconds" (taken once the model is saved)."""
    best, counters = state.best, state.counters
    return {
        "dataset": config.dataset,
        "strategy": distribute.resolve_strategy_name(config.strategy),
        "replicas": strategy.num_replicas_in_sync,
        "decided": decided,
        "steps": counters.step,
        "epochs": int(counters.epoch),
        "train": counters.epoch_means(),
        "validation": validation.metrics if validation else None,
        "best_step": best.step if best else None,
        "stopped_early": bool(best and best.stop),
        "test": test.metrics,
        # Rows: true label, columns: predicted label, over the test split; the classifier's alone.
        **({"confusion_matrix": test.confusion_matrix.tolist()} if test.confusion_matrix is not None else {}),
        "examples_per_second": throughput.examples_per_second,
        **({"rollbacks": state.rollbacks.history} if state.rollbacks else {}),
        # From train() to the end of the first step: data, model, tracing, compiling.
        "seconds_to_first_step": throughput.first_done_at - started if throughput.first else None,
    }
