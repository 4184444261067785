"""The proof that every weight regularizer's gradient reaches one update once, as its closed
form, under the run's own strategy, precision, loss scale, XLA choice and accumulation.

It runs the train step's replica math (`loop_calls.make_update_gradients`) with the data terms
multiplied by 0, twice: with the weights' regularizers and without them. The difference of the
two summed gradients is what the regularizers put into an update, scaled as the step scales it
(1/N a replica, 1/K a micro-batch, the float16 loss scale and its removal); it must equal 2λw
(L2), λ·sign(w) (L1) or their sum (L1L2) within `RELATIVE_TOLERANCE`. The two gradients then go
through one optimizer update each, at the first step whose learning rate is not 0, with the
regularizers' part scaled to move the weights by more than float32's rounding: the update with
them must move each weight against its closed form. Run it inside `restored`: the weights, the
optimizer's slots and step, the loss scale and every other variable are put back afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import keras
import numpy as np
import tensorflow as tf

from train_loop.checks.coverage import describe
from train_loop.checks.kept import float_array
from train_loop.checks.moves import prove_moves
from train_loop.configs import Config
from train_loop.errors import CheckFailed
from train_loop.model.loop_calls import make_update_gradients
from train_loop.model.models import named_weights
from train_loop.model.state import TrainState
from train_loop.model.tasks import Batch, Task

# |g - closed form| <= this times |closed form|, per weight (norms over its entries): float32
# master weights make the step's scalings (1/N, 1/K, a power-of-2 loss scale) exact to ~1e-6,
# and a factor of N, K or 0 misses it by far.
RELATIVE_TOLERANCE = 1e-3
_SUM = tf.distribute.ReduceOp.SUM
_KERAS_REGULARIZERS = (keras.regularizers.L1, keras.regularizers.L2, keras.regularizers.L1L2)


def prove_gradients(
    config: Config,
    strategy: tf.distribute.Strategy,
    state: TrainState,
    sample: Batch,
    *,
    jit_compile: bool = False,
    regularization_share: float | None = None,
) -> None:
    """Per regularized trainable weight, on `sample` repeated on every replica: the step's gradient
    of its regularizer against the closed form, then one update with it against one without.
    `regularization_share` is what the replica math multiplies the regularization by (default:
    the run's 1/K).

    Raises:
      CheckFailed: naming the weight, and the factor its gradient is off by.
    """
    regularized = [(path, weight) for path, weight in named_weights(state.model) if _trained_regularizer(state, weight)]
    if not regularized:
        return
    batch = _replicated(strategy, sample, config.accumulation_steps)
    gradients = _update_gradients(config, strategy, state, jit_compile, regularization_share)
    with_terms = gradients(batch)
    with _without_regularizers([weight for _, weight in regularized]):
        without_terms = gradients(batch)
    index = {id(variable): position for position, variable in enumerate(state.model.trainable_variables)}
    # Every reduction before any verdict: on a cluster no worker stops while another still reduces.
    summed = [
        {
            path: float_array(strategy.reduce(_SUM, per_replica[index[id(weight)]], axis=None))
            for path, weight in regularized
        }
        for per_replica in (with_terms, without_terms)
    ]
    differences = {path: summed[0][path] - summed[1][path] for path, _ in regularized}
    expected = {path: closed_form(weight.regularizer, float_array(weight)) for path, weight in regularized}
    for path, weight in regularized:
        _compare(
            path, weight, differences[path], expected[path], config.accumulation_steps, strategy.num_replicas_in_sync
        )
    prove_moves(
        strategy, state, regularized, gradients=(with_terms, without_terms), differences=differences, expected=expected
    )


def _replicated(strategy: tf.distribute.Strategy, sample: Batch, accumulation_steps: int) -> object:
    """`sample` repeated K times on every replica: a batch the step's K micro-batches can split."""
    repeated = tf.nest.map_structure(lambda tensor: tf.concat([tensor] * accumulation_steps, 0), sample)
    return strategy.experimental_distribute_values_from_function(lambda _: repeated)


def _trained_regularizer(state: TrainState, weight: keras.Variable) -> bool:
    trained = {id(variable) for variable in state.model.trainable_variables}
    return weight.regularizer is not None and id(weight) in trained


def _update_gradients(
    config: Config,
    strategy: tf.distribute.Strategy,
    state: TrainState,
    jit_compile: bool,
    regularization_share: float | None,
) -> Callable[[object], list]:
    """The step's per-replica gradients with the data terms times 0, traced anew at each call (the
    regularizers are read while tracing)."""
    task = dataclasses.replace(state.task, loss_terms=_zero_terms(state.task))

    def gradients(batch: object) -> list:
        replica = make_update_gradients(
            strategy,
            state,
            global_batch_size=config.batch_size,
            jit_compile=jit_compile,
            accumulation_steps=config.accumulation_steps,
            task=task,
            regularization_share=regularization_share,
        )
        return tf.function(lambda batch: strategy.run(replica, args=(batch,))[1], autograph=False)(batch)

    return gradients


def _zero_terms(task: Task) -> Callable:
    """The task's data terms times 0: connected to every weight the outputs depend on, adding nothing."""

    def loss_terms(batch: Batch, outputs: object) -> dict[str, tf.Tensor]:
        return {name: 0.0 * values for name, values in task.loss_terms(batch, outputs).items()}

    return loss_terms


def _compare(
    path: str, weight: keras.Variable, gradient: np.ndarray, expected: np.ndarray, steps: int, replicas: int
) -> None:
    """The gradient an update gets against the closed form, with `steps` micro-batches on
    `replicas` replicas; a miss names the factor it is off by."""
    size = np.linalg.norm(expected)
    if np.linalg.norm(gradient - expected) <= RELATIVE_TOLERANCE * size:
        return
    factor = float(np.sum(gradient * expected) / size**2)
    if abs(factor) < RELATIVE_TOLERANCE:
        why = "is 0 in the update: the regularizer does not reach the step's gradient"
    elif steps > 1 and abs(factor - steps) < 0.01 * steps:
        why = f"is counted {steps} times per update: once per micro-batch of --accumulation_steps={steps}"
    elif replicas > 1 and abs(factor * replicas - 1) < 0.01:
        why = f"is divided by the {replicas} replicas once too often"
    elif replicas > 1 and abs(factor - replicas) < 0.01 * replicas:
        why = f"is counted once per replica ({replicas} times)"
    else:
        why = f"is {factor:.4g} times it (relative error {np.linalg.norm(gradient - expected) / size:.3g})"
    raise CheckFailed(
        f"check_regularizers: {path} ({describe(weight.regularizer)}): its regularization gradient in the update, "
        f"against its closed form (2λw for L2, λ·sign(w) for L1), {why}."
    )


def closed_form(regularizer: object, weight: np.ndarray) -> np.ndarray:
    """The gradient of Keras' L1, L2 or L1L2 at `weight` (float64); a custom regularizer's own,
    differentiated on one device."""
    if isinstance(regularizer, _KERAS_REGULARIZERS):
        l1, l2 = float(getattr(regularizer, "l1", 0.0)), float(getattr(regularizer, "l2", 0.0))
        return l1 * np.sign(weight) + 2.0 * l2 * weight
    value = tf.Variable(weight.astype(np.float32))
    with tf.GradientTape() as tape:
        term = regularizer(value)
    return float_array(tape.gradient(term, value, unconnected_gradients=tf.UnconnectedGradients.ZERO))


@contextlib.contextmanager
def _without_regularizers(weights: list[keras.Variable]) -> Iterator[None]:
    saved = [weight.regularizer for weight in weights]
    for weight in weights:
        weight.regularizer = None
    try:
        yield
    finally:
        for weight, regularizer in zip(weights, saved):
            weight.regularizer = regularizer
