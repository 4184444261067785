"""What a divergence does (`--on_divergence`): a report that names where the run diverged, taken
after the fact, and with `rollback` a return to the last checkpoint, from which the run goes on.

The report costs nothing while the run is healthy: the traced step stays as it is. When a loop
call's measurements are not finite, the newest checkpoint whose weights are finite is restored,
the steps up to that loop call are trained again, then its steps one at a time to the first one
that is not finite; before that step, each replica's loss terms and per-variable gradients are
computed on its share of the batch. Exact resume makes the replay the run's own steps (with
`--deterministic`, bit for bit), and a batch's examples knowable from the seed and the step.

On several workers each sees the same all-reduced measurements, so all handle the divergence at
the same loop call and replay in lockstep (the same loop calls, whose collectives must match),
from the same checkpoint of the run's; the replicas' findings are gathered, so each names the same.
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
from train_loop.model.state import TrainState
from train_loop.outputs import checkpoints, positions
from train_loop.outputs.run_outputs import DIVERGENCE_FILE, RunOutputs
from train_loop.training import distribute
from train_loop.training.console import Console
from train_loop.training.divergence_report import Report, first_non_finite, listed, replica_measurements
from train_loop.training.run_data import RunData, restore_worker_position

LoopCall = Callable[[int, bool], dict[str, tf.Tensor]]
ROLLBACKS_TAG = "divergence/rollbacks"


def check_strategy(config: Config, strategy: tf.distribute.Strategy) -> None:
    """Raises UsageError when `--on_divergence=rollback` meets a TPU's strategy, on which its replay
    and restore have never run."""
    if config.on_divergence == "rollback" and not replays_here(strategy):
        raise UsageError(
            "--on_divergence=rollback does not run under --strategy=tpu: its replay and restore have never run "
            "on a TPU (train_loop's tests have none), and a rollback that went wrong there would go on training "
            "unseen; use --on_divergence=stop, or a CPU or GPU strategy (one_device, mirrored or multi_worker)."
        )


def replays_here(strategy: tf.distribute.Strategy) -> bool:
    """Whether the run can replay its steps: on one machine's devices, or on a cluster's workers, which
    replay in lockstep (the same loop calls, so their collectives match); not on a TPU."""
    return isinstance(
        strategy,
        (tf.distribute.OneDeviceStrategy, tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy),
    )


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
    # Under several workers, this worker's data position, saved beside the run's checkpoints.
    worker: positions.WorkerPosition | None = None

    def begin(self) -> None:
        """With rollback, a fresh run saves its start: there is always a checkpoint to go back to.
        Under several workers the chief's manager alone knows the run's checkpoints, and every
        worker saves (a collective): they decide together."""
        if self.state.rollbacks is None:
            return
        (saved,) = distribute.mean_over_workers(self.strategy, [float(self.manager.latest_checkpoint is not None)])
        if not saved:
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
            raise self._stopped(error, report)
        return self._roll_back(report)

    def _stopped(self, error: DivergedError, report: Report) -> DivergedError:
        """The run's last line: the report's step, term and replica where the replay found them (the
        loop call's sums may name another term: an inf data term minus an inf is nan), and the fix."""
        where = f"(report: {self.outputs.run_dir}/{DIVERGENCE_FILE})"
        if report.step is None:
            return DivergedError(f"{error} {where}", steps=error.steps)
        fix = "lower --learning_rate, or pass --on_divergence=rollback to go back to the last finite checkpoint and on"
        if self.state.rollbacks is not None:
            fix = f"the rollbacks --max_rollbacks={self.config.max_rollbacks} allows are used up: lower --learning_rate"
            fix += ", or raise --max_rollbacks"
        return DivergedError(
            f"training diverged at step {report.step}: {report.term} became {report.value} on replica {report.replica} "
            f"of {report.replicas}; nothing past step {error.steps[0] - 1} was saved; {fix}. {where}",
            steps=error.steps,
        )

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
        step_batch = self.data.step_batch(self.config, step)
        replicas = replica_measurements(self.strategy, self.state, step_batch, global_batch_size=self.config.batch_size)
        found = first_non_finite(replicas, self.state)
        return Report(steps, back_to, step=step, examples=listed(step_batch.examples), **found)

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
        """Restores the newest checkpoint whose weights are finite; its step, or None when none is.

        The run's checkpoints, on every worker: a worker other than the chief saves into a folder
        of its own, which holds only what it saved since it started (`checkpoints.save_directory`).
        Under several workers, of the steps at which every worker saved its data position, which
        is restored too; the workers agree on each checkpoint, so that all take the same one.
        """
        saved_alike = self.worker.common_steps() if self.worker else None
        for prefix in checkpoints.saved_checkpoints(checkpoints.directory(self.outputs.run_dir)):
            step = int(prefix.rpartition("-")[2])
            if saved_alike is not None and step not in saved_alike:
                continue
            restored = not checkpoints.restore(self.checkpoint, prefix) and _finite(self.state.model.variables)
            (failed,) = distribute.mean_over_workers(self.strategy, [float(not restored)])
            if not failed:
                if self.worker:
                    restore_worker_position(self.worker, step, self.strategy)
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


def _finite(variables: list) -> bool:
    arrays = (np.asarray(variable) for variable in variables)
    return all(np.isfinite(array).all() for array in arrays if np.issubdtype(array.dtype, np.floating))
