"""What the user sees while training: a progress bar on a terminal or in Jupyter, plain lines
elsewhere."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Iterator, Mapping

import keras

from train_loop.data.arrays import Splits


class Console:
    """An `Epoch i/N` header, progress within the epoch, then one line per epoch with both loss
    components; at the end the test split's numbers and where the run is.

    With `show_progress` false (a worker that is not the chief: every worker trains the same
    steps) only `say` prints, for the start lines that differ by worker (its devices); the
    progress, the epochs and the end then appear once under `launch`, from the chief.

    A standard output that closes (`train-loop ... | head`) ends the printing, not the run: it trains
    on, writes every file and exits 0, silently from then on (see `_closed_stdout_silenced`).
    """

    def __init__(
        self, *, steps_per_epoch: int, num_epochs: int, interactive: bool | None = None, show_progress: bool = True
    ):
        self._steps_per_epoch = steps_per_epoch
        self._num_epochs = num_epochs
        self._interactive = dynamic_display() if interactive is None else interactive
        self._show_progress = show_progress
        self._bar: keras.utils.Progbar | None = None
        self._epoch_shown = 0

    def say(self, line: str) -> None:
        with _closed_stdout_silenced():
            print(line, flush=True)

    def say_start(self, run_dir: str, splits: Splits, devices: str, *, restored_step: int | None, ema: float) -> None:
        """What the run starts from: its folder, its data and its `devices`; every worker says it."""
        self.say(
            f"resuming {run_dir} from step {restored_step}"
            if restored_step is not None
            else f"training {run_dir} on {splits.source}"
        )
        held_out = 0 if splits.x_validation is None else len(splits.x_validation)
        self.say(
            f"{len(splits.x_train):,} training, {held_out:,} validation and {len(splits.x_test):,} test "
            f"examples; {devices}"
        )
        if ema:
            self.say(f"evaluation and model.keras use the weights' moving average (--ema={ema:g})")

    def begin_epoch(self, step: int) -> None:
        """`Epoch i/N` before the epoch that `step` starts or, resumed mid-epoch, continues; once
        per epoch, however often it is called."""
        epoch = step // self._steps_per_epoch + 1
        if epoch != self._epoch_shown:
            self._epoch_shown = epoch
            self.show(f"Epoch {epoch}/{self._num_epochs}")

    def progress(self, step: int, measurements: Mapping[str, float]) -> None:
        """Shows where the epoch stands; a bar on a terminal or in Jupyter, one line per call elsewhere."""
        if not self._show_progress:
            return
        epoch, within = divmod(step - 1, self._steps_per_epoch)
        if not self._interactive:
            self.say(
                f"epoch {epoch + 1}/{self._num_epochs} step {within + 1}/"
                f"{self._steps_per_epoch}: {_format(measurements)}"
            )
            return
        if self._bar is None:
            self._bar = keras.utils.Progbar(
                self._steps_per_epoch, stateful_metrics=list(measurements), unit_name="step"
            )
        with _closed_stdout_silenced():
            self._bar.update(within + 1, values=list(measurements.items()))
        if within + 1 == self._steps_per_epoch:
            self._bar = None

    def epoch_done(
        self, epoch: int, train: Mapping[str, float], validation: Mapping[str, float] | None, examples_per_second: float
    ) -> None:
        """The epoch's means, and the latest validation unless there is no validation split."""
        held_out = "" if validation is None else f" | validation {_format(validation)}"
        self.show(
            f"epoch {epoch}/{self._num_epochs}: train {_format(train)}{held_out} | "
            f"{examples_per_second:,.0f} examples/s"
        )

    def tested(self, metrics: Mapping[str, float]) -> None:
        """The test split's numbers, evaluated once at the end."""
        self.show(f"test {_format(metrics)}")

    def finished(self, run_dir: str, logdir: str) -> None:
        """Where the run's model and results are, and the command that shows its curves."""
        self.show(
            f"saved {os.path.join(run_dir, 'model.keras')} and {os.path.join(run_dir, 'result.json')}; "
            f"to look at it: tensorboard --logdir {shlex.quote(logdir)}"
        )

    def show(self, line: str) -> None:
        """A line about the training itself, which every worker would repeat: the chief's alone."""
        if self._show_progress:
            self.say(line)


def dynamic_display() -> bool:
    """Whether a bar can redraw itself in place: on a terminal, or in Jupyter (`ipykernel`), as
    Keras' Progbar decides, less its `"posix" in sys.modules`, true on every Linux and Mac, which
    would fill a log file with the bar's control characters."""
    return sys.stdout.isatty() or "ipykernel" in sys.modules


@contextlib.contextmanager
def _closed_stdout_silenced() -> Iterator[None]:
    """A write to a standard output whose reader is gone (a pipe closed early) points it at
    /dev/null, as Python's documentation advises for a broken pipe: the line is dropped, every later
    one goes nowhere, and the flush at exit raises no second `BrokenPipeError`."""
    try:
        yield
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _format(measurements: Mapping[str, float]) -> str:
    return " ".join(f"{name} {value:.4f}" for name, value in measurements.items())
