"""The errors that end a run on purpose; the command line turns each into its exit status."""

from __future__ import annotations


class UsageError(ValueError):
    """A user's mistake: the CLI prints its message as one line and exits with status 2."""


class RunStopped(RuntimeError):
    """Training stopped before its end, with everything up to `step` saved; `is_error` when the
    cause is a fault (its line then reads `error:`), not a request to stop."""

    is_error = False

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


class DivergedError(RunStopped):
    """A loss component or the gradient turned non-finite; nothing past the last finite step is saved."""

    EXIT_STATUS = 3
    is_error = True

    def __init__(self, message: str, *, steps: tuple[int, int] = (0, 0)):
        super().__init__(message, self.EXIT_STATUS)
        self.steps = steps  # The first and last step of the loop call that diverged.


class Interrupted(RunStopped):
    """SIGTERM or SIGINT: a checkpoint was written at the step reached; the same command resumes.

    The exit status is the shell's for a death by that signal (143, 130), so schedulers and
    scripts read it as the preemption it is.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message, 128 + signum)


class NoSpace(RunStopped):
    """The disk filled up while a checkpoint, `model.keras` or `result.json` was written; the
    half-written temporary is gone and what was saved before stands, so the run resumes once
    space is freed. Exit status 74 is sysexits' EX_IOERR."""

    EXIT_STATUS = 74
    is_error = True

    def __init__(self, path: str):
        super().__init__(f"no space left on {path}; the run resumes once space is freed.", self.EXIT_STATUS)


class ActionFailed(RunStopped):
    """A user's periodic action raised: the run was checkpointed at the step it ran at, and the same
    command resumes there once the action is fixed. Exit status 2, as a failing model function's
    (a `UsageError`): the fault is in the user's code, and so is the fix."""

    EXIT_STATUS = 2
    is_error = True

    def __init__(self, message: str):
        super().__init__(message, self.EXIT_STATUS)


class CheckFailed(RunStopped):
    """A check asked for before training (`--check_regularizers`, `--check_equivalence`) found the
    setup computing something other than it claims: nothing was trained, and nothing written but
    the check's verdict (in settings.json). Exit status 70,
    sysexits' EX_SOFTWARE: no flag is wrong (that is 2), the model's code or the loop's math is."""

    EXIT_STATUS = 70
    is_error = True

    def __init__(self, message: str):
        super().__init__(message, self.EXIT_STATUS)
