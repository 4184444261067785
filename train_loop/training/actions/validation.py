"""Validation after a loop call, with the best model and early stopping."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from train_loop.model.state import TrainState
from train_loop.outputs.summaries import Summaries
from train_loop.training.actions.base import Moment, Periodic
from train_loop.training.console import Console
from train_loop.training.evaluation import Evaluation


@dataclasses.dataclass
class Validation(Periodic):
    """Scores the validation split, with the weights validation uses (averaged, with `--ema`);
    keeps the best model and decides early stopping, when the run has a best metric."""

    state: TrainState
    validate: Callable[[], Evaluation]
    summaries: Summaries
    console: Console
    save_best: Callable[[], None] = lambda: None  # Writes <run>/best/ from the model as validated.
    latest: Evaluation | None = None

    def run(self, at: Moment) -> None:
        self.latest = self.validate()
        scalars = self.state.table.tagged(self.latest.metrics)
        self.summaries.write_evaluation("validation", at.step, scalars, self.latest.confusion_matrix)
        best = self.state.best
        # The weights validated, which with --ema are the averaged ones, are the ones to keep.
        with self.state.validated_weights():
            if best and best.update(at.step, self.latest.metrics):
                self.save_best()
        if best and best.stop:
            self.console.show(
                f"stopping early at step {at.step}: {best.name} has not improved by more than "
                f"{best.min_delta:g} in {best.patience} validations; "
                f"the best, {float(best.value.numpy()):.4f}, was at step {best.step}"
            )
