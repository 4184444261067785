"""The train state, built in one place: the model, its optimizer (schedule, decay, moving
average), the float16 loss scale, the best model, the loop's counters, what a checkpoint holds
of them, and what the summaries log of the weights (`summaries` writes what it is handed). The
run, the XLA timing, the report and the tests all build it here."""

from __future__ import annotations

import contextlib
import dataclasses

import keras
import tensorflow as tf

from train_loop.configs import Config
from train_loop.model import optimizers, tasks
from train_loop.model.best import BestModel
from train_loop.model.dropout import use_step
from train_loop.model.losses import layer_weight_terms
from train_loop.model.measurements import (
    CLASSIFIER,
    LAYER_REGULARIZATION,
    LAYER_SPARSITY,
    LAYER_WEIGHT_NORM,
    Table,
    for_task,
    layer_tag,
)
from train_loop.model.models import build_model, named_layers, near_zero_share, weighted_layers
from train_loop.model.rollbacks import Rollbacks
from train_loop.model.user_models import ModelFunction

# The epoch sums' order in the one vector that checkpoints written before the measurements had
# names kept them in (with the step count last); such checkpoints still restore.
_POSITIONAL_SUMS = ("cross_entropy", "regularization", "total", "accuracy")


class LossScale(tf.Module):
    """Dynamic loss scaling for float16, by hand: the scale halves after a step whose gradients
    overflow (that step is skipped) and doubles after `growth_interval` finite steps in a row.

    Create it inside `strategy.scope()`; every replica updates it with the same values.
    """

    def __init__(self, initial: float = 2.0**15, growth_interval: int = 2000):
        super().__init__(name="loss_scale")
        only_first = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self.scale = tf.Variable(initial, trainable=False, aggregation=only_first)
        self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, aggregation=only_first)
        self.growth_interval = growth_interval

    def update(self, finite: tf.Tensor) -> None:
        grow = tf.logical_and(finite, self.good_steps + 1 >= self.growth_interval)
        self.good_steps.assign(tf.where(finite & ~grow, self.good_steps + 1, tf.constant(0, tf.int64)))
        self.scale.assign(tf.where(grow, self.scale * 2, tf.where(finite, self.scale, self.scale / 2)))


class Counters:
    """The controller's counters, kept in variables so that checkpoints carry them: the step, the
    epoch, and the current epoch's sum of each of the table's `per_epoch` measurements (one
    variable a name) with its step count, so a run resumed mid-epoch, or after its last
    checkpoint, still reports the whole epoch's means."""

    def __init__(self, per_epoch: tuple[str, ...] = CLASSIFIER.per_epoch) -> None:
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._epoch_steps = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._epoch_sums = {name: tf.Variable(0.0, dtype=tf.float64, trainable=False) for name in per_epoch}
        self._positional = tf.Variable(tf.zeros([len(_POSITIONAL_SUMS) + 1], tf.float64), trainable=False)

    @property
    def step(self) -> int:
        return int(self._step)

    def trackables(self) -> dict[str, object]:
        return {
            "step": self._step,
            "epoch": self.epoch,
            "epoch_steps": self._epoch_steps,
            "epoch_sum": dict(self._epoch_sums),
        }

    def positional_trackables(self) -> dict[str, object]:
        """The names of a checkpoint written before the sums had names; `take_positional` then
        moves what it restored into the named sums."""
        return {"step": self._step, "epoch": self.epoch, "epoch_sums": self._positional}

    def take_positional(self) -> None:
        """Only the classifier's checkpoints were ever positional: its names are those sums'."""
        *totals, count = self._positional.numpy().tolist()
        if count:
            for name, total in zip(_POSITIONAL_SUMS, totals):
                self._epoch_sums[name].assign(total)
            self._epoch_steps.assign(int(count))
            self._positional.assign(tf.zeros_like(self._positional))

    def advance(self, sums: dict[str, float], num_steps: int) -> None:
        self._step.assign_add(num_steps)
        self._epoch_steps.assign_add(num_steps)
        for name, variable in self._epoch_sums.items():
            variable.assign_add(sums[name])

    def skip(self) -> None:
        """Counts a step that trained nothing (`--divergence_skip`): not in the epoch's means."""
        self._step.assign_add(1)

    def epoch_means(self) -> dict[str, float]:
        count = max(int(self._epoch_steps), 1)
        return {name: float(variable) / count for name, variable in self._epoch_sums.items()}

    def start_epoch(self) -> None:
        """Zeroes the epoch's sums, for the next epoch."""
        self._epoch_steps.assign(0)
        for variable in self._epoch_sums.values():
            variable.assign(0.0)


@dataclasses.dataclass
class TrainState:
    """Everything a run updates and a checkpoint restores."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    loss_scale: LossScale | None
    best: BestModel | None
    counters: Counters
    task: tasks.Task = dataclasses.field(default_factory=tasks.classifier)
    table: Table = CLASSIFIER  # The task's measurements.
    rollbacks: Rollbacks | None = None  # With --on_divergence=rollback.

    @property
    def learning_rate_factor(self) -> float:
        """What the rollbacks multiplied the learning rate by (1 without any)."""
        return float(self.rollbacks.learning_rate_factor.numpy()) if self.rollbacks else 1.0

    def validated_weights(self) -> contextlib.AbstractContextManager:
        """The model holds the weights validation scores inside: with `--ema`, their average."""
        return optimizers.averaged_weights(self.model, self.optimizer)

    def kept_weights(self) -> contextlib.AbstractContextManager:
        """The model holds the weights the run keeps inside: the best ones with `--best_metric`,
        else the moving average with `--ema`, else its own."""
        return self.best.weights_in_model() if self.best else self.validated_weights()

    def layer_measurements(self) -> dict[str, float]:
        """What the summaries log of the weights as they are, by tag: each layer's weight
        regularization term, and each weighted layer's kernel L2 norm and sparsity (the share of
        |w| < `models.NEAR_ZERO`), a frozen layer's too. A frozen layer has no regularization term:
        as in Keras' `model.losses`, its weights' regularizers count for nothing (see `losses`)."""
        return {
            **{
                layer_tag(LAYER_REGULARIZATION, path): float(term)
                for path, term in layer_weight_terms(self.model).items()
            },
            **{
                layer_tag(LAYER_WEIGHT_NORM, path): float(tf.norm(layer.kernel))
                for path, layer in weighted_layers(self.model)
            },
            **{
                layer_tag(LAYER_SPARSITY, path): near_zero_share(layer.kernel)
                for path, layer in weighted_layers(self.model)
            },
        }

    def weight_values(self) -> dict[str, tf.Tensor]:
        """Every trainable weight of every layer, and every weight of a frozen one (which stays as
        it was, logged so that a fine-tuned model shows all of itself), for its histogram, as
        `<weight>/<layer path>` (`kernel/conv1`)."""
        return {
            f"{weight.name}/{path}": tf.convert_to_tensor(weight)
            for path, layer in named_layers(self.model)
            for weight in (layer.trainable_weights if layer.trainable else layer.weights)
        }

    def trackables(self) -> dict[str, object]:
        """The checkpoint's objects by name. "non_trainable" holds every non-trainable variable
        (BatchNorm's statistics, a user model's dropout seed states): a resumed run then draws
        the masks an uninterrupted one would. The built-in models' dropout keys its masks by the
        optimizer's step instead; their checkpoints written with Keras' Dropout hold its seed
        states here, which a restore leaves unread."""
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "non_trainable": self._non_trainable(),
            **self.counters.trackables(),
            **self._optional_trackables(),
        }

    def positional_trackables(self) -> dict[str, object]:
        """The names of a checkpoint written before the measurements had names, which called the
        non-trainable variables "rng" and kept the epoch's sums in one vector (see `Counters`)."""
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "rng": self._non_trainable(),
            **self.counters.positional_trackables(),
            **self._optional_trackables(),
        }

    def _non_trainable(self) -> list[tf.Variable]:
        return [variable.value for variable in self.model.non_trainable_variables]

    def _optional_trackables(self) -> dict[str, object]:
        return {
            **({"loss_scale": self.loss_scale} if self.loss_scale else {}),
            **(self.best.trackables() if self.best else {}),
            **({"rollbacks": self.rollbacks} if self.rollbacks else {}),
        }


def build_state(
    config: Config,
    strategy: tf.distribute.Strategy,
    input_shape: tuple[int, ...],
    *,
    num_classes: int | None = 10,
    model_fn: ModelFunction | None = None,
    task: tasks.Task | None = None,
    sample: tasks.Batch | None = None,
) -> TrainState:
    """The train state of `config`. The model's, the optimizer's, the loss scale's and the best
    model's variables are created inside `strategy.scope()`, so that they are mirrored (a Keras
    optimizer would otherwise build its slots lazily, inside a trace); the counters, which only
    the eager loop reads and writes, are plain variables outside it.

    `task` (default: the classifier) names the measurements, from one call on `sample`, a few of
    the data's examples (`tasks.checked_names`); without a sample, the classifier's. The model is
    the task's own when it gives one, else `model_fn`'s or `config.model`'s, with `num_classes`
    outputs (None: unchecked).

    Raises:
      UsageError: the model or the task cannot be built, or fails on `sample`.
    """
    task = task or tasks.classifier()
    rollbacks = Rollbacks(config.max_rollbacks, strategy) if config.on_divergence == "rollback" else None
    with strategy.scope():
        model = build_model(
            config,
            input_shape,
            num_classes=None if task.model_fn else num_classes,
            model_fn=task.model_fn or model_fn,
            flag=task.flag if task.model_fn else "",
            targets=task.targets,
        )
        table = CLASSIFIER if sample is None else for_task(*tasks.checked_names(task, model, sample))
        # Without a factor other than 1, the rate stays the schedule's own: the step reads no factor.
        factor = rollbacks.learning_rate_factor if rollbacks and config.divergence_lr_factor != 1.0 else None
        optimizer = optimizers.build_optimizer(config, factor)
        optimizers.exclude_from_decay(optimizer, config, model.trainable_variables)
        optimizer.build(model.trainable_variables)
        use_step(model, lambda: optimizer.iterations)
        loss_scale = LossScale() if config.precision == "mixed_float16" else None
        best = BestModel(config, model, table) if config.best_metric else None
    return TrainState(model, optimizer, loss_scale, best, Counters(table.per_epoch), task, table, rollbacks)
