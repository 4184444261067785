"""The epoch's end (its line, `metrics.jsonl`, the next epoch's sums) and the training time's count."""

from __future__ import annotations

import dataclasses
import time

from train_loop.configs import Config
from train_loop.model import optimizers
from train_loop.model.state import TrainState
from train_loop.outputs.metrics_file import MetricsFile, epoch_record
from train_loop.training.actions.base import Action, Moment, Periodic
from train_loop.training.actions.validation import Validation
from train_loop.training.console import Console
from train_loop.training.timing import Throughput


@dataclasses.dataclass
class CountTraining(Action):
    """Adds the loop call, and the actions before this one, to the training time: evaluation and
    checkpoints, after it, are not training."""

    throughput: Throughput
    batch_size: int

    def run(self, at: Moment) -> None:
        self.throughput.stop(at.num_steps * self.batch_size)


@dataclasses.dataclass
class EpochEnd(Periodic):
    """Counts the epoch, says its means on the console (with the latest validation) and in
    `metrics.jsonl` (with the validation of this step, if any), and starts the next epoch's sums;
    the last step keeps them, for `result.json`. Before a loop call, the `Epoch i/N` header of the
    epoch it trains in."""

    config: Config
    state: TrainState
    console: Console
    metrics_file: MetricsFile
    throughput: Throughput
    validation: Validation | None = None

    def before_call(self, step: int) -> None:
        self.console.begin_epoch(step)

    def run(self, at: Moment) -> None:
        counters, examples_per_second = self.state.counters, self.throughput.examples_per_second
        counters.epoch.assign_add(1)
        epoch, train = int(counters.epoch), counters.epoch_means()
        latest = self.validation.latest if self.validation else None
        self.console.epoch_done(epoch, train, latest and latest.metrics, examples_per_second)
        validated_now = latest is not None and self.validation.due(at)
        self.metrics_file.append(
            epoch_record(
                step=at.step,
                epoch=epoch,
                train=train,
                validation=latest.metrics if validated_now else None,
                learning_rate=optimizers.applied_learning_rate(
                    self.config, self.state.optimizer, self.state.learning_rate_factor
                ),
                examples_per_second=examples_per_second,
                wall_time=time.time(),
            )
        )
        if not at.last:
            counters.start_epoch()
