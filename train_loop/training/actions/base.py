"""What every action shares: `Action`, the moment it runs at (`Moment`), and the one rule for
when a periodic action is due (`Cadence`, as CLU's `every_steps`)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When a periodic action is due: every `every` steps, or with `every` = 0 at the end of each
    epoch; with `at_epoch_end` at each epoch's end as well, with `at_last` at the run's last step."""

    every: int
    steps_per_epoch: int
    at_epoch_end: bool = False
    at_last: bool = False

    def due(self, at: Moment) -> bool:
        periodic = at.step % self.every == 0 if self.every else at.epoch_end
        return periodic or (self.at_epoch_end and at.epoch_end) or (self.at_last and at.last)

    def due_at(self, step: int) -> bool:
        """Whether it is due at `step` by count alone: known before the loop call ending there."""
        return self.due(Moment(step, epoch_end=step % self.steps_per_epoch == 0))

    def next_due(self, step: int) -> int:
        """The next step past `step` it is due at by count (the last step is always a boundary)."""
        epoch_end = step + self.steps_per_epoch - step % self.steps_per_epoch
        periodic = step + self.every - step % self.every if self.every else epoch_end
        return min(periodic, epoch_end) if self.at_epoch_end else periodic


@dataclasses.dataclass(frozen=True)
class Moment:
    """Where training stands after a loop call of `num_steps` that ended at `step`: whether an
    epoch ended there, whether it is the run's last step (the last of all, or an early stop),
    the gradient's histograms at `step` when an action asked for them, and the loop call's
    logged measurements (`controller.call_means`)."""

    step: int
    epoch_end: bool = False
    last: bool = False
    num_steps: int = 1
    histograms: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    measured: dict[str, float] = dataclasses.field(default_factory=dict)


class Action:
    """An action after every loop call; `Periodic` ones say when they are due."""

    def due(self, at: Moment) -> bool:
        return True

    def next_due(self, step: int) -> int | None:
        """The next step past `step` that must end a loop call for this action; None: any step."""
        return None

    def wants_histograms(self, step: int) -> bool:
        """Whether the loop call ending at `step` must measure the gradient's histograms."""
        return False

    def begin(self) -> None:
        """Called once before the first loop call of a run that starts at step 0."""

    def before_call(self, step: int) -> None:
        """Called before the loop call that starts at `step`."""

    def end(self) -> None:
        """Called when the controller stops, by reaching the end or by an error."""

    def run(self, at: Moment) -> None:
        raise NotImplementedError


@dataclasses.dataclass
class Periodic(Action):
    """An action due as its `cadence` says."""

    cadence: Cadence

    def due(self, at: Moment) -> bool:
        return self.cadence.due(at)

    def next_due(self, step: int) -> int | None:
        return self.cadence.next_due(step)
