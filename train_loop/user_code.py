"""Calling a user's code (a model or input file, its function, what it returns): importing the
function a flag names, and any failure or exit it asks for made one usage error line. A leaf
that every layer may use: it imports only `errors`."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator

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


def function_name(function: Callable, default: str) -> str:
    """`module:function` for a function given as a Python object (`default` for one without a
    plain name, a lambda's): the run's setting."""
    name = function.__name__ if getattr(function, "__name__", "").isidentifier() else default
    return f"{getattr(function, '__module__', None) or 'python'}:{name}"


def load_function(flag: str, spec: str, *, role: str) -> Callable:
    """The function `PATH.py:FUNCTION` or `package.module:FUNCTION` names, as given to `--flag`
    (see `load_object`).

    Raises:
      UsageError: the file or module cannot be imported, or holds no such function.
    """
    function = load_object(flag, spec, role=role)
    if not callable(function):
        module_name, _, function_name = spec.rpartition(":")
        raise UsageError(f"--{flag}={spec}: {module_name} has no function {function_name}.")
    return function


def load_object(flag: str, spec: str, *, role: str, kind: str = "function") -> object:
    """What `PATH.py:NAME` or `package.module:NAME` names (a path is from the working folder), as
    given to `--flag`: a `kind` of the user's (a function, a task); `role` names such a file in
    the fix of an exit ("a model file").

    Raises:
      UsageError: the file or module cannot be imported, or holds no such name.
    """
    module_name, _, name = spec.rpartition(":")
    if module_name.endswith(".py") and not os.path.isfile(module_name):
        raise UsageError(f"--{flag}={spec}: no file {module_name} (a path is taken from {os.getcwd()}).")
    with exits_refused(
        f"--{flag}={spec}: {module_name}",
        during="when imported",
        fix=f'{role} must not exit; put its script code under `if __name__ == "__main__":`.',
    ):
        try:
            module = _import_file(module_name) if module_name.endswith(".py") else importlib.import_module(module_name)
        except Exception as error:  # The user's code: whatever stops its import is the same user problem.
            raise UsageError(f"--{flag}={spec}: importing {module_name} failed ({one_line(error)}).") from None
    found = getattr(module, name, None)
    if found is None:
        raise UsageError(f"--{flag}={spec}: {module_name} has no {kind} {name}.")
    return found


def _import_file(path: str) -> object:
    """Imports a .py file as a module named after it, registered so that its classes can be found;
    a file imported already (a notebook's, or a resumed run's in the same process) is reused."""
    name = os.path.basename(path).removesuffix(".py")
    loaded = sys.modules.get(name)
    if loaded is not None and os.path.realpath(getattr(loaded, "__file__", None) or "") == os.path.realpath(path):
        return loaded
    if loaded is not None:
        name = f"train_loop_model_{name}"  # Another module holds the name; do not displace it.
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def one_line(error: BaseException) -> str:
    """An exception as one line: Keras' terminal colours, its dumps of tensor values and its echo
    of the call's arguments cut."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split("Arguments received by")[0]
    text = re.sub(r"\[[][0-9.,eE+\-\s]{20,}\]", "<values>", " ".join(text.split()))
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__
