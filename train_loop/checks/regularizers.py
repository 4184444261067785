"""`--check_regularizers`: before training, the table of which regularizer covers each weight
(`coverage`), a check that every loss term reaches a weight and that no layer adds a weight's
regularization a second time, and the proof that every weight
regularizer's gradient reaches the update once, as its closed form (`gradients`); the run then
starts from the state as it was.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import keras
import tensorflow as tf

from train_loop.checks import agreement
from train_loop.checks.coverage import Row, coverage, describe, table
from train_loop.checks.gradients import RELATIVE_TOLERANCE, prove_gradients
from train_loop.checks.kept import nonzero_weights, restored
from train_loop.configs import Config
from train_loop.errors import CheckFailed
from train_loop.model.models import held_weights, named_layers
from train_loop.model.state import TrainState
from train_loop.model.tasks import Batch


def check_regularizers(
    config: Config,
    strategy: tf.distribute.Strategy,
    state: TrainState,
    sample: Batch,
    *,
    say: Callable[[str], None] = print,
    jit_compile: bool = False,
    regularization_share: float | None = None,
) -> dict[str, object]:
    """Says the table and proves the regularizers on `sample` (a few training examples) with the
    replica math compiled as the run's (`jit_compile`), leaving every variable as it was.
    `regularization_share` is what the replica math multiplies the regularization by (default:
    the run's 1/K); another share is the bug the proof catches.

    Returns:
      The verdict for settings.json and result.json: "passed", "failure" (its one line, "" when it
      passed: a loss term reaches no weight, the global flags reach no weight, or a weight's
      regularization gradient is not its closed form once in the update, or does not move it), the
      seconds it took, the rows. The caller records it, then raises `CheckFailed` with the failure.
    """
    started = time.perf_counter()
    rows = coverage(state.model, state.optimizer, config)
    regularized = sum(row.regularizer != "-" for row in rows)
    say(f"check_regularizers: {_count(len(rows), 'trainable weight')}, {regularized} regularized:")
    for line in table(rows):
        say(line)
    with restored(state), nonzero_weights(state.model):
        failure = _failure(
            config,
            strategy,
            state,
            sample,
            rows=rows,
            jit_compile=jit_compile,
            regularization_share=regularization_share,
        )
    seconds = time.perf_counter() - started
    passed = f"passed in {seconds:.1f} s (relative tolerance {RELATIVE_TOLERANCE:g})"
    say(f"check_regularizers: {f'FAILED ({seconds:.1f} s)' if failure else passed}.")
    return {
        "passed": not failure,
        "failure": failure,
        "seconds": round(seconds, 2),
        "weights": [row.to_dict() for row in rows],
    }


def _failure(
    config: Config,
    strategy: tf.distribute.Strategy,
    state: TrainState,
    sample: Batch,
    *,
    rows: list[Row],
    jit_compile: bool,
    regularization_share: float | None,
) -> str:
    """The check's one line of failure, "" when it passed, the same on every worker."""
    try:
        _check_flags_reach_something(config, rows)
        _check_terms_attached(state, sample)
        _check_counted_once(state.model)
        failure = ""
    except CheckFailed as failed:
        failure = str(failed)
    # A term's value depends on each worker's own sample (a user's input function may read other
    # data on each): the workers agree before the proof, whose collectives a worker that stopped
    # here would leave the others waiting in. The proof's values are all-reduced: the same on each.
    if agreement.failed_anywhere(strategy, bool(failure)):
        return failure or "check_regularizers: failed on another worker of the cluster (its line names the layer)."
    try:
        prove_gradients(
            config, strategy, state, sample, jit_compile=jit_compile, regularization_share=regularization_share
        )
    except CheckFailed as failed:
        return str(failed)
    return ""


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _check_flags_reach_something(config: Config, rows: list[Row]) -> None:
    """The flags asked for regularization and it covers no weight, not even by an exemption chosen
    on purpose (--l2_exclude): they would silently do nothing, the one case a flagged weight fails."""
    asked = [
        f"--{name}={getattr(config, name)}" for name in ("l1", "l2", "bias_l1", "bias_l2") if getattr(config, name)
    ]
    if asked and all(row.regularizer == "-" for row in rows) and any(row.flag for row in rows):
        raise CheckFailed(
            f"check_regularizers: {' '.join(asked)} {'regularizes' if len(asked) == 1 else 'regularize'} none of the "
            f"model's weights ({', '.join(row.weight for row in rows[:3])}): the flags reach Dense and Conv layers "
            "only; give the model its own regularizers instead."
        )


def _check_terms_attached(state: TrainState, sample: Batch) -> None:
    """Every non-zero term of a layer's losses (a weight regularizer, an activity regularizer, an
    `add_loss` term) has a gradient with respect to some trainable weight: one computed on
    `tf.stop_gradient(w)` or a constant copy of `w` adds to the loss and regularizes nothing. A
    frozen layer's terms are left out: constants there are what freezing it means."""
    inputs, _ = state.task.split(sample)
    variables = state.model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        state.model(inputs, training=True)
        terms = [(path, term) for path, layer in named_layers(state.model) if layer.trainable for term in layer.losses]
    for path, term in terms:
        gradients = [gradient for gradient in tape.gradient(term, variables) if gradient is not None]
        if float(term) != 0.0 and not (gradients and float(tf.linalg.global_norm(gradients)) > 0.0):
            raise CheckFailed(
                f"check_regularizers: layer {path}: a loss term of value {float(term):.6g} (a regularizer or "
                "add_loss) has no gradient with respect to any trainable weight, so it regularizes nothing: "
                "compute it from the weight itself, not tf.stop_gradient(w) or a copy of its value."
            )


def _check_counted_once(model: keras.Model) -> None:
    """No layer adds a weight's regularization itself (`add_loss`) on top of the term Keras adds for
    the weight's regularizer: that counts twice on one device as on N replicas, so the equivalence
    check cannot see it, and the gradient proof (with and without the weights' regularizers) takes
    the copy for a term of the layer's own. Told by value, after `_check_terms_attached`'s call of
    the model: a second term of the layer equal to the weight's regularization."""
    for path, layer, weight in held_weights(model, trainable=True):
        value = float(weight.regularizer(weight)) if weight.regularizer else 0.0
        copies = sum(math.isclose(float(term), value, rel_tol=1e-6) for term in layer.losses) if value else 0
        if copies > 1:
            raise CheckFailed(
                f"check_regularizers: {path}/{weight.name} ({describe(weight.regularizer)}): its regularization "
                f"({value:.6g}) is counted {copies} times per update: layer {path} adds it itself (add_loss) on top "
                "of the term Keras adds for its regularizer; keep one of the two."
            )
