"""The checks a run makes before it trains (`--check_regularizers`, `--check_equivalence`): each
one run on the run's own state, its lines said, and its verdict recorded in settings.json,
passed or failed, before the run trains or stops."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from train_loop.checks import equivalence
from train_loop.checks.regularizers import check_regularizers
from train_loop.configs import Config
from train_loop.errors import CheckFailed
from train_loop.model.state import TrainState
from train_loop.outputs import runs
from train_loop.training import distribute
from train_loop.training.console import Console
from train_loop.training.run_data import RunData


def run_checks(
    config: Config,
    strategy: tf.distribute.Strategy,
    state: TrainState,
    data: RunData,
    *,
    run_dir: str,
    decided: dict[str, Any],
    console: Console,
) -> dict[str, Any]:
    """The checks `config` asks for, after the train state is built (and restored) and the XLA
    choice (`decided["jit_compile"]`) made, each leaving every variable as it was.

    Returns:
      `decided` with each check's verdict added under its flag's name, for result.json.

    Raises:
      CheckFailed: a check failed (on every worker), with its verdict recorded.
    """
    decided = dict(decided)
    if config.check_regularizers:  # Its table once, from the chief: the same on every worker.
        say = console.say if distribute.is_chief(strategy) else _silent
        verdict = check_regularizers(
            config, strategy, state, data.sample_batch(), say=say, jit_compile=decided["jit_compile"]
        )
        decided["check_regularizers"] = _record(
            config, strategy, verdict, name="check_regularizers", run_dir=run_dir, decided=decided, data=data
        )
    if config.check_equivalence:
        verdict = _check_equivalence(config, strategy, state, data, jit_compile=decided["jit_compile"], console=console)
        decided["check_equivalence"] = _record(
            config, strategy, verdict, name="check_equivalence", run_dir=run_dir, decided=decided, data=data
        )
    return decided


def _check_equivalence(
    config: Config,
    strategy: tf.distribute.Strategy,
    state: TrainState,
    data: RunData,
    *,
    jit_compile: bool,
    console: Console,
) -> dict[str, object]:
    """`--check_equivalence` on the next update's batch: its lines, and its verdict."""
    next_batch, iterator = data.first_update_input(config, strategy, state)
    verdict = equivalence.check(
        config, strategy, state, next_batch=next_batch, iterator=iterator, jit_compile=jit_compile
    )
    for line in verdict.lines():
        console.say(line)
    return verdict.to_dict()


def _record(
    config: Config,
    strategy: tf.distribute.Strategy,
    verdict: dict[str, Any],
    *,
    name: str,
    run_dir: str,
    decided: dict[str, Any],
    data: RunData,
) -> dict[str, Any]:
    """A check's `verdict`, which the chief records in settings.json (`runs.record_check`: a failed
    check's is then the one file of a new run folder, and an existing run's other files stay as
    they were).

    Raises:
      CheckFailed: the check failed (on every worker: each check agrees on its verdict).
    """
    if distribute.is_chief(strategy):
        runs.record_check(run_dir, config, {**decided, name: verdict}, name, source=data.fingerprint)
    if not verdict["passed"]:
        raise CheckFailed(verdict["failure"])
    return verdict


def _silent(line: str) -> None:
    """A worker that is not the chief says nothing of the check but its failure's line."""
