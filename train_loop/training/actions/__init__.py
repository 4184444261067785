"""Periodic actions, run by the controller after a loop call when they are due: summaries,
histograms, validation (best model, early stopping), the epoch's end, checkpoints, profiling,
signals, and a user's own. One rule says when one is due (`Cadence`, as CLU's `every_steps`); the controller asks
each `due(at)`, then `run(at)`, and `next_due(step)` to end a loop call there. Each runs on its
own, without training.

One module per kind, as Orbit's `orbit/actions/`; this package's namespace holds them all.
"""

from train_loop.training.actions.base import Action, Cadence, Moment, Periodic
from train_loop.training.actions.epochs import CountTraining, EpochEnd
from train_loop.training.actions.profiling import Profiling
from train_loop.training.actions.saving import Checkpoint, Signals
from train_loop.training.actions.summaries import Flush, Histograms, TrainSummaries
from train_loop.training.actions.user import UserAction, UserActionFailures
from train_loop.training.actions.validation import Validation

__all__ = [
    "Action",
    "Cadence",
    "Checkpoint",
    "CountTraining",
    "EpochEnd",
    "Flush",
    "Histograms",
    "Moment",
    "Periodic",
    "Profiling",
    "Signals",
    "TrainSummaries",
    "UserAction",
    "UserActionFailures",
    "Validation",
]
