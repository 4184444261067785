"""The measurements of a train step, by name: the one table from a name to how a loop call
reduces it, whether the checkpoint keeps its sum over the epoch, and its TensorBoard tag.

The step returns a flat dict of these names; the loop call, the counters, the summaries, the
epoch lines, `metrics.jsonl`, `result.json` and the study read this table, so adding a
measurement is one line here (and its computation in the step).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Measurement:
    """A scalar a train step gives, summed over the replicas (so it equals one device's)."""

    name: str
    tag: str  # Its tag under the train writer; "" for one that is not logged.
    summed: bool = True  # Summed over a loop call's steps (a mean once divided by them); else the last step's.
    per_epoch: bool = False  # Its epoch sum is kept in the checkpoint: the epoch's line, metrics.jsonl, result.json.


TRAIN_STEP = (
    Measurement("cross_entropy", "loss/cross_entropy", per_epoch=True),
    Measurement("regularization", "loss/regularization", per_epoch=True),
    Measurement("total", "loss/total", per_epoch=True),
    Measurement("accuracy", "accuracy", per_epoch=True),
    # The share of steps whose summed gradient was clipped: given only with --global_clipnorm.
    Measurement("clipped", "clipped_share"),
    # Replica-steps whose gradient was not finite: the divergence check (a non-finite gradient
    # mid-call would otherwise only show one step later).
    Measurement("non_finite_gradients", ""),
    # Measured at the last step of a loop call only, the one a summary reports.
    Measurement("gradient_norm", "gradient_norm", summed=False),
)
BY_NAME = {measurement.name: measurement for measurement in TRAIN_STEP}
SUMMED = tuple(measurement.name for measurement in TRAIN_STEP if measurement.summed)
PER_EPOCH = tuple(measurement.name for measurement in TRAIN_STEP if measurement.per_epoch)
# What the divergence check requires to be finite after each loop call.
CHECKED_FINITE = ("cross_entropy", "regularization", "gradient_norm")

# Each layer's own scalars are tagged `<prefix>/<layer path>` (`weight_norm/conv1`): its weight
# regularization term, its kernel's L2 norm and sparsity (`state.layer_measurements`), and its
# kernel gradient's norm (the step's, beside the global one under the same name).
LAYER_REGULARIZATION = "regularization"
LAYER_WEIGHT_NORM = "weight_norm"
LAYER_SPARSITY = "sparsity"
LAYER_GRADIENT_NORM = BY_NAME["gradient_norm"].tag


def layer_tag(prefix: str, path: str) -> str:
    return f"{prefix}/{path}"


def tagged(values: dict[str, float]) -> dict[str, float]:
    """`values` by their TensorBoard tags: the table's for its names (those it does not log are
    left out), the name itself for the rest (per-layer ones such as `gradient_norm/conv1`)."""
    tags = {name: BY_NAME[name].tag if name in BY_NAME else name for name in values}
    return {tags[name]: value for name, value in values.items() if tags[name]}
