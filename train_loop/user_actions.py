"""Your own periodic actions (`train_loop.train(actions=[...])`): what you declare, and what your
function is given. Plain Python, so that `import train_loop` stays free of TensorFlow."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from train_loop.errors import UsageError


@dataclasses.dataclass(frozen=True)
class ActionContext:
    """Where training stands when your action runs.

    `measurements` are the last loop call's, by name (`cross_entropy`, `regularization`, `total`,
    `accuracy`, `gradient_norm`, `gradient_norm/<layer>`, `clipped` with `global_clipnorm`):
    the means over its steps, the gradient's at its last step. `model` and `optimizer` are the
    run's own: read them (predict, look at the weights), do not change them.
    """

    step: int
    epoch_end: bool
    last: bool
    measurements: Mapping[str, float]
    model: Any  # keras.Model
    optimizer: Any  # keras.optimizers.Optimizer


@dataclasses.dataclass(frozen=True)
class PeriodicAction:
    """A function of yours, called with an `ActionContext` after training reaches a step it is due
    at, with the built-in actions' cadence: every `every` steps (0: at the end of each epoch),
    also at each epoch's end with `at_epoch_end`, also at the run's last step with `at_last`.

    While it runs, the run's train writer is TensorFlow's default summary writer, at the step:
    `tf.summary.image("samples", images)` inside it writes to `<run>/train` (on a cluster, the
    chief's alone). If it raises, the run is checkpointed at that step and stops with one line
    naming it (exit status 2, as a failing model function), on every worker of a cluster if it
    raised on one alone; the same command resumes once it is fixed.

    Raises:
      UsageError: `function` is not callable, or `every` is negative.
    """

    function: Callable[[ActionContext], None]
    every: int = 0
    at_epoch_end: bool = False
    at_last: bool = False
    name: str = ""  # Its name in messages; empty: the function's.

    def __post_init__(self) -> None:
        if not callable(self.function):
            raise UsageError(
                f"PeriodicAction({self.function!r}) takes a function of an ActionContext, "
                f"not a {type(self.function).__name__}."
            )
        if not isinstance(self.every, int) or self.every < 0:
            raise UsageError(
                f"PeriodicAction({self.label}, every={self.every!r}) must be a whole number of steps "
                "0 or more (0: at the end of each epoch)."
            )

    @property
    def label(self) -> str:
        return self.name or getattr(self.function, "__qualname__", None) or repr(self.function)


def checked_actions(actions: object) -> tuple[PeriodicAction, ...]:
    """`actions` as a tuple, each a `PeriodicAction`.

    Raises:
      UsageError: `actions` is not a list of them.
    """
    items = tuple(actions) if isinstance(actions, (list, tuple)) else None
    wrong = [item for item in items or () if not isinstance(item, PeriodicAction)]
    if items is None or wrong:
        culprit = repr(wrong[0] if wrong else actions)
        raise UsageError(
            f"actions= takes a list of train_loop.PeriodicAction, and got {culprit[:80]}: wrap a function "
            "as train_loop.PeriodicAction(function, every=N)."
        )
    return items
