"""The optimizer `--optimizer` names, with its learning-rate schedule, decoupled weight decay and
moving average of the weights; and what the run logs of them."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator

import keras
import tensorflow as tf

from train_loop.configs import Config
from train_loop.errors import UsageError
from train_loop.model.models import named_layers

_OPTIMIZERS = {
    "rmsprop": keras.optimizers.RMSprop,
    "adam": keras.optimizers.Adam,
    "sgd": keras.optimizers.SGD,
}


def build_optimizer(config: Config, learning_rate_factor: tf.Variable | None = None) -> keras.optimizers.Optimizer:
    """The Keras optimizer `--optimizer` names; build it inside `strategy.scope()`. Its rate is
    multiplied by `learning_rate_factor` when given (`Rescaled`: the rollbacks' factor).

    Clipping is not the optimizer's: under a distribution strategy Keras clips each replica's
    share of the gradient before the cross-replica sum, so the step clips the sum itself
    (`steps.make_train_step`).
    """
    return _OPTIMIZERS[config.optimizer](
        learning_rate=learning_rate_schedule(config, learning_rate_factor),
        weight_decay=config.weight_decay or None,
        use_ema=config.ema > 0,
        ema_momentum=config.ema or 0.99,
    )


def exclude_from_decay(optimizer: keras.optimizers.Optimizer, config: Config, variables: list) -> None:
    """Exempts the `variables` whose own name (`kernel`, `bias`, `gamma`: Keras' `variable.name`,
    without its layer's) --weight_decay_exclude is found in from the decay; call before `build`.

    Keras' own `exclude_from_weight_decay(var_names=...)` does the matching at each update, so
    what is exempt is what Keras decides; this checks beforehand that it exempts something.

    Raises:
      UsageError: the pattern is found in no variable's name.
    """
    pattern = config.weight_decay_exclude
    if not pattern:
        return
    names = sorted({variable.name for variable in variables})
    if not any(re.search(pattern, name) for name in names):
        raise UsageError(
            f"--weight_decay_exclude={pattern!r} is found in none of the trainable weights' names "
            f"({', '.join(names[:6])}): it is searched in a weight's own name, not its layer's; fix the pattern, "
            "or drop --weight_decay_exclude."
        )
    optimizer.exclude_from_weight_decay(var_names=[pattern])


def decayed(optimizer: keras.optimizers.Optimizer, variable: keras.Variable) -> bool:
    """Whether the optimizer's decoupled weight decay applies to `variable` (Keras' own rule)."""
    # Keras' private test, the one `_apply_weight_decay` runs: a copy of its matching could drift from it.
    return optimizer.weight_decay is not None and optimizer._use_weight_decay(variable)


def learning_rate_schedule(
    config: Config, factor: tf.Variable | None = None
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """`--learning_rate` as `--lr_schedule` and `--warmup_steps` shape it over the optimizer's steps,
    times `factor` when given."""
    schedule = _shaped_schedule(config)
    if factor is None:
        return schedule
    return Rescaled(schedule if callable(schedule) else (lambda step: schedule), factor)


def _shaped_schedule(config: Config) -> float | keras.optimizers.schedules.LearningRateSchedule:
    schedules = keras.optimizers.schedules
    schedule = None
    if config.lr_schedule == "cosine":
        schedule = schedules.CosineDecay(config.learning_rate, config.lr_decay_steps)
    elif config.lr_schedule == "step":
        schedule = schedules.ExponentialDecay(
            config.learning_rate, config.lr_decay_steps, config.lr_decay_rate, staircase=True
        )
    if config.warmup_steps:
        return Warmup(schedule or (lambda step: config.learning_rate), config.learning_rate, config.warmup_steps)
    return schedule or config.learning_rate


class Rescaled(keras.optimizers.schedules.LearningRateSchedule):
    """`schedule(step)` times a variable `factor`: the rate that `--divergence_lr_factor` lowers at
    each rollback. A variable, so that the traced step reads its new value without a new trace,
    and the checkpoint keeps it."""

    def __init__(self, schedule: Callable[[tf.Tensor], tf.Tensor], factor: tf.Variable):
        self.schedule, self.factor = schedule, factor

    def __call__(self, step: tf.Tensor) -> tf.Tensor:
        return tf.cast(self.schedule(step), tf.float32) * self.factor

    def get_config(self) -> dict:
        return {"factor": float(self.factor.numpy())}


class Warmup(keras.optimizers.schedules.LearningRateSchedule):
    """A linear rise from 0 to `peak` over `warmup_steps`, then `after(step - warmup_steps)`.

    Keras' `CosineDecay` has this warm-up built in, but `ExponentialDecay` and a constant rate do
    not; one wrapper gives all three the same (tests check it against `CosineDecay`'s own).
    """

    def __init__(self, after: Callable[[tf.Tensor], tf.Tensor], peak: float, warmup_steps: int):
        self.after, self.peak, self.warmup_steps = after, peak, warmup_steps

    def __call__(self, step: tf.Tensor) -> tf.Tensor:
        step = tf.cast(step, tf.float32)
        warmup_steps = tf.constant(float(self.warmup_steps))
        return tf.where(
            step < warmup_steps,
            self.peak * step / warmup_steps,
            tf.cast(self.after(tf.maximum(step - warmup_steps, 0.0)), tf.float32),
        )

    def get_config(self) -> dict:
        return {"peak": self.peak, "warmup_steps": self.warmup_steps}


def applied_learning_rate(config: Config, optimizer: keras.optimizers.Optimizer, factor: float = 1.0) -> float:
    """The rate the optimizer's latest update applied (times the rollbacks' `factor`); Keras'
    `optimizer.learning_rate` is the next update's (the schedule at `iterations`, already counted up)."""
    schedule = _shaped_schedule(config)
    if not callable(schedule):
        return schedule * factor
    return float(schedule(tf.maximum(optimizer.iterations - 1, 0))) * factor


def layer_decay_terms(
    model: keras.Model, weight_decay: float, *, optimizer: keras.optimizers.Optimizer | None = None
) -> dict[str, float]:
    """The L2 penalty each layer's decoupled weight decay amounts to with plain SGD, by layer path;
    with `optimizer`, of the weights it decays (--weight_decay_exclude exempts some).

    Decay subtracts `learning_rate * weight_decay * w` from every trainable weight at each step:
    the SGD step of the penalty `weight_decay / 2 * sum(w**2)`. It is not a term of the loss, and
    with RMSprop or Adam, which rescale the gradient but not the decay, it differs from an L2
    penalty of that size; logging it beside `regularization/<layer>` shows both.
    """
    terms = {}
    for path, layer in named_layers(model):
        weights = [weight for weight in layer.trainable_weights if optimizer is None or decayed(optimizer, weight)]
        if weights:
            terms[path] = weight_decay / 2 * sum(float(tf.reduce_sum(tf.square(weight))) for weight in weights)
    return terms


def averaged_weights(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> contextlib.AbstractContextManager:
    """The model holds the optimizer's moving averages of its weights inside, its own outside.

    Keras' `finalize_variable_values` writes the averages over the weights for good; training
    goes on from the weights themselves, so they are put back. Without `--ema`, nothing changes.
    """
    if not optimizer.use_ema:
        return contextlib.nullcontext()
    return swapped_weights(
        model.trainable_variables, lambda: optimizer.finalize_variable_values(model.trainable_variables)
    )


@contextlib.contextmanager
def swapped_weights(variables: list[tf.Variable], replace: Callable[[], None]) -> Iterator[None]:
    """`replace()` changes `variables` inside; outside they hold their own values again."""
    saved = [tf.identity(variable) for variable in variables]
    replace()
    try:
        yield
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)
