"""The training step: the per-replica update under a GradientTape, and its run on every replica.

Three layers, as in Orbit and Sonnet: `make_replica_gradients` is plain math under a
GradientTape; `make_train_step` applies it on every replica through `strategy.run`, and
`loop_calls.make_loop_call` traces `num_steps` of those in one `tf.function` call (a "loop
call"); the eager controller (`controller.py`) owns timing, summaries and checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from train_loop.model import losses
from train_loop.model.measurements import LAYER_GRADIENT_NORM, LAYER_REGULARIZATION, layer_tag
from train_loop.model.models import weighted_layers
from train_loop.model.state import LossScale
from train_loop.model.tasks import Batch, Task, classifier, float_outputs
from train_loop.model.user_models import CALL_MUST_RETURN
from train_loop.user_code import exits_refused

_SUM = tf.distribute.ReduceOp.SUM


def make_replica_gradients(
    model: keras.Model,
    global_batch_size: int,
    *,
    task: Task | None = None,
    loss_scale: LossScale | None = None,
    jit_compile: bool = False,
    regularization_share: float = 1.0,
    layer_terms: bool = False,
) -> Callable[[Batch], tuple[dict[str, tf.Tensor], list[tf.Tensor]]]:
    """The math of one update on one replica's slice of the batch: loss terms and gradients.

    Each of the task's data terms is summed over the replica's examples and divided by the
    global batch; the regularization is computed apart (`losses.regularization`); all are added
    by hand, so each can be logged. Every one is this replica's share: summing over replicas
    gives the batch's value, and so do the metrics. With `jit_compile` XLA compiles this function
    alone: it holds no iterator (XLA has no IteratorGetNext) and no cross-replica synchronization
    (the optimizer's lives outside it).

    `regularization_share` multiplies the regularization, in the total and in its measurement:
    1/K when the slice is one of K micro-batches (`accumulate`), so that their sum counts the
    weight terms once and averages the activity terms.

    With `layer_terms` the measurements also hold each layer's part of the regularization, as
    `regularization/<layer path>` (`losses.layer_regularization`), with the same share: for
    `--check_equivalence`, which names the layer of a term that scales wrong. The step leaves
    them out (each would be one more value to all-reduce every step).

    Returns:
      A function of the replica's batch (one structure, which `task.split` opens) giving the
      measurements by name (see `measurements.for_task`) and "non_finite_gradients", and the
      (unscaled) gradients of the total with respect to `model.trainable_variables`. `task`
      defaults to the classifier.
    """
    task = task or classifier()
    variables = model.trainable_variables

    def replica_gradients(batch: Batch) -> tuple[dict[str, tf.Tensor], list[tf.Tensor]]:
        with tf.GradientTape() as tape:
            inputs, _ = task.split(batch)
            # Python runs here only while tracing: a user's model first runs in training mode here.
            with exits_refused(
                f"{type(model).__name__}.call", during="in training mode (the train step's trace)", fix=CALL_MUST_RETURN
            ):
                outputs = float_outputs(model(inputs, training=True))
            terms = _shares(task.loss_terms(batch, outputs), global_batch_size)
            regularization = losses.regularization(model)
            layers = _layer_terms(model) if layer_terms else {}
            if regularization_share != 1.0:
                regularization *= regularization_share
                layers = {name: term * regularization_share for name, term in layers.items()}
            total = tf.add_n([*terms.values(), regularization])
            scaled = total if loss_scale is None else total * loss_scale.scale
        gradients = tape.gradient(scaled, variables)
        if loss_scale is not None:
            gradients = [gradient / loss_scale.scale for gradient in gradients]
        non_finite = tf.cast(~tf.math.is_finite(tf.linalg.global_norm(gradients)), tf.float32)
        return {
            **terms,
            "regularization": regularization,
            **layers,
            "total": total,
            **_shares(task.metrics(batch, outputs), global_batch_size),
            "non_finite_gradients": non_finite,
        }, gradients

    return tf.function(replica_gradients, jit_compile=True, autograph=False) if jit_compile else replica_gradients


def _layer_terms(model: keras.Model) -> dict[str, tf.Tensor]:
    return {layer_tag(LAYER_REGULARIZATION, path): term for path, term in losses.layer_regularization(model).items()}


def _shares(per_example: dict[str, tf.Tensor], global_batch_size: int) -> dict[str, tf.Tensor]:
    """Each value summed over the replica's examples and divided by the global batch: this
    replica's share of the global batch's mean (`losses.global_share`)."""
    return {name: losses.global_share(values, global_batch_size) for name, values in per_example.items()}


def accumulate(
    replica_gradients: Callable[..., tuple[dict[str, tf.Tensor], list[tf.Tensor]]],
    accumulation_steps: int,
    *,
    micro_batch: tf.Variable | None = None,
) -> Callable[..., tuple[dict[str, tf.Tensor], list[tf.Tensor]]]:
    """`replica_gradients` run on `accumulation_steps` micro-batches of the replica's batch, one
    after another, with their measurements and gradients summed.

    Every tensor of the batch (any nested structure) is split on its first axis. The function
    must give each micro-batch's share of the global batch's values (`make_replica_gradients`
    with `regularization_share=1/accumulation_steps`): then the sums are what the whole batch
    gives, as the sum over replicas is; "non_finite_gradients" counts micro-batches. Each
    micro-batch's index is set in `micro_batch` before it runs, for the dropout masks
    (`dropout.use_micro_batches`).

    The micro-batches run in a `tf.while_loop` of one iteration at a time, its sums the loop's
    values: a micro-batch's activations are freed before the next one's are made, which a loop
    unrolled in Python would not ensure (a graph runs independent ops at once). The first
    micro-batch runs before the loop, so that the sums start from its values (no zeros to make),
    and the loop waits for it: the training loop's peak RSS, convnet at batch 4096 with glibc's
    mmap threshold fixed at 128 KiB, was 1,489 MiB at K=4 while the second micro-batch ran beside
    the first, 1,180 MiB with the wait (1,908 MiB at K=1; 1,164 MiB at K=1 and batch 1024).
    """

    def accumulated(*batch: object) -> tuple[dict[str, tf.Tensor], list[tf.Tensor]]:
        micro_batches = tf.nest.map_structure(lambda tensor: _split_first_axis(tensor, accumulation_steps), batch)

        def run(index: tf.Tensor | int) -> tuple[dict[str, tf.Tensor], list[tf.Tensor]]:
            if micro_batch is not None:
                # Ordered before the function's read of it: both use the variable (automatic control dependencies).
                micro_batch.assign(index)
            return replica_gradients(*tf.nest.map_structure(lambda parts: parts[index], micro_batches))

        def add_next(index: tf.Tensor, sums: tuple) -> tuple:
            return index + 1, tf.nest.map_structure(tf.add, sums, run(index))

        first = run(0)
        # The loop's index waits for the first micro-batch: its second would otherwise start at once.
        with tf.control_dependencies(tf.nest.flatten(first)):
            start = tf.identity(tf.constant(1))
        _, sums = tf.while_loop(
            lambda index, _: index < accumulation_steps, add_next, (start, first), parallel_iterations=1
        )
        return sums

    return accumulated


def _split_first_axis(tensor: tf.Tensor, parts: int) -> tf.Tensor:
    """`tensor` as `parts` equal slices along a new first axis, without a copy; static shapes kept."""
    rows = tensor.shape[0] if tensor.shape[0] is not None else tf.shape(tensor)[0]
    return tf.reshape(tensor, tf.concat([[parts, rows // parts], tf.shape(tensor)[1:]], axis=0))


def make_train_step(
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    replica_gradients: Callable[..., tuple[dict[str, tf.Tensor], list[tf.Tensor]]],
    *,
    loss_scale: LossScale | None = None,
    global_clipnorm: float = 0.0,
) -> Callable[[tuple, tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]:
    """One update over all replicas, for use inside the traced loop call.

    Besides the `SUMMED` measurements it measures the gradient when `measure` is true (the last
    step of a loop call, the one a summary reports): its global L2 norm and each weighted layer's
    kernel-gradient norm, and with `histograms` true too each such kernel's gradient itself, for
    its histogram; all of the whole global batch's gradient (summed over replicas), so they equal
    what one device computes. Other steps skip that reduction and give zeros. They are the
    gradient's before clipping: with `global_clipnorm` the update clips the summed
    gradient to that global norm, as one device would (`clip_summed_gradient`), and "clipped"
    counts the steps it exceeded.

    Only `model.trainable_variables` are updated, decayed (the optimizer's decoupled weight decay
    applies to what it updates) and clipped, and count in the global norm; a frozen layer's
    kernel (`layer.trainable = False`) has no gradient, so it has no per-layer gradient norm or
    histogram either (`trained_kernel_layers`).

    Returns:
      A function of (every replica's batch, measure, histograms) giving the `SUMMED`
      measurements, summed over replicas, and the `gradient_measurements(model)`, by name.
    """
    variables = model.trainable_variables
    index = {id(variable): position for position, variable in enumerate(variables)}
    kernels = {path: index[id(layer.kernel)] for path, layer in trained_kernel_layers(model)}

    def summed_gradient(replica_gradients_: list, histograms: tf.Tensor) -> dict[str, tf.Tensor]:
        gradients = [strategy.reduce(_SUM, gradient, axis=None) for gradient in replica_gradients_]
        kernel_gradients = {path: gradients[index] for path, index in kernels.items()}
        return {
            "gradient_norm": tf.linalg.global_norm(gradients),
            **{layer_tag(LAYER_GRADIENT_NORM, path): tf.norm(gradient) for path, gradient in kernel_gradients.items()},
            **tf.cond(
                histograms,
                lambda: {f"gradient/{path}": gradient for path, gradient in kernel_gradients.items()},
                lambda: _kernel_zeros(model),
            ),
        }

    def measured_gradient(measure: tf.Tensor, gradients: list, histograms: tf.Tensor) -> dict[str, tf.Tensor]:
        return tf.cond(measure, lambda: summed_gradient(gradients, histograms), lambda: gradient_measurements(model))

    def apply(gradients: list) -> tf.Tensor:
        """In replica context: clips, updates, and gives this replica's share of "clipped"."""
        clipped = tf.constant(0.0)
        if global_clipnorm:
            gradients, exceeded = clip_summed_gradient(gradients, global_clipnorm)
            # Each replica counts its share, so the sum over replicas counts the step once.
            clipped = tf.cast(exceeded, tf.float32) / strategy.num_replicas_in_sync
        optimizer.apply_gradients(zip(gradients, variables))
        return clipped

    def replica_step(batch: Batch) -> tuple[dict[str, tf.Tensor], list[tf.Tensor]]:
        measurements, gradients = replica_gradients(batch)
        return {**measurements, "clipped": apply(gradients)}, gradients

    def train_step(batch: Batch, measure: tf.Tensor, histograms: tf.Tensor) -> dict[str, tf.Tensor]:
        measurements, gradients = run_and_sum(strategy, replica_step, batch)
        return {**measurements, **measured_gradient(measure, gradients, histograms)}

    def scaled_train_step(batch: Batch, measure: tf.Tensor, histograms: tf.Tensor) -> dict[str, tf.Tensor]:
        # Called from a plain function, so that XLA's compiled function runs on each replica's device.
        measurements, gradients = run_and_sum(strategy, lambda replica_batch: replica_gradients(replica_batch), batch)
        finite = measurements["non_finite_gradients"] == 0

        def apply_all() -> tf.Tensor:
            return strategy.reduce(_SUM, strategy.run(apply, args=(gradients,)), axis=None)

        # Decided across replicas, as Keras' LossScaleOptimizer does: a branch that holds the
        # optimizer's cross-replica sum cannot sit inside one replica's control flow.
        clipped = tf.cond(finite, apply_all, lambda: tf.constant(0.0))
        loss_scale.update(finite)
        # A skipped step's overflow is the loss scale's job, not divergence; its norms count as 0.
        return {
            **measurements,
            "clipped": clipped,
            "non_finite_gradients": tf.constant(0.0),
            **measured_gradient(tf.logical_and(measure, finite), gradients, histograms),
        }

    return train_step if loss_scale is None else scaled_train_step


def run_and_sum(
    strategy: tf.distribute.Strategy, replica_fn: Callable[[Batch], tuple[dict, list]], batch: Batch
) -> tuple[dict[str, tf.Tensor], list]:
    """`replica_fn` on every replica; its named measurements summed over replicas in ONE
    all-reduce (stacked, as a cluster pays per collective), its gradients left per replica."""
    names: list[str] = []  # Filled while tracing: the order the stacked vector holds.

    def stacked(replica_batch: Batch) -> tuple[tf.Tensor, list]:
        measurements, gradients = replica_fn(replica_batch)
        names[:] = measurements
        return tf.stack(list(measurements.values())), gradients

    vector, gradients = strategy.run(stacked, args=(batch,))
    return dict(zip(names, tf.unstack(strategy.reduce(_SUM, vector, axis=None)))), gradients


def clip_summed_gradient(gradients: list[tf.Tensor], clip_norm: float) -> tuple[list[tf.Tensor], tf.Tensor]:
    """This replica's share of the gradient, scaled so that the sum over replicas has a global
    norm of at most `clip_norm`; and whether it was scaled down. Call in replica context.

    By hand because Keras' `global_clipnorm` clips each replica's share before the optimizer sums
    them, so N replicas would clip N smaller norms and differ from one device. The sum's norm
    takes one extra all-reduce per step; scaling each share by one factor scales their sum by it.
    """
    summed = tf.distribute.get_replica_context().all_reduce(_SUM, gradients)
    norm = tf.linalg.global_norm(summed)
    clipped, _ = tf.clip_by_global_norm(gradients, clip_norm, use_norm=norm)
    return clipped, norm > clip_norm


def gradient_measurements(model: keras.Model) -> dict[str, tf.Tensor]:
    """What a train step measures of the gradient at the last step of a loop call, by name, as
    zeros: the values of the steps that do not measure it. "gradient/<layer path>" is a trained
    kernel's gradient, for its histogram; the others are norms."""
    return {
        "gradient_norm": tf.constant(0.0),
        **{layer_tag(LAYER_GRADIENT_NORM, path): tf.constant(0.0) for path, _ in trained_kernel_layers(model)},
        **_kernel_zeros(model),
    }


def _kernel_zeros(model: keras.Model) -> dict[str, tf.Tensor]:
    return {f"gradient/{path}": tf.zeros(layer.kernel.shape) for path, layer in trained_kernel_layers(model)}


def trained_kernel_layers(model: keras.Model) -> list[tuple[str, keras.layers.Layer]]:
    """The weighted layers whose kernel the step trains: not a frozen one's, which has no gradient."""
    trained = {id(variable) for variable in model.trainable_variables}
    return [(path, layer) for path, layer in weighted_layers(model) if id(layer.kernel) in trained]
