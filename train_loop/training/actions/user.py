"""A user's periodic action (`train_loop.PeriodicAction`), run with the built-in actions' cadence,
and the stop after one raised (`UserActionFailures`), agreed by every worker of a cluster."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import tensorflow as tf

from train_loop.errors import ActionFailed
from train_loop.model.state import TrainState
from train_loop.outputs.summaries import Summaries
from train_loop.training.actions.base import Action, Moment, Periodic
from train_loop.training.distribute import mean_over_workers
from train_loop.user_actions import ActionContext, PeriodicAction


@dataclasses.dataclass
class UserAction(Periodic):
    """Calls the declared function with where training stands, the train writer its default.

    What it raises (`sys.exit` too, which would otherwise end the run with the status it
    chose) is kept as `failure`, for `UserActionFailures` to stop the run on every worker.
    """

    declared: PeriodicAction
    state: TrainState
    summaries: Summaries
    failure: BaseException | None = None  # What the function raised.

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
            self.failure = error


@dataclasses.dataclass
class UserActionFailures(Action):
    """After the user's actions of a loop call: if one raised, on any worker, saves the run at
    the step (`save`) and stops it with one line naming that action, on every worker.

    A worker that stopped alone would leave the others in their next all-reduce, which then
    waits for it or dies with TensorFlow's traceback; so on a cluster the workers first average
    their failures' flags: one collective, made only at the steps a user's action is due at.
    """

    user_actions: Sequence[UserAction]
    strategy: tf.distribute.Strategy
    save: Callable[[int], None]  # The events flushed and the train state checkpointed at a step.

    def due(self, at: Moment) -> bool:
        return any(action.due(at) for action in self.user_actions)

    def run(self, at: Moment) -> None:
        flags = mean_over_workers(self.strategy, [float(action.failure is not None) for action in self.user_actions])
        failed = next((action for action, flag in zip(self.user_actions, flags) if flag > 0), None)
        if failed is None:
            return
        self.save(at.step)
        raise ActionFailed(
            f"action {failed.declared.label} {_raised(failed.failure)} at step {at.step}; the run is checkpointed "
            "there: fix the action and run the same command to resume."
        ) from failed.failure


def _raised(error: BaseException | None) -> str:
    """What an action raised, for the one line; None: it raised on another worker."""
    if error is None:
        return "raised on another worker"
    what = str(error).splitlines()[0] if str(error).strip() else ""
    return f"raised {type(error).__name__}{': ' if what else ''}{what}"
