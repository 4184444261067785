"""What the user sees while training: a progress bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
from collections.abc import Mapping

import keras


class Console:
    """Progress within an epoch, then one line per epoch with both loss components."""

    def __init__(self, *, steps_per_epoch: int, num_epochs: int, interactive: bool | None = None):
        self._steps_per_epoch = steps_per_epoch
        self._num_epochs = num_epochs
        self._interactive = sys.stdout.isatty() if interactive is None else interactive
        self._bar: keras.utils.Progbar | None = None

    def say(self, line: str) -> None:
        print(line, flush=True)

    def progress(self, step: int, measurements: Mapping[str, float]) -> None:
        """Shows where the epoch stands; a bar on a terminal, one line per call elsewhere."""
        epoch, within = divmod(step - 1, self._steps_per_epoch)
        if not self._interactive:
            self.say(f"epoch {epoch + 1}/{self._num_epochs} step {within + 1}/"
                     f"{self._steps_per_epoch}: {_format(measurements)}")
            return
        if self._bar is None:
            self._bar = keras.utils.Progbar(
                self._steps_per_epoch, stateful_metrics=list(measurements), unit_name="step")
        self._bar.update(within + 1, values=list(measurements.items()))
        if within + 1 == self._steps_per_epoch:
            self._bar = None

    def epoch_done(self, epoch: int, train: Mapping[str, float], validation: Mapping[str, float] | None,
                   examples_per_second: float) -> None:
        """The epoch's means, and the latest validation unless there is no validation split."""
        held_out = "" if validation is None else f" | validation {_format(validation)}"
        self.say(f"epoch {epoch}/{self._num_epochs}: train {_format(train)}{held_out} | "
                 f"{examples_per_second:,.0f} examples/s")

    def tested(self, metrics: Mapping[str, float]) -> None:
        """The test split's numbers, evaluated once at the end."""
        self.say(f"test {_format(metrics)}")


def warn(message: str) -> None:
    """One line on stderr about something repaired or skipped on the way, training goes on."""
    print(f"train_loop: warning: {message}", file=sys.stderr, flush=True)


def _format(measurements: Mapping[str, float]) -> str:
    return " ".join(f"{name} {value:.4f}" for name, value in measurements.items())
