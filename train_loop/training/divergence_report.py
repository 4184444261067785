"""The report of a divergence (`training/divergence.py` takes it): where a run diverged, and each
replica's loss terms and per-variable gradients at that step, computed on its share of the batch."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import tensorflow as tf

from train_loop.data import inputs
from train_loop.model.models import named_layers
from train_loop.model.state import TrainState
from train_loop.model.steps import make_replica_gradients
from train_loop.outputs.run_outputs import DIVERGENCE_FILE
from train_loop.training.run_data import StepBatch

_EXAMPLES_SHOWN = 8  # Indices on the console line; divergence.json holds them all.


@dataclasses.dataclass(frozen=True)
class Report:
    """Where a run diverged: the step, the first non-finite term, the first layer (in the model's
    order) whose gradient is not finite, the replica and the batch's examples."""

    steps: tuple[int, int]  # The loop call that diverged, its first and last step.
    replayed_from: int | None  # The checkpoint's step; None: not replayed.
    replayable: bool = True  # False: a TPU's strategy, whose replay is not done (`divergence.replays_here`).
    step: int | None = None  # The first step that is not finite; None: not found.
    term: str = ""  # Its first non-finite term's tag, or "gradient" when the terms are finite.
    value: float = math.nan
    layer: str = ""  # "": every gradient was finite.
    replica: int = 0  # Its global id: on several workers, the worker's first replica's id + the local one's.
    replicas: int = 1
    examples: list[int] | None = None  # The global batch's, in the training arrays as given; None: a stream.
    replica_terms: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def lines(self, run_dir: str) -> list[str]:
        """The report as the console says it."""
        first, last = self.steps
        if self.replayed_from is None:
            why = "no checkpoint before it to replay it from" if self.replayable else "not replayed on a TPU"
            return [f"divergence between steps {first} and {last}: {why}."]
        if self.step is None:
            return [
                f"divergence between steps {first} and {last}: replayed from the checkpoint at step "
                f"{self.replayed_from}, every step was finite (a nondeterministic op: pass --deterministic)."
            ]
        layer = f"layer {self.layer}" if self.layer else "none"
        return [
            f"divergence at step {self.step} (replayed from the checkpoint at step {self.replayed_from}): "
            f"{self.term} became {self.value} on replica {self.replica} of {self.replicas}; "
            f"first non-finite gradient: {layer}.",
            f"  the batch of step {self.step}: {self._examples_text()}; report: {run_dir}/{DIVERGENCE_FILE}",
        ]

    def _examples_text(self) -> str:
        if self.examples is None:
            return "streamed examples (they have no index: the stream's batch at that step)"
        per_replica = len(self.examples) // self.replicas
        mine = self.examples[self.replica * per_replica : (self.replica + 1) * per_replica]
        shown = ", ".join(map(str, mine[:_EXAMPLES_SHOWN])) + (", ..." if len(mine) > _EXAMPLES_SHOWN else "")
        return f"replica {self.replica}'s examples x_train[i] for i in {shown}"

    def to_dict(self) -> dict[str, Any]:
        report = dataclasses.asdict(self)
        # JSON has no inf or nan: they are written as strings.
        report["value"] = _json_number(self.value)
        report["replica_terms"] = [
            {name: _json_number(value) for name, value in terms.items()} for terms in self.replica_terms
        ]
        report["steps"] = list(self.steps)
        return report


def replica_measurements(
    strategy: tf.distribute.Strategy, state: TrainState, step_batch: StepBatch, *, global_batch_size: int
) -> list[tuple[dict[str, float], list[bool]]]:
    """Each replica's loss terms (its share of the batch's, as the step takes them) and whether
    each trainable variable's gradient is finite, on its consecutive share of `step_batch`, as the
    run's replicas get them (`inputs.ReplicaInput`); every replica's, in the order of their global
    ids, on every worker: gathered across workers, a collective every worker calls alike. Eager:
    nothing is traced to keep."""
    replica_gradients = make_replica_gradients(state.model, global_batch_size, task=state.task)
    terms = (*state.table.terms, "regularization")

    def replica(part: object) -> tf.Tensor:
        measured, gradients = replica_gradients(part)
        finite = [tf.reduce_all(tf.math.is_finite(g)) if g is not None else tf.constant(True) for g in gradients]
        # One row a replica, so that one gather collects them all: the terms, then the gradients' finiteness.
        row = [tf.cast(measured[name], tf.float64) for name in terms] + [tf.cast(ok, tf.float64) for ok in finite]
        return tf.stack(row)[tf.newaxis]

    batch = step_batch.batch
    per_replica = global_batch_size // strategy.num_replicas_in_sync
    distributed = inputs.deal_to_replicas(
        strategy,
        batch,
        parts=len(tf.nest.flatten(batch)[0]) // per_replica,
        first_replica=step_batch.first_replica,
    )
    # Traced: MirroredStrategy's eager `run` warns of its cost on stderr.
    rows = tf.function(lambda part: strategy.gather(strategy.run(replica, args=(part,)), axis=0), autograph=False)(
        distributed
    ).numpy()
    return [(dict(zip(terms, row[: len(terms)].tolist())), [bool(ok) for ok in row[len(terms) :]]) for row in rows]


def first_non_finite(replicas: list[tuple[dict[str, float], list[bool]]], state: TrainState) -> dict[str, Any]:
    """The first replica with a non-finite term or gradient, its first such term (the task's terms
    in order, then the regularization) and the first layer, in the model's order, whose gradient
    is not finite there."""
    variables = [id(variable) for variable in state.model.trainable_variables]
    terms = (*state.table.terms, "regularization")
    for replica, (measured, finite) in enumerate(replicas):
        bad_terms = [name for name in terms if not math.isfinite(measured[name])]
        bad_layers = [
            path
            for path, layer in named_layers(state.model)
            if any(
                not finite[variables.index(id(weight))] for weight in layer.trainable_weights if id(weight) in variables
            )
        ]
        if bad_terms or bad_layers:
            term = bad_terms[0] if bad_terms else ""
            return {
                "term": state.table.tag(term) if term else "gradient",
                "value": measured[term] if term else math.inf,
                "layer": bad_layers[0] if bad_layers else "",
                "replica": replica,
                "replicas": len(replicas),
                "replica_terms": [{name: values[name] for name in terms} for values, _ in replicas],
            }
    return {"replicas": len(replicas)}


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def listed(examples: np.ndarray | None) -> list[int] | None:
    return None if examples is None else [int(index) for index in examples]
