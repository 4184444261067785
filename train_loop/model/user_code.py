"""Calling a user's code (a model file, its function, its model): an exit it asks for is a usage error."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from train_loop.errors import UsageError


@contextlib.contextmanager
def exits_refused(culprit: str, *, during: str, fix: str) -> Iterator[None]:
    """Turns what the code inside raises that is not an `Exception` (`sys.exit`, `exit()`, a
    `KeyboardInterrupt` it raises itself) into a `UsageError`: "`culprit` called sys.exit(0)
    `during`: `fix`".

    Uncaught, `sys.exit(0)` in a model function ended the run with status 0 and nothing trained,
    and `sys.exit(3)` borrowed the status of a diverged run. A real Ctrl-C is told apart by
    noting SIGINT while the code runs: when one arrived, the code ends in a `KeyboardInterrupt`
    (the command line's "stopped by SIGINT" line), whatever it raised; the signal wins.

    Raises:
      UsageError: the code asked to exit, and no SIGINT arrived meanwhile.
    """
    with _noting_sigint() as received:
        try:
            yield
        except Exception:
            raise  # The caller reports failures; only what asks to exit is handled here.
        except BaseException as stop:
            if not received:
                raise UsageError(f"{culprit} {_what_it_did(stop)} {during}: {fix}") from None
            if isinstance(stop, KeyboardInterrupt):
                raise
            raise KeyboardInterrupt from stop  # A Ctrl-C ends the run as one, whatever the code made of it.


@contextlib.contextmanager
def _noting_sigint() -> Iterator[list[int]]:
    """A list that receives SIGINT's number if the signal arrives inside; the handler in place
    still runs. Python runs handlers in the main thread only, and a handler that is not Python's
    raises nothing, so elsewhere nothing needs noting."""
    previous = signal.getsignal(signal.SIGINT)
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield received
        return

    def note(signum: int, frame: object) -> None:
        received.append(signum)
        previous(signum, frame)

    signal.signal(signal.SIGINT, note)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def _what_it_did(stop: BaseException) -> str:
    if isinstance(stop, SystemExit):
        return f"called sys.exit({'' if stop.code is None else repr(stop.code)})"
    return f"raised {type(stop).__name__}"
