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
# The update judged moves a weight by this share of its norm (`_resolvable_scale`), and must move
# it by more than this many units of float32's rounding of its values: an update rounds each
# value once, a constraint a few times more.
_JUDGED_MOVE = 1e-3
_ROUNDING_UNITS = 8
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
    if not _to_a_step_that_moves(state.optimizer):
        return
    scales = [1.0] * len(index)
    for path, weight in regularized:
        scales[index[id(weight)]] = _resolvable_scale(state.optimizer, weight, differences[path])
    rescaled = _rescaled(strategy, with_terms, without_terms, scales)
    updates = [_updated(strategy, state, per_replica) for per_replica in (rescaled, without_terms)]
    for path, weight in regularized:
        position = index[id(weight)]
        _check_moved(path, weight, updates[0][position] - updates[1][position], updates[1][position], expected[path])


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
    """Each replica's gradients without the regularizers, plus their regularizers' times `scales`."""

    @tf.function(autograph=False)
    def rescale() -> list:
        return strategy.run(
            lambda with_, without: [
                plain + scale * (regularized - plain) for regularized, plain, scale in zip(with_, without, scales)
            ],
            args=(with_terms, without_terms),
        )

    return rescale()


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


def float_array(value: object) -> np.ndarray:
    return np.asarray(tf.convert_to_tensor(value), np.float64)


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


@contextlib.contextmanager
def restored(state: TrainState) -> Iterator[None]:
    """Every variable of the model, the optimizer and the loss scale holds its value again outside."""
    variables = [
        *state.model.variables,
        *state.optimizer.variables,
        *(state.loss_scale.variables if state.loss_scale else ()),
    ]
    saved = [tf.identity(tf.convert_to_tensor(variable)) for variable in variables]
    try:
        yield
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)


@contextlib.contextmanager
def nonzero_weights(model: keras.Model) -> Iterator[None]:
    """A regularized weight that is all zeros (a bias at its start) holds seeded values inside: its
    closed form would be 0, which proves nothing (and L1's sign(0) is 0). `restored` puts it back."""
    random = np.random.default_rng(0)
    for _, weight in named_weights(model):
        if weight.regularizer is not None and not np.any(float_array(weight)):
            weight.assign(random.uniform(0.05, 0.5, weight.shape) * random.choice([-1.0, 1.0], weight.shape))
    yield
