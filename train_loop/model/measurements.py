"""The measurements of a train step, by name: the one table from a name to how a loop call
reduces it, whether the checkpoint keeps its sum over the epoch, and its TensorBoard tag.

The table is a function of the run's task (`for_task`): one `loss/<term>` for each of its data
terms, then the regularization and the total, then its metrics, then the gradient's. The step
returns a flat dict of these names; the loop call, the counters, the summaries, the epoch lines,
`metrics.jsonl`, `result.json` and the evaluation read the run's table, so a name is written
here alone.
"""

from __future__ import annotations

import dataclasses

# Names a task may not give a term or a metric: the step's own measurements.
RESERVED = (
    "regularization",
    "total",
    "data_total",
    "clipped",
    "non_finite_gradients",
    "gradient_norm",
    "examples_per_second",
)
# Metric names whose higher values are better, for --best_metric; every other one is lower-better.
_HIGHER_IS_BETTER = ("accuracy", "auc", "precision", "recall")


@dataclasses.dataclass(frozen=True)
class Measurement:
    """A scalar a train step gives, summed over the replicas (so it equals one device's)."""

    name: str
    tag: str  # Its tag under the train writer; "" for one that is not logged.
    summed: bool = True  # Summed over a loop call's steps (a mean once divided by them); else the last step's.
    per_epoch: bool = False  # Its epoch sum is kept in the checkpoint: the epoch's line, metrics.jsonl, result.json.


@dataclasses.dataclass(frozen=True)
class Table:
    """A run's measurements: its task's data terms and metrics among the step's own."""

    terms: tuple[str, ...]  # The task's data terms, whose sum the regularization is added to.
    metrics: tuple[str, ...]
    train_step: tuple[Measurement, ...]

    @property
    def by_name(self) -> dict[str, Measurement]:
        return {measurement.name: measurement for measurement in self.train_step}

    @property
    def summed(self) -> tuple[str, ...]:
        return tuple(measurement.name for measurement in self.train_step if measurement.summed)

    @property
    def per_epoch(self) -> tuple[str, ...]:
        return tuple(measurement.name for measurement in self.train_step if measurement.per_epoch)

    @property
    def checked_finite(self) -> tuple[str, ...]:
        """What the divergence check requires to be finite after each loop call: a non-finite
        term is named, not only the total it spoils."""
        return (*self.terms, "regularization", "gradient_norm")

    @property
    def evaluated(self) -> tuple[str, ...]:
        """What an evaluation pass gives: each term's and metric's weighted mean, and with several
        terms their sum, "data_total" (the regularization is the weights', not the data's: it is
        not evaluated; with one term the total is that term)."""
        return (*self.terms, *(("data_total",) if len(self.terms) > 1 else ()), *self.metrics)

    def higher_is_better(self, name: str) -> bool:
        """Whether a higher validation `name` is better: a metric named for a share of hits
        (accuracy, AUC, precision, recall); a loss term, the total and any other metric are lower-better."""
        return name in self.metrics and any(word in name for word in _HIGHER_IS_BETTER)

    def tag(self, name: str) -> str:
        """`name`'s TensorBoard tag: the table's, else the name itself (a per-layer one such as
        `gradient_norm/conv1`), and `loss/data_total` for the evaluation's sum of the terms."""
        measurement = self.by_name.get(name)
        if measurement:
            return measurement.tag
        return f"loss/{name}" if name == "data_total" else name

    def tagged(self, values: dict[str, float]) -> dict[str, float]:
        """`values` by their TensorBoard tags; those the table does not log are left out."""
        return {self.tag(name): value for name, value in values.items() if self.tag(name)}


def for_task(terms: tuple[str, ...], metrics: tuple[str, ...]) -> Table:
    """The table of a task with these data terms and metrics (checked by `tasks`)."""
    return Table(
        terms,
        metrics,
        (
            *(Measurement(term, f"loss/{term}", per_epoch=True) for term in terms),
            Measurement("regularization", "loss/regularization", per_epoch=True),
            Measurement("total", "loss/total", per_epoch=True),
            *(Measurement(metric, metric, per_epoch=True) for metric in metrics),
            # The share of steps whose summed gradient was clipped: given only with --global_clipnorm.
            Measurement("clipped", "clipped_share"),
            # Replica-steps whose gradient was not finite: the divergence check (a non-finite gradient
            # mid-call would otherwise only show one step later).
            Measurement("non_finite_gradients", ""),
            # Measured at the last step of a loop call only, the one a summary reports.
            Measurement("gradient_norm", "gradient_norm", summed=False),
        ),
    )


# The default run's: today's classifier.
CLASSIFIER = for_task(("cross_entropy",), ("accuracy",))

# Each layer's own scalars are tagged `<prefix>/<layer path>` (`weight_norm/conv1`): its weight
# regularization term, its kernel's L2 norm and sparsity (`state.layer_measurements`), and its
# kernel gradient's norm (the step's, beside the global one under the same name).
LAYER_REGULARIZATION = "regularization"
LAYER_WEIGHT_NORM = "weight_norm"
LAYER_SPARSITY = "sparsity"
LAYER_GRADIENT_NORM = "gradient_norm"


def layer_tag(prefix: str, path: str) -> str:
    return f"{prefix}/{path}"
