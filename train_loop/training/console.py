"""What the user sees while training: a progress bar on a terminal or in Jupyter, one line per
epoch elsewhere."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple


class DataSummary(NamedTuple):
    """What the start says of the data: where it comes from and each split's examples (None: an
    endless or unknown-length training stream)."""

    source: str
    train: int | None
    validation: int
    test: int


class Console:
    """An `Epoch i/N` header, progress within the epoch, then one line per epoch with both loss
    components; at the end the test split's numbers and where the run is.

    On a terminal or in Jupyter the progress is a bar redrawn in place (`_Bar`), which the epoch's
    line replaces; elsewhere (a log file, a pipe, `launch`'s workers) an epoch is one line. A line
    printed while the bar is drawn, or a stop's message after it (leave `with console:` by the
    exception), starts on a line of its own.

    With `show_progress` false (a worker that is not the chief: every worker trains the same
    steps) only `say` prints, for the start lines that differ by worker (its devices); the
    progress, the epochs and the end then appear once under `launch`, from the chief.

    A standard output that closes (`train-loop ... | head`) ends the printing, not the run: it trains
    on, writes every file and exits 0, silently from then on (see `_closed_stdout_silenced`).
    """

    def __init__(
        self,
        *,
        steps_per_epoch: int,
        num_epochs: int,
        interactive: bool | None = None,
        show_progress: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._steps_per_epoch = steps_per_epoch
        self._num_epochs = num_epochs
        self._interactive = dynamic_display() if interactive is None else interactive
        self._show_progress = show_progress
        self._bar = _Bar(steps_per_epoch, clock)
        self._epoch_shown = 0

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exception: object) -> None:
        """Ends the bar's line, so that what a stop prints next (on stderr, the same terminal) starts a line."""
        self._end_bar()

    def say(self, line: str) -> None:
        self._end_bar()
        with _closed_stdout_silenced():
            print(line, flush=True)

    def say_start(
        self, run_dir: str, data: DataSummary, devices: str, *, restored_step: int | None, ema: float
    ) -> None:
        """What the run starts from: its folder, its data and its `devices`; every worker says it."""
        self.say(
            f"resuming {run_dir} from step {restored_step}"
            if restored_step is not None
            else f"training {run_dir} on {data.source}"
        )
        train = "an endless stream of" if data.train is None else f"{data.train:,}"
        self.say(f"{train} training, {data.validation:,} validation and {data.test:,} test examples; {devices}")
        if ema:
            self.say(f"evaluation and model.keras use the weights' moving average (--ema={ema:g})")

    def begin_epoch(self, step: int) -> None:
        """`Epoch i/N` before the epoch that `step` starts or, resumed mid-epoch, continues; once
        per epoch, however often it is called."""
        epoch = step // self._steps_per_epoch + 1
        if epoch != self._epoch_shown:
            self._epoch_shown = epoch
            self.show(f"Epoch {epoch}/{self._num_epochs}")

    @property
    def draws_progress(self) -> bool:
        """Whether `progress` draws anything: a caller skips reading the means for a bar not shown."""
        return self._show_progress and self._interactive

    def progress(self, step: int, train: Mapping[str, float]) -> None:
        """Redraws the bar at `step` with `train`, the epoch's means so far (the epoch line's
        "train" at its last step); on a terminal or in Jupyter only."""
        if self.draws_progress:
            with _closed_stdout_silenced():
                self._bar.draw(step, f"train {_format(train)}")

    def epoch_done(
        self, epoch: int, train: Mapping[str, float], validation: Mapping[str, float] | None, examples_per_second: float
    ) -> None:
        """The epoch's means, and the latest validation unless there is no validation split; on a
        terminal, in place of the bar."""
        held_out = "" if validation is None else f" | validation {_format(validation)}"
        line = (
            f"epoch {epoch}/{self._num_epochs}: train {_format(train)}{held_out} | "
            f"{examples_per_second:,.0f} examples/s"
        )
        if self._show_progress and self._interactive:
            with _closed_stdout_silenced():
                self._bar.replace(line)
        else:
            self.show(line)

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

    def _end_bar(self) -> None:
        with _closed_stdout_silenced():
            self._bar.end_line()


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


class _Bar:
    """The epoch's progress, one line redrawn in place (`\\r`), as `step 12/40 [=====.....] eta 0:03 | train ...`.

    The time left comes from a measured rate: the process's first drawing is its origin, so the
    first drawing has none (rather than a rate of zero) and a traced first step does not skew it.
    A line wider than the terminal would wrap, and `\\r` would then redraw only its last row: it
    is cut to the terminal's width.
    """

    WIDTH = 20  # The bar's characters.

    def __init__(self, steps_per_epoch: int, clock: Callable[[], float]):
        self._steps_per_epoch = steps_per_epoch
        self._clock = clock
        self._origin: tuple[int, float] | None = None  # The first drawing's step and time.
        self._shown = 0  # The length of the line drawn and not ended; 0: none is.

    def draw(self, step: int, values: str) -> None:
        within, now = (step - 1) % self._steps_per_epoch + 1, self._clock()
        if self._origin is None:
            self._origin = (step, now)
        first_step, started = self._origin
        eta = ""
        if first_step < step and within < self._steps_per_epoch:
            eta = f" eta {_duration((now - started) / (step - first_step) * (self._steps_per_epoch - within))}"
        filled = self.WIDTH * within // self._steps_per_epoch
        digits = len(str(self._steps_per_epoch))
        line = (
            f"step {within:>{digits}}/{self._steps_per_epoch} [{'=' * filled}{'.' * (self.WIDTH - filled)}]"
            f"{eta} | {values}"
        )
        columns = _columns()
        self._write(line[: columns - 1] if columns else line)

    def replace(self, line: str) -> None:
        """`line` over the bar (or on a line of its own, none drawn), ended."""
        self._write(line)
        self.end_line()

    def end_line(self) -> None:
        if self._shown:
            self._shown = 0
            sys.stdout.write("\n")
            sys.stdout.flush()

    def _write(self, line: str) -> None:
        sys.stdout.write(f"\r{line}{' ' * (self._shown - len(line))}")  # Blanks what a longer drawing left.
        sys.stdout.flush()
        self._shown = len(line)


def _columns() -> int:
    """The terminal's width; 0 (nothing is cut) in Jupyter, whose cell wraps a line that `\\r`
    then redraws whole."""
    return os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else 0


def _duration(seconds: float) -> str:
    """`0:07`, `12:34`, `1:02:03`: hours only when there are any."""
    minutes, whole_seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{whole_seconds:02d}" if hours else f"{minutes}:{whole_seconds:02d}"


def _format(measurements: Mapping[str, float]) -> str:
    return " ".join(f"{name} {value:.4f}" for name, value in measurements.items())
