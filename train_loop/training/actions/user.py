"""A user's periodic action (`train_loop.PeriodicAction`), run with the built-in actions' cadence."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from train_loop.errors import ActionFailed
from train_loop.model.state import TrainState
from train_loop.outputs.summaries import Summaries
from train_loop.training.actions.base import Moment, Periodic
from train_loop.user_actions import ActionContext, PeriodicAction


@dataclasses.dataclass
class UserAction(Periodic):
    """Calls the declared function with where training stands, the train writer its default.

    What it raises (`sys.exit` too, which would otherwise end the run with the status it
    chose) stops the run after `save(step)`, so that the same command resumes there.
    """

    declared: PeriodicAction
    state: TrainState
    summaries: Summaries
    save: Callable[[int], None]  # The events flushed and the train state checkpointed at a step.

    def run(self, at: Moment) -> None:
        context = ActionContext(
            step=at.step,
            epoch_end=at.epoch_end,
            last=at.last,
            measurements=dict(at.measured),
            model=self.state.model,
            optimizer=self.state.optimizer,
        )
        try:
            with self.summaries.as_default("train", at.step):
                self.declared.function(context)
        except (Exception, SystemExit) as error:
            self.save(at.step)
            what = str(error).splitlines()[0] if str(error) else ""
            raise ActionFailed(
                f"action {self.declared.label} raised {type(error).__name__}{': ' if what else ''}{what} at step "
                f"{at.step}; the run is checkpointed there: fix the action and run the same command to resume."
            ) from error
