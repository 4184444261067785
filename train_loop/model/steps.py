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
from train_loop.model.measurements import LAYER_GRADIENT_NORM, layer_tag
from train_loop.model.models import weighted_layers
from train_loop.model.state import LossScale
from train_loop.model.user_models import CALL_MUST_RETURN
from train_loop.user_code import exits_refused

_SUM = tf.distribute.ReduceOp.SUM


def make_replica_gradients(
    model: keras.Model,
    global_batch_size: int,
    *,
    loss_scale: LossScale | None = None,
    jit_compile: bool = False,
) -> Callable[[tf.Tensor, tf.Tensor], tuple[dict[str, tf.Tensor], list[tf.Tensor]]]:
    """The math of one update on one replica's slice of the batch: loss components and gradients.

    The cross-entropy and the regularization are computed apart and added by hand, so each can
    be logged; both are this replica's share, and summing over replicas gives the batch's value.
    With `jit_compile` XLA compiles this function alone: it holds no iterator (XLA has no
    IteratorGetNext) and no cross-replica synchronization (the optimizer's lives outside it).

    Returns:
      A function of (images, labels) giving the loss's measurements by name (see
      `measurements`) and "non_finite_gradients", and the (unscaled) gradients of the total with respect to
      `model.trainable_variables`.
    """
    variables = model.trainable_variables

    def replica_gradients(images: tf.Tensor, labels: tf.Tensor) -> tuple[dict[str, tf.Tensor], list[tf.Tensor]]:
        with tf.GradientTape() as tape:
            # Python runs here only while tracing: a user's model first runs in training mode here.
            with exits_refused(
                f"{type(model).__name__}.call", during="in training mode (the train step's trace)", fix=CALL_MUST_RETURN
            ):
                # Mixed precision computes in 16 bits; the losses are taken from float32 logits.
                logits = tf.cast(model(images, training=True), tf.float32)
            cross_entropy = losses.cross_entropy(labels, logits, global_batch_size)
            regularization = losses.regularization(model)
            total = cross_entropy + regularization
            scaled = total if loss_scale is None else total * loss_scale.scale
        gradients = tape.gradient(scaled, variables)
        if loss_scale is not None:
            gradients = [gradient / loss_scale.scale for gradient in gradients]
        non_finite = tf.cast(~tf.math.is_finite(tf.linalg.global_norm(gradients)), tf.float32)
        return {
            "cross_entropy": cross_entropy,
            "regularization": regularization,
            "total": total,
            "accuracy": losses.correct_share(labels, logits, global_batch_size),
            "non_finite_gradients": non_finite,
        }, gradients

    return tf.function(replica_gradients, jit_compile=True, autograph=False) if jit_compile else replica_gradients


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

    def replica_step(images: tf.Tensor, labels: tf.Tensor) -> tuple[dict[str, tf.Tensor], list[tf.Tensor]]:
        measurements, gradients = replica_gradients(images, labels)
        return {**measurements, "clipped": apply(gradients)}, gradients

    def train_step(batch: tuple, measure: tf.Tensor, histograms: tf.Tensor) -> dict[str, tf.Tensor]:
        measurements, gradients = _run_and_sum(strategy, replica_step, batch)
        return {**measurements, **measured_gradient(measure, gradients, histograms)}

    def scaled_train_step(batch: tuple, measure: tf.Tensor, histograms: tf.Tensor) -> dict[str, tf.Tensor]:
        # Called from a plain function, so that XLA's compiled function runs on each replica's device.
        measurements, gradients = _run_and_sum(
            strategy, lambda *replica_batch: replica_gradients(*replica_batch), batch
        )
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


def _run_and_sum(
    strategy: tf.distribute.Strategy, replica_fn: Callable[..., tuple[dict, list]], batch: tuple
) -> tuple[dict[str, tf.Tensor], list]:
    """`replica_fn` on every replica; its named measurements summed over replicas in ONE
    all-reduce (stacked, as a cluster pays per collective), its gradients left per replica."""
    names: list[str] = []  # Filled while tracing: the order the stacked vector holds.

    def stacked(*replica_batch: tf.Tensor) -> tuple[tf.Tensor, list]:
        measurements, gradients = replica_fn(*replica_batch)
        names[:] = measurements
        return tf.stack(list(measurements.values())), gradients

    vector, gradients = strategy.run(stacked, args=batch)
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
