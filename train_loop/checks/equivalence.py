"""`--check_equivalence`: the first update's loss terms and gradients under the run's own strategy,
precision and accumulation, against one device's on the same global batch; a term off by the
number of replicas or micro-batches is named as the scaling bug it is."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf

from train_loop.configs import Config
from train_loop.data.inputs import global_positions
from train_loop.errors import CheckFailed
from train_loop.model import dropout
from train_loop.model.loop_calls import make_update_gradients
from train_loop.model.measurements import LAYER_REGULARIZATION
from train_loop.model.models import named_layers
from train_loop.model.state import TrainState
from train_loop.model.steps import make_replica_gradients, run_and_sum
from train_loop.model.tasks import Batch

_SUM = tf.distribute.ReduceOp.SUM
# The largest relative difference from one device's value that passes. N replicas add the same
# products in another order (per-replica sums, then an all-reduce), so a value rounds apart by
# a few units of its precision's rounding, more where many values are summed in 16 bits: float32's
# unit is 6e-8, float16's 4.9e-4, bfloat16's 3.9e-3. Measured on digits, 2 replicas, batch 32
# (docs/checks-equivalence.md): at most 7e-7, 2.3e-3 and 0.12 (a convolution's bias gradient,
# summed over 32 x 8 x 8 values in bfloat16). A wrong scaling is a factor of 2 or more: a ratio
# of 1/2 is 50% off, past every tolerance.
TOLERANCES = {"float32": 1e-5, "mixed_float16": 1e-2, "mixed_bfloat16": 0.25}
_NEAR_FACTOR = 0.05  # A ratio within 5% of a factor is that factor: a wrong scaling is exact.


@dataclasses.dataclass(frozen=True)
class Difference:
    """One value on the run's strategy and on one device: a term, or a variable's gradient (its
    norm; `ratio` is then its projection on one device's gradient)."""

    name: str
    subject: str  # As a message names it: "loss term cross_entropy", "the regularization of layer dense".
    run: float
    one_device: float
    relative: float
    ratio: float


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The check's outcome: every difference, and the one line of its failure ("" when it passed)."""

    differences: list[Difference]
    failure: str
    seconds: float
    replicas: int
    accumulation_steps: int
    precision: str

    def lines(self) -> list[str]:
        """What the run prints: a line per term and per layer's gradients, then the verdict."""
        header = (
            f"check_equivalence: {_setup(self.replicas, self.accumulation_steps)}, {self.precision}, against one "
            f"device on the same batch (tolerance {TOLERANCES[self.precision]:g} relative):"
        )
        columns = f"  {'value':<34} {'this run':>13} {'one device':>13}"
        rows = [
            f"  {item.name:<34} {item.run:>13.6g} {item.one_device:>13.6g}  relative difference {item.relative:.1e}"
            for item in self.differences
        ]
        verdict = "FAILED" if self.failure else "passed: the run computes what one device computes"
        return [header, columns, *rows, f"check_equivalence: {verdict} ({self.seconds:.1f} s)."]

    def to_dict(self) -> dict[str, object]:
        """The verdict as settings.json records it."""
        worst = max(self.differences, key=lambda item: item.relative)
        return {
            "passed": not self.failure,
            "failure": self.failure,
            "replicas": self.replicas,
            "accumulation_steps": self.accumulation_steps,
            "precision": self.precision,
            "tolerance": TOLERANCES[self.precision],
            # JSON has no infinity: a value that was not finite is recorded as null.
            "worst": {
                "name": worst.name,
                "relative_difference": worst.relative if np.isfinite(worst.relative) else None,
            },
            "seconds": round(self.seconds, 2),
        }

    def raise_if_failed(self) -> None:
        if self.failure:
            raise CheckFailed(self.failure)


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
    run_terms, run_gradients, batch = _on_the_strategy(strategy, replica_update, next_batch, iterator)
    # Compiled as the run's step is: XLA's Philox draws other dropout masks than TensorFlow's kernels.
    one_device = make_replica_gradients(
        state.model,
        global_batch_size,
        task=state.task,
        loss_scale=state.loss_scale,
        jit_compile=jit_compile,
        layer_terms=True,
    )
    with dropout.whole_batches(state.model):
        terms, gradients = one_device(_in_one_devices_order(strategy, batch))
    for variable, value in zip(state.model.non_trainable_variables, kept, strict=True):
        variable.assign(value)
    differences = [
        *_term_differences(state, run_terms, terms),
        *_gradient_differences(state, run_gradients, gradients),
    ]
    failure = _failure(differences, strategy.num_replicas_in_sync, accumulation_steps, config.precision)
    if _failed_anywhere(strategy, bool(failure)) and not failure:
        failure = "--check_equivalence: failed on another worker of the cluster (its line names the term)."
    return Verdict(
        differences,
        failure,
        time.perf_counter() - started,
        strategy.num_replicas_in_sync,
        accumulation_steps,
        config.precision,
    )


def _on_the_strategy(
    strategy: tf.distribute.Strategy, replica_update: Callable, next_batch: Callable, iterator: Iterator
) -> tuple[dict[str, tf.Tensor], list[tf.Tensor], Batch]:
    """The update's terms and gradients summed over the replicas, as the step sums them, and the
    replicas' batches gathered in replica order (every worker gets them all)."""

    @tf.function(autograph=False)
    def first_update(iterator: Iterator) -> tuple:
        batch = next_batch(iterator)
        terms, gradients = run_and_sum(strategy, replica_update, batch)
        summed = [strategy.reduce(_SUM, gradient, axis=None) for gradient in gradients]
        return terms, summed, tf.nest.map_structure(lambda tensor: strategy.gather(tensor, axis=0), batch)

    return first_update(iterator)


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
    return [_difference(name, subject, float(run[name]), float(one_device[name])) for name, subject in subjects.items()]


def _difference(
    name: str, subject: str, run: float, one_device: float, *, relative: float | None = None, ratio: float | None = None
) -> Difference:
    """`run` against `one_device` (by default their relative difference and their ratio); a value
    that is not finite differs infinitely."""
    if relative is None:
        relative = abs(run - one_device) / abs(one_device) if one_device else abs(run)
    if ratio is None:
        ratio = run / one_device if one_device else np.nan
    return Difference(name, subject, run, one_device, relative if np.isfinite(relative) else np.inf, ratio)


def _gradient_differences(state: TrainState, run: list, one_device: list) -> list[Difference]:
    """Each layer's worst variable: the distance between its two gradients, relative to one
    device's norm; its ratio is the run's gradient's projection on one device's where the run's
    is that one scaled (a gradient scaled by N gives N), else NaN (no factor explains it)."""
    owner = {id(weight): path for path, layer in named_layers(state.model) for weight in layer.trainable_weights}
    worst: dict[str, Difference] = {}
    for variable, got, want in zip(state.model.trainable_variables, run, one_device, strict=True):
        norm, layer = float(tf.norm(want)), owner.get(id(variable), "model")
        ratio = float(tf.reduce_sum(got * want)) / norm**2 if norm else np.nan
        if not float(tf.norm(got - ratio * want)) <= _NEAR_FACTOR * abs(ratio) * norm:
            ratio = np.nan
        item = _difference(
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


def _failure(differences: list[Difference], replicas: int, accumulation_steps: int, precision: str) -> str:
    """The one line that fails the check, or "": the first value off by a factor the replicas or the
    micro-batches explain, else the worst one past the tolerance."""
    factors: dict[int, str] = {}
    for factor, counted in (
        (replicas, f"the {replicas} replicas"),
        (accumulation_steps, f"the {accumulation_steps} micro-batches (--accumulation_steps)"),
        (replicas * accumulation_steps, f"the {replicas} replicas times {accumulation_steps} micro-batches"),
    ):
        if factor > 1:
            factors.setdefault(factor, counted)
    for item in differences:
        for factor, counted in factors.items():
            for scale, times in ((factor, f"{factor} times"), (1 / factor, f"1/{factor} of")):
                if abs(item.ratio / scale - 1) < _NEAR_FACTOR:
                    return _scaling_line(item, times, counted, larger=scale > 1)
    worst = max(differences, key=lambda item: item.relative)
    tolerance = TOLERANCES[precision]
    if worst.relative <= tolerance:
        return ""
    return (
        f"--check_equivalence: {worst.subject} differs from one device's on the same batch by {worst.relative:.2g} "
        f"relative ({worst.run:.6g} against {worst.one_device:.6g}), more than the {tolerance:g} {precision} allows: "
        "something depends on how the batch is split (a per-replica statistic such as BatchNormalization's, a "
        "random draw per replica such as keras.layers.Dropout's)."
    )


def _scaling_line(item: Difference, times: str, counted: str, *, larger: bool) -> str:
    if item.subject.startswith("loss term"):
        fix = "return each term per example and unscaled: the step divides its sum by the global batch itself"
    elif item.subject.startswith("the gradient"):
        fix = "leave the gradient unscaled: the step sums the replicas' and micro-batches' shares itself"
    elif larger:
        fix = "leave what a layer adds unscaled: the step divides it by the replicas and micro-batches itself"
    else:
        fix = "what a layer adds (add_loss, an activity regularizer) must be a mean over its batch, not a sum"
    return (
        f"--check_equivalence: {item.subject} is {times} one device's on the same batch ({item.run:.6g} against "
        f"{item.one_device:.6g}), the factor of {counted}: the classic scaling bug; {fix}."
    )


def _setup(replicas: int, accumulation_steps: int) -> str:
    micro = f" x {accumulation_steps} micro-batches" if accumulation_steps > 1 else ""
    return f"{replicas} replica{'s' if replicas > 1 else ''}{micro}"


def _failed_anywhere(strategy: tf.distribute.Strategy, failed: bool) -> bool:
    """Whether the check failed on any worker: one all-reduce, so that every worker stops or none."""
    flag = tf.constant(float(failed))

    @tf.function(autograph=False)
    def any_failed() -> tf.Tensor:
        return strategy.reduce(_SUM, strategy.run(lambda: tf.identity(flag)), axis=None)

    return bool(any_failed() > 0)
