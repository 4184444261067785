"""What a divergence does (`--on_divergence`): a report that names where the run diverged, taken
after the fact, and with `rollback` a return to the last checkpoint, from which the run goes on.

The report costs nothing while the run is healthy: the traced step stays as it is. When a loop
call's measurements are not finite, the newest checkpoint whose weights are finite is restored,
the steps up to that loop call are trained again, then its steps one at a time to the first one
that is not finite; before that step, each replica's loss terms and per-variable gradients are
computed on its share of the batch. Exact resume makes the replay the run's own steps (with
`--deterministic`, bit for bit), and a batch's examples knowable from the seed and the step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from train_loop.configs import Config
from train_loop.errors import DivergedError, UsageError
from train_loop.model.models import named_layers
from train_loop.model.state import TrainState
from train_loop.model.steps import make_replica_gradients
from train_loop.outputs import checkpoints
from train_loop.outputs.run_outputs import DIVERGENCE_FILE, RunOutputs
from train_loop.training.console import Console
from train_loop.training.run_data import RunData

LoopCall = Callable[[int, bool], dict[str, tf.Tensor]]
ROLLBACKS_TAG = "divergence/rollbacks"
_EXAMPLES_SHOWN = 8  # Indices on the console line; divergence.json holds them all.


def check_strategy(config: Config, strategy: tf.distribute.Strategy) -> None:
    """Raises UsageError when `--on_divergence=rollback` meets a strategy of several machines,
    whose workers would each have to replay and restore in step: not done yet."""
    if config.on_divergence == "rollback" and not replays_here(strategy):
        raise UsageError(
            "--on_divergence=rollback runs on one machine's devices for now (its replay and restore are not "
            "collective across workers); use --on_divergence=stop, or --strategy=mirrored or one_device."
        )


def replays_here(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process alone can replay steps: one machine's devices, not a cluster's or a TPU's."""
    return isinstance(strategy, (tf.distribute.OneDeviceStrategy, tf.distribute.MirroredStrategy))


@dataclasses.dataclass(frozen=True)
class Report:
    """Where a run diverged: the step, the first non-finite term, the first layer (in the model's
    order) whose gradient is not finite, the replica and the batch's examples."""

    steps: tuple[int, int]  # The loop call that diverged, its first and last step.
    replayed_from: int | None  # The checkpoint's step; None: not replayed.
    replayable: bool = True  # False: a cluster's or a TPU's strategy, which this process cannot replay alone.
    step: int | None = None  # The first step that is not finite; None: not found.
    term: str = ""  # Its first non-finite term's tag, or "gradient" when the terms are finite.
    value: float = math.nan
    layer: str = ""  # "": every gradient was finite.
    replica: int = 0
    replicas: int = 1
    examples: list[int] | None = None  # The global batch's, in the training arrays as given; None: a stream.
    replica_terms: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def lines(self, run_dir: str) -> list[str]:
        """The report as the console says it."""
        first, last = self.steps
        if self.replayed_from is None:
            why = "no checkpoint before it to replay it from" if self.replayable else "not replayed on several machines"
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


@dataclasses.dataclass
class Divergence:
    """The run's answer to a divergence (`handle`): the report, then a stop or a rollback."""

    config: Config
    strategy: tf.distribute.Strategy
    state: TrainState
    data: RunData
    checkpoint: tf.train.Checkpoint
    manager: tf.train.CheckpointManager
    outputs: RunOutputs
    console: Console
    jit_compile: bool

    def begin(self) -> None:
        """With rollback, a fresh run saves its start: there is always a checkpoint to go back to."""
        if self.state.rollbacks is not None and self.manager.latest_checkpoint is None:
            checkpoints.save(self.manager, 0)

    @property
    def skipped(self) -> frozenset[int]:
        return self.state.rollbacks.skipped if self.state.rollbacks else frozenset()

    def handle(self, error: DivergedError) -> LoopCall:
        """Reports the divergence; raises `error` (stop, or too many rollbacks), else rolls back
        and returns the loop call to go on with, from the checkpoint's step.

        Raises:
          DivergedError: the run stops.
        """
        counted = self._counted()
        report = self.report(error.steps)
        self._count_again(counted)
        for line in report.lines(self.outputs.run_dir):
            self.console.say(line)
        self.outputs.write_divergence(report.to_dict())
        rollbacks = self.state.rollbacks
        if rollbacks is None or int(rollbacks.count) >= self.config.max_rollbacks or report.replayed_from is None:
            self.outputs.metrics_file.append({"step": error.steps[1], "divergence": report.to_dict()})
            raise DivergedError(f"{error} (report: {self.outputs.run_dir}/{DIVERGENCE_FILE})", steps=error.steps)
        return self._roll_back(report)

    def report(self, steps: tuple[int, int]) -> Report:
        """The divergence of the loop call over `steps`, replayed from the newest finite checkpoint."""
        if not replays_here(self.strategy):
            return Report(steps, None, replayable=False)
        back_to = self._restore_finite()
        if back_to is None:
            return Report(steps, None)
        first, last = steps
        loop_call = self.data.loop_call(self.config, self.strategy, self.state, jit_compile=self.jit_compile)
        self._train(loop_call, back_to, first - 1)
        step = next((step for step in range(first, last + 1) if not self._step_finite(loop_call, step)), None)
        if step is None:
            return Report(steps, back_to)
        # Again to the step before it, whose weights the replicas' terms and gradients are taken at.
        self._restore_finite()
        loop_call = self.data.loop_call(self.config, self.strategy, self.state, jit_compile=self.jit_compile)
        self._train(loop_call, back_to, step - 1)
        batch, examples = self.data.step_batch(self.config, step)
        replicas = replica_measurements(self.strategy, self.state, batch, global_batch_size=self.config.batch_size)
        found = _first_non_finite(replicas, self.state)
        return Report(steps, back_to, step=step, examples=_listed(examples), **found)

    def _roll_back(self, report: Report) -> LoopCall:
        """Back to the checkpoint the report replayed from, counted (with the rate's factor and
        the skipped step) in the rollbacks, which the restore must not undo; logged again with
        the earlier rollbacks since that step, as the files were cut back to it."""
        rollbacks, counted = self.state.rollbacks, self._counted()
        back_to = self._restore_finite()
        self._count_again(counted)
        diverged_at = report.step or report.steps[1]
        rollbacks.record(
            back_to=back_to,
            diverged_at=diverged_at,
            factor=self.config.divergence_lr_factor,
            skip=self.config.divergence_skip,
        )
        self.outputs.rewind(back_to)
        for number, rollback in enumerate(rollbacks.history, start=1):
            if rollback["diverged_at"] > back_to:
                details = {"divergence": report.to_dict()} if number == int(rollbacks.count) else {}
                self._log_rollback(number, rollback, details)
        self.console.say(
            f"rolled back to step {back_to} (rollback {int(rollbacks.count)} of at most {self.config.max_rollbacks}); "
            f"learning rate x{float(rollbacks.learning_rate_factor.numpy()):g}"
            + (f", step {diverged_at} skipped." if self.config.divergence_skip else ".")
        )
        return self.data.loop_call(self.config, self.strategy, self.state, jit_compile=self.jit_compile)

    def _counted(self) -> list[np.ndarray]:
        """The rollbacks' counts as they are: a restore must not undo those made since its checkpoint."""
        return [variable.numpy() for variable in self.state.rollbacks.values()] if self.state.rollbacks else []

    def _count_again(self, counted: list[np.ndarray]) -> None:
        for variable, value in zip(self.state.rollbacks.values() if self.state.rollbacks else (), counted):
            variable.assign(value)

    def _log_rollback(self, number: int, rollback: dict[str, int], details: dict[str, Any]) -> None:
        step = rollback["diverged_at"]
        self.outputs.summaries.write_scalars("train", step, {ROLLBACKS_TAG: float(number)})
        self.outputs.metrics_file.append({"step": step, "rollback": number, **rollback, **details})
        self.outputs.summaries.flush()

    def _restore_finite(self) -> int | None:
        """Restores the newest checkpoint whose weights are finite; its step, or None when none is."""
        for prefix in checkpoints.saved_checkpoints(self.manager.directory):
            if not checkpoints.restore(self.checkpoint, prefix) and _finite(self.state.model.variables):
                return self.state.counters.step
        return None

    def _train(self, loop_call: LoopCall, start: int, end: int) -> None:
        """Trains the steps after `start` up to `end` as the run did, skipping the skipped ones."""
        step = start
        while step < end:
            if step + 1 in self.skipped:
                self.data.skip_batch()
                step += 1
                continue
            count = min([end, *(skip - 1 for skip in self.skipped if skip > step + 1)]) - step
            loop_call(count, False)
            step += count

    def _step_finite(self, loop_call: LoopCall, step: int) -> bool:
        if step in self.skipped:
            self.data.skip_batch()
            return True
        measured = {name: float(value) for name, value in loop_call(1, False).items() if value.shape.rank == 0}
        return all(math.isfinite(measured[name]) for name in self.state.table.checked_finite) and not measured.get(
            "non_finite_gradients"
        )


def replica_measurements(
    strategy: tf.distribute.Strategy, state: TrainState, batch: object, *, global_batch_size: int
) -> list[tuple[dict[str, float], list[bool]]]:
    """Each replica's loss terms (its share of the batch's, as the step takes them) and whether
    each trainable variable's gradient is finite, on its consecutive share of the global `batch`,
    as the run's replicas get them (`inputs.ReplicaInput`). Eager: nothing is traced to keep."""
    replica_gradients = make_replica_gradients(state.model, global_batch_size, task=state.task)

    def replica(part: object) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        measured, gradients = replica_gradients(part)
        finite = [tf.reduce_all(tf.math.is_finite(g)) if g is not None else tf.constant(True) for g in gradients]
        return measured, tf.stack(finite)

    num_replicas = strategy.num_replicas_in_sync
    parts = [tf.split(tf.convert_to_tensor(tensor), num_replicas) for tensor in tf.nest.flatten(batch)]
    distributed = strategy.experimental_distribute_values_from_function(
        lambda context: tf.nest.pack_sequence_as(batch, [part[context.replica_id_in_sync_group] for part in parts])
    )
    # Traced: MirroredStrategy's eager `run` warns of its cost on stderr.
    measured, finite = tf.function(lambda part: strategy.run(replica, args=(part,)), autograph=False)(distributed)
    local = zip(strategy.experimental_local_results(measured), strategy.experimental_local_results(finite))
    return [
        ({name: float(value) for name, value in values.items()}, finite.numpy().tolist()) for values, finite in local
    ]


def _first_non_finite(replicas: list[tuple[dict[str, float], list[bool]]], state: TrainState) -> dict[str, Any]:
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


def _finite(variables: list) -> bool:
    arrays = (np.asarray(variable) for variable in variables)
    return all(np.isfinite(array).all() for array in arrays if np.issubdtype(array.dtype, np.floating))


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _listed(examples: np.ndarray | None) -> list[int] | None:
    return None if examples is None else [int(index) for index in examples]
