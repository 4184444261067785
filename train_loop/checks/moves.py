"""The second proof of `--check_regularizers`: one optimizer update with the weights' regularizers
moves each regularized weight against their closed form, past float32's rounding, where one
without them does not. Run it inside `kept.restored`: every variable is put back afterwards.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from train_loop.checks.coverage import describe
from train_loop.checks.kept import float_array, restored
from train_loop.errors import CheckFailed
from train_loop.model.state import TrainState

# The update judged moves a weight by this share of its norm (`_resolvable_scale`), and must move
# it by more than this many units of float32's rounding of its values: an update rounds each
# value once, a constraint a few times more.
_JUDGED_MOVE = 1e-3
_ROUNDING_UNITS = 8


def prove_moves(
    strategy: tf.distribute.Strategy,
    state: TrainState,
    regularized: list[tuple[str, keras.Variable]],
    *,
    gradients: tuple[list, list],
    differences: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
) -> None:
    """Per `regularized` weight (by path): one update with the per-replica `gradients` with the
    regularizers against one with those without (the first proof's; their summed `differences`
    equal the `expected` closed forms), at the first step whose learning rate is not 0, the
    regularizers' part scaled to a move float32 resolves.

    Raises:
      CheckFailed: the update with them does not move a weight against its closed form.
    """
    with_terms, without_terms = gradients
    index = {id(variable): position for position, variable in enumerate(state.model.trainable_variables)}
    if not _to_a_step_that_moves(state.optimizer):
        return
    scales = [1.0] * len(index)
    for path, weight in regularized:
        scales[index[id(weight)]] = _resolvable_scale(state.optimizer, weight, differences[path])
    # Both dense, so that the optimizer applies them alike; scales of 0 leave the gradients without.
    rescaled, without = (
        _rescaled(strategy, with_terms, without_terms, factors) for factors in (scales, [0.0] * len(scales))
    )
    updates = [_updated(strategy, state, per_replica) for per_replica in (rescaled, without)]
    for path, weight in regularized:
        position = index[id(weight)]
        _check_moved(path, weight, updates[0][position] - updates[1][position], updates[1][position], expected[path])


def _to_a_step_that_moves(optimizer: keras.optimizers.Optimizer) -> bool:
    """The optimizer's step set to the next one whose learning rate is not 0, and whether there is
    one: a warm-up starts at a rate of 0 (--warmup_steps), where no update moves a weight, with
    its regularizer or without, and rises from the step after, the first update that applies the
    regularizer's gradient. A cosine decayed to its end stays at 0: no update is left to judge.
    `restored` puts the step back."""
    step = int(tf.convert_to_tensor(optimizer.iterations))
    for candidate in (step, step + 1):
        optimizer.iterations.assign(candidate)
        if float(tf.convert_to_tensor(optimizer.learning_rate)) > 0:
            return True
    optimizer.iterations.assign(step)
    return False


def _resolvable_scale(optimizer: keras.optimizers.Optimizer, weight: keras.Variable, difference: np.ndarray) -> float:
    """What the regularization's gradient of `weight` is multiplied by in the update judged: one
    plain SGD step then moves the weight by `_JUDGED_MOVE` of its norm. Its size is the first
    proof's; the second judges only whether the update applies it, which scaling does not change
    (nor whether a constraint undoes it), and a small λ times the rate moves a float32 weight by
    less than its rounding: SGD at the rate 1e-3 with an L2 of 1e-5, 2e-8 of each value, under
    float32's 6e-8."""
    rate = float(tf.convert_to_tensor(optimizer.learning_rate))
    size = np.linalg.norm(difference)
    return _JUDGED_MOVE * float(np.linalg.norm(float_array(weight))) / (rate * size) if size else 1.0


def _rescaled(strategy: tf.distribute.Strategy, with_terms: list, without_terms: list, scales: list[float]) -> list:
    """Each replica's gradients without the regularizers, plus their regularizers' times `scales`;
    dense (an Embedding's gradient is IndexedSlices, a regularizer's is not)."""

    def rescale(with_: list, without: list) -> list:
        return [
            tf.convert_to_tensor(plain) + scale * (tf.convert_to_tensor(regularized) - tf.convert_to_tensor(plain))
            for regularized, plain, scale in zip(with_, without, scales)
        ]

    return tf.function(lambda: strategy.run(rescale, args=(with_terms, without_terms)), autograph=False)()


def _check_moved(
    path: str, weight: keras.Variable, moved: np.ndarray, without: np.ndarray, expected: np.ndarray
) -> None:
    """The update with the regularizer moves the weight against its closed form (`expected`) by
    more than a few units of float32's rounding of its values (`_ROUNDING_UNITS`), which two
    updates that the regularizer does not reach differ by: `moved` from the update `without` it.

    Raises:
      CheckFailed: it does not; a constraint that renormalizes the weight (`UnitNorm`) undoes a
        plain SGD step of an L2 whatever its size.
    """
    direction = expected / np.linalg.norm(expected)
    against = -float(np.sum(moved * direction))
    rounding = _ROUNDING_UNITS * float(np.sum(np.spacing(np.abs(without).astype(np.float32)) * np.abs(direction)))
    if against > rounding:
        return
    constraint = f" or its constraint ({type(weight.constraint).__name__}) undoes it" if weight.constraint else ""
    raise CheckFailed(
        f"check_regularizers: {path} ({describe(weight.regularizer)}): one update with its regularizer moves it "
        f"{against:.3g} against its closed form, within float32's rounding of its values ({rounding:.3g}): the "
        f"optimizer does not apply the regularizer's gradient{constraint}."
    )


def _updated(strategy: tf.distribute.Strategy, state: TrainState, per_replica: list) -> list[np.ndarray]:
    """The trainable weights after one update with these gradients, as the step applies them;
    the weights and the optimizer are put back after."""
    variables = state.model.trainable_variables
    with restored(state):

        @tf.function(autograph=False)
        def apply() -> None:
            strategy.run(
                lambda gradients: state.optimizer.apply_gradients(zip(gradients, variables)), args=(per_replica,)
            )

        apply()
        return [float_array(variable) for variable in variables]
