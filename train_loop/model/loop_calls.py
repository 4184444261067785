"""The traced loops over the step, each one `tf.function` traced once: `num_steps` updates in one
call (a "loop call"), which `make_input_loop_call` binds to the input it pulls from, and the
evaluation pass."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import keras
import tensorflow as tf

from train_loop.configs import Config
from train_loop.data import inputs
from train_loop.model import dropout
from train_loop.model.measurements import Table
from train_loop.model.state import TrainState
from train_loop.model.steps import accumulate, gradient_measurements, make_replica_gradients, make_train_step
from train_loop.model.tasks import Batch, Task, float_outputs

_SUM = tf.distribute.ReduceOp.SUM


def make_loop_call(
    strategy: tf.distribute.Strategy,
    state: TrainState,
    next_batch: Callable[[object], tuple],
    *,
    global_batch_size: int,
    jit_compile: bool = False,
    global_clipnorm: float = 0.0,
    accumulation_steps: int = 1,
) -> Callable[[object, tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]:
    """`loop_call(iterator, num_steps, histograms)`: `num_steps` updates of `state` in one traced call.

    `next_batch(iterator)` gives every replica its batch (see `inputs.ReplicaInput`). Returns the
    state's table's `summed` ones ("clipped" only with `global_clipnorm`) summed over the steps, and
    the gradient's (`gradient_measurements`) at the last step, its kernels' only when
    `histograms` is true (else zeros); pass `num_steps` and `histograms` as tensors so that every
    call reuses one trace. With `accumulation_steps` K > 1 each replica's batch is run as K
    micro-batches and their gradients summed (`steps.accumulate`): still one update a step.
    """
    model = state.model
    replica_gradients = make_update_gradients(
        strategy,
        state,
        global_batch_size=global_batch_size,
        jit_compile=jit_compile,
        accumulation_steps=accumulation_steps,
    )
    train_step = make_train_step(
        strategy,
        model,
        state.optimizer,
        replica_gradients,
        loss_scale=state.loss_scale,
        global_clipnorm=global_clipnorm,
    )
    summed = [name for name in state.table.summed if name != "clipped" or global_clipnorm]

    @tf.function(autograph=False)  # The loop is written out: see `_counted_loop`.
    def loop_call(iterator, num_steps: tf.Tensor, histograms: tf.Tensor) -> dict[str, tf.Tensor]:
        def step_once(step: tf.Tensor, sums: dict[str, tf.Tensor], gradient: dict[str, tf.Tensor]) -> tuple:
            measured = train_step(next_batch(iterator), step == num_steps - 1, histograms)
            return ({name: sums[name] + measured[name] for name in summed}, {name: measured[name] for name in gradient})

        sums, gradient = _counted_loop(
            num_steps, step_once, (dict.fromkeys(summed, tf.constant(0.0)), gradient_measurements(model))
        )
        return {**sums, **gradient}

    return loop_call


def make_update_gradients(
    strategy: tf.distribute.Strategy,
    state: TrainState,
    *,
    global_batch_size: int,
    jit_compile: bool = False,
    accumulation_steps: int = 1,
    task: Task | None = None,
    regularization_share: float | None = None,
    layer_terms: bool = False,
) -> Callable[[Batch], tuple[dict[str, tf.Tensor], list[tf.Tensor]]]:
    """One replica's measurements and gradients of an update, over its K micro-batches: the
    replica math the train step runs, and the one `checks.regularizers` proves and
    `checks.equivalence` compares with one device's.

    `task` defaults to the state's; `regularization_share` to 1/K, which counts the weight terms
    once per update (another share is the accumulation pitfall the check must catch); with
    `layer_terms`, each layer's regularization is measured too (`steps.make_replica_gradients`).
    """
    replica_gradients = make_replica_gradients(
        state.model,
        global_batch_size,
        task=task or state.task,
        loss_scale=state.loss_scale,
        jit_compile=jit_compile,
        regularization_share=1.0 / accumulation_steps if regularization_share is None else regularization_share,
        layer_terms=layer_terms,
    )
    if accumulation_steps == 1:
        return replica_gradients
    micro_batch = dropout.use_micro_batches(state.model, strategy, accumulation_steps)
    return accumulate(replica_gradients, accumulation_steps, micro_batch=micro_batch)


def make_input_loop_call(
    config: Config,
    strategy: tf.distribute.Strategy,
    state: TrainState,
    replica_input: inputs.ReplicaInput,
    *,
    jit_compile: bool,
    iterator: Iterator | None = None,
) -> Callable[[tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]:
    """`loop_call(num_steps, histograms)`: `state`'s loop call (`make_config_loop_call`) pulling
    from `iterator` over `replica_input` (made here when not given: a stream's is made before the
    checkpoint that holds it is restored); the run's and the XLA timing's alike."""
    loop_call = make_config_loop_call(config, strategy, state, replica_input, jit_compile=jit_compile)
    iterator = iterator or replica_input.iterator()
    return lambda num_steps, histograms: loop_call(iterator, num_steps, histograms)


def make_config_loop_call(
    config: Config,
    strategy: tf.distribute.Strategy,
    state: TrainState,
    replica_input: inputs.ReplicaInput,
    *,
    jit_compile: bool,
) -> Callable[[object, tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]:
    """`make_loop_call` with `config`'s settings, pulling from any iterator of `replica_input`'s
    kind: one trace serves a new iterator of the same input (a rollback's, `training/divergence`)."""
    return make_loop_call(
        strategy,
        state,
        replica_input.next_batch,
        global_batch_size=config.batch_size,
        jit_compile=jit_compile,
        global_clipnorm=config.global_clipnorm,
        accumulation_steps=config.accumulation_steps,
    )


def make_eval_pass(
    model: keras.Model,
    strategy: tf.distribute.Strategy,
    next_batch: Callable[[object], tuple],
    *,
    task: Task,
    table: Table,
    num_classes: int,
) -> Callable[[object, tf.Tensor], dict[str, tf.Tensor]]:
    """`eval_pass(iterator, num_batches)`: the weighted mean of each of the task's terms and
    metrics (`table.evaluated`), and for the classifier the confusion matrix.

    Each batch is `(batch, weights)`: the weights make the zero-weight padding of the last batch
    count for nothing. The confusion matrix counts true labels by row and predictions by column.
    """
    classes = num_classes if task.classifier else 0

    def replica_eval(batch: Batch, weights: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        inputs, targets = task.split(batch)
        outputs = float_outputs(model(inputs, training=False))
        values = {**task.loss_terms(batch, outputs), **task.metrics(batch, outputs)}
        confusion = tf.zeros([0, 0])
        if classes:
            predictions = tf.argmax(outputs, axis=-1, output_type=targets.dtype)
            confusion = tf.math.confusion_matrix(
                targets, predictions, num_classes=classes, weights=weights, dtype=tf.float32
            )
        sums = [tf.reduce_sum(value * weights) for value in values.values()]
        return tf.stack([*sums, tf.reduce_sum(weights)]), confusion

    @tf.function(autograph=False)  # The loop is written out: see `_counted_loop`.
    def eval_pass(iterator, num_batches: tf.Tensor) -> dict[str, tf.Tensor]:
        def batch_once(_: tf.Tensor, sums: tf.Tensor, confusion: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            batch_sums, batch_confusion = strategy.run(replica_eval, args=next_batch(iterator))
            return (
                sums + strategy.reduce(_SUM, batch_sums, axis=None),
                confusion + strategy.reduce(_SUM, batch_confusion, axis=None),
            )

        count = len(table.terms) + len(table.metrics) + 1
        sums, confusion = _counted_loop(num_batches, batch_once, (tf.zeros([count]), tf.zeros([classes, classes])))
        means = dict(zip((*table.terms, *table.metrics), tf.unstack(sums[:-1] / sums[-1])))
        if len(table.terms) > 1:
            means["data_total"] = tf.add_n([means[term] for term in table.terms])
        return {**means, "confusion_matrix": tf.cast(confusion, tf.int64)}

    return eval_pass


def _counted_loop(count: tf.Tensor, body: Callable[..., tuple], initial: tuple) -> tuple:
    """`body(i, *values)` for i in 0..count-1, each call's values fed to the next: the loop
    `for i in tf.range(count)` becomes under AutoGraph, written out.

    The traced functions run without AutoGraph because converting their Python (every function
    they call, 29 of them) took most of the first step's tracing; what they call branches with
    `tf.cond` where it must, and Keras does not convert a model's code either way.
    """
    _, values = tf.while_loop(
        lambda i, _: i < count, lambda i, values: (i + 1, body(i, *values)), (tf.constant(0, count.dtype), initial)
    )
    return values
