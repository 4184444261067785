"""`--check_equivalence`: the first update's loss terms and gradients under the run's own strategy,
precision and accumulation, against one device's on the same global batch; a term off by the
number of replicas or micro-batches is named as the scaling bug it is."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf

from train_loop.checks import agreement, differences
from train_loop.checks.differences import Difference, Verdict
from train_loop.configs import Config
from train_loop.data.inputs import global_positions
from train_loop.model import dropout
from train_loop.model.loop_calls import make_update_gradients
from train_loop.model.measurements import LAYER_REGULARIZATION
from train_loop.model.models import held_weights
from train_loop.model.state import TrainState
from train_loop.model.steps import make_replica_gradients, run_and_sum
from train_loop.model.tasks import Batch

_SUM = tf.distribute.ReduceOp.SUM


def check(
    config: Config,
    strategy: tf.distribute.Strategy,
    state: TrainState,
    *,
    next_batch: Callable[[Iterator], Batch],
    iterator: Iterator,
    jit_compile: bool,
) -> Verdict:
    """The first update's terms and gradients from `next_batch(iterator)`, on `strategy` as the run's
    step computes them (`make_update_gradients`, with `config`'s batch, accumulation and precision,
    both compiled with XLA as the run's step is with `jit_compile`) and on one device, without
    updating anything.

    Call outside `strategy.scope()`: one device's math is the same replica function called in the
    default strategy's context on the whole global batch, with the run's own (mirrored) variables,
    which read there as the first replica's copy. The default strategy has one replica, so the
    regularization is divided by 1, and dropout keys each example by its place in the batch; a
    copy of the model would need the user's layers to clone. A training-mode call moves the
    non-trainable variables (BatchNormalization's statistics, Keras' dropout seeds): they are
    put back, so the run's first step is the one it would have been.

    On a cluster every worker computes one device's values from the gathered global batch (the
    same numbers on each) and the workers agree on the verdict by an all-reduce: all fail or none.
    """
    started = time.perf_counter()
    global_batch_size, accumulation_steps = config.batch_size, config.accumulation_steps
    kept = [variable.numpy() for variable in state.model.non_trainable_variables]
    replica_update = make_update_gradients(
        strategy,
        state,
        global_batch_size=global_batch_size,
        jit_compile=jit_compile,
        accumulation_steps=accumulation_steps,
        layer_terms=True,
    )
    # Compiled as the run's step is: XLA's Philox draws other dropout masks than TensorFlow's kernels.
    one_device = make_replica_gradients(
        state.model,
        global_batch_size,
        task=state.task,
        loss_scale=state.loss_scale,
        jit_compile=jit_compile,
        layer_terms=True,
    )
    batch = tf.function(next_batch, autograph=False)(iterator)
    run, one, loss_scales = _at_a_finite_loss_scale(
        state, _on_the_strategy(strategy, replica_update), one_device, batch, strategy=strategy, kept=kept
    )
    (run_terms, run_gradients), (terms, gradients) = run, one
    found = [
        *_term_differences(state, run_terms, terms),
        *_gradient_differences(state, run_gradients, gradients),
    ]
    failure = differences.failure(found, strategy.num_replicas_in_sync, accumulation_steps, config.precision)
    if agreement.failed_anywhere(strategy, bool(failure)) and not failure:
        failure = "--check_equivalence: failed on another worker of the cluster (its line names the term)."
    return Verdict(
        found,
        failure,
        time.perf_counter() - started,
        strategy.num_replicas_in_sync,
        accumulation_steps,
        config.precision,
        loss_scales,
    )


def _at_a_finite_loss_scale(
    state: TrainState,
    update: Callable,
    one_device: Callable,
    batch: Batch,
    *,
    strategy: tf.distribute.Strategy,
    kept: list[np.ndarray],
) -> tuple[tuple, tuple, tuple[float, float] | None]:
    """The terms and gradients of `batch` on the strategy (`update`) and on one device, each call
    followed by the non-trainable variables put back (`kept`); with float16, at the first loss
    scale from the run's down at which neither's gradients overflow, the update the run's step
    applies: it skips one that overflows and halves the scale. The loss scale is put back.

    Returns:
      The strategy's (terms, gradients), one device's, and (the run's loss scale, the one
      compared at), or None without a loss scale.
    """
    loss_scale = state.loss_scale
    start = _value(loss_scale.scale) if loss_scale else None
    try:
        while True:
            run_terms, run_gradients, gathered = update(batch)
            with dropout.whole_batches(state.model):
                terms, gradients = one_device(_in_one_devices_order(strategy, gathered))
            for variable, value in zip(state.model.non_trainable_variables, kept, strict=True):
                variable.assign(value)
            overflowed = _value(run_terms["non_finite_gradients"]) > 0 or _value(terms["non_finite_gradients"]) > 0
            # Below a scale of 1, a gradient still not finite is the model's own: the comparison shows it.
            if not (loss_scale and overflowed and _value(loss_scale.scale) > 1.0):
                scales = (start, _value(loss_scale.scale)) if loss_scale else None
                return (run_terms, run_gradients), (terms, gradients), scales
            loss_scale.scale.assign(_value(loss_scale.scale) / 2)
    finally:
        if loss_scale:
            loss_scale.scale.assign(start)


def _value(tensor: object) -> float:
    """A scalar, a mirrored variable's too (it reads as its first replica's copy outside its scope)."""
    return float(tf.convert_to_tensor(tensor))


def _on_the_strategy(strategy: tf.distribute.Strategy, replica_update: Callable) -> Callable:
    """A function of every replica's batch: the update's terms and gradients summed over the
    replicas, as the step sums them, and the batches gathered in replica order (every worker gets
    them all); traced once, the loss scale read from its variable at each call."""

    @tf.function(autograph=False)
    def first_update(batch: Batch) -> tuple:
        terms, gradients = run_and_sum(strategy, replica_update, batch)
        summed = [strategy.reduce(_SUM, gradient, axis=None) for gradient in gradients]
        return terms, summed, tf.nest.map_structure(lambda tensor: strategy.gather(tensor, axis=0), batch)

    return first_update


def _in_one_devices_order(strategy: tf.distribute.Strategy, gathered: Batch) -> Batch:
    """The gathered batch as one device sees it: each replica's rows moved to their places in the
    global batch (`inputs.global_positions`), which several workers' pipelines interleave."""
    replicas = strategy.num_replicas_in_sync
    rows = tf.nest.flatten(gathered)[0].shape[0] // replicas
    pipelines = replicas // len(strategy.extended.worker_devices)
    positions = tf.concat([global_positions(rows, replica, replicas, pipelines) for replica in range(replicas)], 0)
    order = tf.argsort(positions)
    return tf.nest.map_structure(lambda tensor: tf.gather(tensor, order), gathered)


def _term_differences(state: TrainState, run: dict, one_device: dict) -> list[Difference]:
    """The data terms, each layer's regularization, the regularization and the total, in that order."""
    layers = [name for name in one_device if name.startswith(f"{LAYER_REGULARIZATION}/")]
    subjects = {
        **{term: f"loss term {term}" for term in state.table.terms},
        **{name: f"the regularization of layer {name.partition('/')[2]}" for name in layers},
        "regularization": "the regularization",
        "total": "the total loss",
    }
    return [
        differences.difference(name, subject, float(run[name]), float(one_device[name]))
        for name, subject in subjects.items()
    ]


def _gradient_differences(state: TrainState, run: list, one_device: list) -> list[Difference]:
    """Each layer's worst variable: the distance between its two gradients, relative to one
    device's norm; its ratio is the run's gradient's projection on one device's where the run's
    is that one scaled (a gradient scaled by N gives N), else NaN (no factor explains it)."""
    owner = {id(weight): path for path, _, weight in held_weights(state.model, trainable=True)}
    worst: dict[str, Difference] = {}
    for variable, got, want in zip(state.model.trainable_variables, run, one_device, strict=True):
        norm, layer = float(tf.norm(want)), owner.get(id(variable), "model")
        ratio = float(tf.reduce_sum(got * want)) / norm**2 if norm else np.nan
        if not float(tf.norm(got - ratio * want)) <= differences.NEAR_FACTOR * abs(ratio) * norm:
            ratio = np.nan
        item = differences.difference(
            f"gradient/{layer}/{variable.name}",
            f"the gradient of {variable.name} in layer {layer}",
            float(tf.norm(got)),
            norm,
            relative=float(tf.norm(got - want)) / norm if norm else float(tf.norm(got)),
            ratio=ratio,
        )
        if layer not in worst or item.relative > worst[layer].relative:
            worst[layer] = item
    return list(worst.values())
