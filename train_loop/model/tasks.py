"""What a run minimizes: a task gives the model, its named per-example loss terms and metrics, and
how a batch splits into the model's inputs and its targets. The step, the evaluation and every
name in the logs come from it (`measurements.for_task`).

Three kinds, one shape (`Task`):
- the default classifier: sparse cross-entropy from logits, accuracy, and the confusion matrix
  (the only task that has those two: their meaning needs class indices and logits);
- `--loss=NAME`: a Keras loss by its registered name, per example, from logits where it takes
  `from_logits`; its one term is named as the flag (`loss/huber`). It gets neither accuracy nor a
  confusion matrix, even `sparse_categorical_crossentropy`: `--metrics` names what it should get;
- `--task=PATH.py:NAME` (or `train_loop.train(task=...)`): a user's object (see `UserTask`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, Protocol

import keras
import tensorflow as tf

from train_loop.errors import UsageError
from train_loop.model.measurements import RESERVED
from train_loop.model.user_models import ModelFunction
from train_loop.user_code import exits_refused, load_object, one_line

Batch = Any  # One nested structure of tensors: what the data yields per replica.
PerExample = Callable[[Batch, Any], dict[str, tf.Tensor]]


class UserTask(Protocol):
    """What `--task` names: `model()` returns an uncompiled `keras.Model`; `loss_terms(batch,
    outputs)` gives each data term per example, shape (B,), by name; optional `metrics(batch,
    outputs)` likewise; optional `split(batch) -> (inputs, targets)` (default: `batch[0]`,
    `batch[1]`; targets may be None, for an autoencoder); optional `input_fn(split, context)`, its
    data as a stream (as `--input`'s). `outputs` are the model's, float32."""

    def model(self) -> keras.Model: ...

    def loss_terms(self, batch: Batch, outputs: Any) -> dict[str, tf.Tensor]: ...


@dataclasses.dataclass(frozen=True)
class Task:
    """A task as the step, the evaluation and the outputs use it."""

    flag: str  # How the user named it, for messages: "--loss=huber".
    loss_terms: PerExample
    metrics: PerExample
    split: Callable[[Batch], tuple[Any, Any]]
    # What the data's labels must be: "classes" (indices), "values" (floats) or "any" (a user task's).
    targets: str = "classes"
    model_fn: ModelFunction | None = None  # The task's own model; None: --model's.
    # The task's own data, `input_fn(split, context)` (see `streams.InputFunction`); None: the flags'.
    input_fn: Callable[[str, Any], Any] | None = None
    classifier: bool = False  # It has the confusion matrix.
    user_object: object = None  # A user's task object, checked to hold no state (`checked_names`).


def default_split(batch: Batch) -> tuple[Any, Any]:
    """An arrays batch is (inputs, targets)."""
    return batch[0], batch[1]


def classifier(metric_names: tuple[str, ...] = ()) -> Task:
    """Today's objective: sparse cross-entropy from logits, accuracy, and the confusion matrix.

    Raises:
      UsageError: `metric_names` holds accuracy, which the classifier logs already (Keras' would
        compare labels with logits and give 0).
    """
    if "accuracy" in metric_names:
        raise UsageError(
            f"--metrics={','.join(metric_names)}: the classifier logs its accuracy already; leave accuracy out."
        )

    others = _keras_metrics(metric_names)

    def accuracy(batch: Batch, logits: tf.Tensor) -> dict[str, tf.Tensor]:
        labels = batch[1]
        hits = tf.equal(tf.argmax(logits, axis=-1, output_type=labels.dtype), labels)
        return {"accuracy": tf.cast(hits, tf.float32), **others(batch, logits)}

    def cross_entropy(batch: Batch, logits: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"cross_entropy": tf.nn.sparse_softmax_cross_entropy_with_logits(labels=batch[1], logits=logits)}

    return Task("the default classifier", cross_entropy, accuracy, default_split, classifier=True)


def keras_loss(name: str, metric_names: tuple[str, ...] = ()) -> Task:
    """`--loss=name`: the Keras loss registered as `name`, per example, from logits where it can be.

    Raises:
      UsageError: Keras has no loss of that name.
    """
    try:
        function = keras.losses.get(name)
    except (ValueError, TypeError):
        raise UsageError(
            f"--loss={name} is not a Keras loss name; use a registered one such as mean_squared_error, huber, "
            "binary_crossentropy or categorical_crossentropy (or --task for your own terms)."
        ) from None
    targets = "classes" if function.__name__ == "sparse_categorical_crossentropy" else "values"
    if "from_logits" in inspect.signature(function).parameters:
        function = functools.partial(function, from_logits=True)
    term = name if name.isidentifier() else "loss"

    def loss_terms(batch: Batch, outputs: tf.Tensor) -> dict[str, tf.Tensor]:
        if targets == "values":
            _check_paired(f"--loss={name}", batch[1], outputs)
        return {term: function(batch[1], outputs)}

    return Task(f"--loss={name}", loss_terms, _keras_metrics(metric_names), default_split, targets=targets)


def _check_paired(flag: str, targets: tf.Tensor, outputs: tf.Tensor) -> None:
    """Targets must be shaped as the outputs, as a Keras loss pairs them (a trailing axis of 1 on
    either side aside): checked on the static shapes while tracing, so a mismatch is one line
    before the first step rather than TensorFlow's error from inside the loss.

    Raises:
      UsageError: the shapes cannot be paired.
    """
    shape, wanted = targets.shape.as_list()[1:], outputs.shape.as_list()[1:]
    if shape != wanted and shape + [1] != wanted and shape != wanted + [1]:
        raise UsageError(
            f"{flag}: targets of shape (N, {', '.join(map(str, shape))}) cannot be paired with the model's outputs "
            f"of shape (N, {', '.join(map(str, wanted))}): the loss takes one target per output; give targets as "
            "the model's outputs, e.g. targets.reshape(len(targets), -1)."
        )


def user_task(task: UserTask | str, metric_names: tuple[str, ...] = ()) -> Task:
    """A user's task object, or the one `PATH.py:NAME` / `package.module:NAME` names.

    Raises:
      UsageError: it cannot be imported, or lacks `model` or `loss_terms`.
    """
    flag = f"--task={task}" if isinstance(task, str) else f"task={getattr(task, '__name__', type(task).__name__)}"
    if isinstance(task, str):
        task = load_object("task", task, role="a task file", kind="task")
    if inspect.isclass(task):
        task = task()
    missing = [name for name in ("model", "loss_terms") if not callable(getattr(task, name, None))]
    if missing:
        raise UsageError(
            f"{flag}: has no {' and no '.join(missing)}; a task gives model() (the keras.Model) and "
            "loss_terms(batch, outputs) (a dict of per-example terms), and may give metrics and split."
        )
    own_metrics = getattr(task, "metrics", None) or (lambda batch, outputs: {})
    keras_metrics = _keras_metrics(metric_names)
    return Task(
        flag,
        task.loss_terms,
        lambda batch, outputs: {**own_metrics(batch, outputs), **keras_metrics(batch, outputs)},
        getattr(task, "split", None) or default_split,
        targets="any",
        model_fn=task.model,
        user_object=task,
        input_fn=getattr(task, "input_fn", None),
    )


def _keras_metrics(names: tuple[str, ...]) -> PerExample:
    """The Keras metrics `names`, per example (a mean of per-example values is what a loop call
    and an evaluation average): one with state across batches (AUC) cannot be one.

    Raises:
      UsageError: a name is not a Keras metric, or not one of per-example values.
    """
    functions = {}
    for name in names:
        try:
            # Made in a graph of its own: a metric's variables made eagerly would start TensorFlow's
            # runtime before the strategy, and a multi-worker strategy can then not configure it.
            with tf.Graph().as_default():
                metric = keras.metrics.get(name)
        except (ValueError, TypeError):
            raise UsageError(
                f"--metrics={','.join(names)}: {name} is not a Keras metric name; use registered ones such as "
                "mean_absolute_error or binary_accuracy."
            ) from None
        if not isinstance(metric, keras.metrics.MeanMetricWrapper):
            raise UsageError(
                f"--metrics={','.join(names)}: {name} is not a mean of per-example values (it keeps state "
                "across batches), which a loop call and an evaluation need; leave it out."
            )
        functions[name] = functools.partial(metric._fn, **metric._fn_kwargs)  # noqa: SLF001 (the metric's function)
    return lambda batch, outputs: {name: function(batch[1], outputs) for name, function in functions.items()}


def task_for(loss: str, metrics: str, task: UserTask | str | None) -> Task:
    """The run's task from its flags (`--loss`, `--metrics`, `--task`), or a task object."""
    metric_names = tuple(name for name in metrics.split(",") if name)
    if task:
        return user_task(task, metric_names)
    return keras_loss(loss, metric_names) if loss else classifier(metric_names)


def float_outputs(outputs: Any) -> Any:
    """The model's outputs as float32: mixed precision computes in 16 bits; terms are taken in 32."""
    return tf.nest.map_structure(
        lambda value: tf.cast(value, tf.float32) if value.dtype.is_floating else value, outputs
    )


def checked_names(task: Task, model: keras.Model, batch: Batch) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The task's term and metric names, from one eager call on `batch` (a few examples), each
    value checked to be one float per example: a wrong one is refused here, in one line, before
    a step is traced.

    Raises:
      UsageError: the task fails on the batch, a name is not an identifier or is reserved, or a
        value is not a float tensor of shape (B,).
    """
    with exits_refused(
        task.flag, during="on its first batch", fix="a task must return its terms, not end the process."
    ):
        try:
            inputs, _ = task.split(batch)
            outputs = float_outputs(model(inputs, training=False))
            terms, metrics = task.loss_terms(batch, outputs), task.metrics(batch, outputs)
        except UsageError:
            raise
        except Exception as error:  # The user's code, or a loss on targets it cannot take: one line.
            raise UsageError(f"{task.flag}: failed on the data's first batch ({one_line(error)}).") from None
    count = len(tf.nest.flatten(batch)[0])
    if not isinstance(terms, dict) or not terms:
        raise UsageError(f"{task.flag}: loss_terms gave {type(terms).__name__}; expected a dict of per-example terms.")
    for kind, values in (("loss term", terms), ("metric", metrics)):
        for name, value in values.items():
            _check_value(task.flag, kind, name, value, count)
    shared = set(terms) & set(metrics)
    if shared:
        raise UsageError(f"{task.flag}: {', '.join(sorted(shared))} names both a loss term and a metric; rename one.")
    _check_stateless(task.flag, task.user_object)
    return tuple(terms), tuple(metrics)


def _check_stateless(flag: str, user_object: object) -> None:
    """A task object's own variables and random generators are in no checkpoint, so a resumed run
    would start them over: refused (after the first call, which may have made them). The model's
    are checkpointed, seed generators' states among them.

    Raises:
      UsageError: an attribute of `user_object` holds such state.
    """
    stateful = (tf.Variable, keras.Variable, keras.random.SeedGenerator, tf.random.Generator)
    for name, value in sorted(getattr(user_object, "__dict__", {}).items()):
        found = [item for item in tf.nest.flatten(value) if isinstance(item, stateful)]
        if found:
            raise UsageError(
                f"{flag}: its attribute {name} holds a {type(found[0]).__name__}, TensorFlow state that no checkpoint "
                "keeps (a resumed run would start it over); keep state in the model's layers, and draw noise with "
                "train_loop.model.dropout.ExampleNoise (see docs/tasks.md)."
            )


def _check_value(flag: str, kind: str, name: object, value: object, count: int) -> None:
    if not isinstance(name, str) or not name.isidentifier() or name in RESERVED:
        raise UsageError(
            f"{flag}: {kind} {name!r} cannot be a name: names are Python identifiers other than {', '.join(RESERVED)}."
        )
    shape, dtype = tuple(getattr(value, "shape", ())), getattr(value, "dtype", None)
    if shape != (count,) or not (isinstance(dtype, tf.DType) and dtype.is_floating):
        raise UsageError(
            f"{flag}: {kind} {name} is {getattr(dtype, 'name', type(value).__name__)} of shape {shape} for a batch "
            f"of {count}; expected floats of shape ({count},), one per example (reduce the other axes, e.g. "
            "tf.reduce_sum(..., axis=-1))."
        )
