"""Starting a command-line tool: absl's app with a usage line for users, `--helpshort` listing the
flags the tool takes, and `--version`, the same whether it runs as a console script or `python -m`.

Flags live with the tool that reads them: `cli` holds the training flags (which `study` and
`launch` pass on, and so list too), `study`, `launch` and `bench` their own. This module defines
only `--version`, which every tool takes, and how a user error ends every tool (`fail`: one line,
exit 2), a bad flag's included; it imports neither `cli` nor TensorFlow, so `bench`, whose flags
share names with the training flags, can use it.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Sequence
from importlib import metadata

from absl import app, flags

import train_loop

_VERSION = flags.DEFINE_bool("version", False, "Print the version of train_loop and its TensorFlow, and exit.")


def run(main: Callable[[list[str]], None], *, usage: str, flag_modules: Sequence[str]) -> None:
    """Runs `main` as an absl app, printing `usage` and the flags of `flag_modules` for
    `--help`/`--helpshort`.

    absl lists the key flags of the main module, which under a console script is the script
    itself (no flags) and under `python -m` the tool's file: registering them here makes both
    list the same flags. Its usage text is `__main__`'s docstring, hence the assignment.
    """
    sys.modules["__main__"].__doc__ = usage
    by_module = flags.FLAGS.flags_by_module_dict()
    for module in (*flag_modules, __name__):
        for flag in by_module.get(module, []):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(_frozen_on_return(main), flags_parser=lambda argv: _exit_on_version(parse_flags(argv)))


def parse_flags(argv: Sequence[str], *, flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl's parsing into `flag_values`, but a bad flag is one line and exit 2, like every other
    user error (absl's own prints two lines and exits 1)."""
    try:
        return flag_values(argv)
    except flags.CantOpenFlagFileError as error:
        cause = error.__context__  # absl keeps the OSError only in its message's text.
        fail(
            f"--flagfile: cannot read {cause.filename} ({cause.strerror}); give the path of a file "
            "of --flag=value lines."
            if isinstance(cause, OSError)
            else str(error)
        )
    except flags.Error as error:
        fail(f"{error}. Run with --helpfull to see every flag.")


def fail(message: str) -> None:
    """One line on stderr, exit status 2: the convention for every user error."""
    print(f"train_loop: error: {message}", file=sys.stderr)
    sys.exit(2)


def _frozen_on_return(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """`main`, then `gc.freeze()` however it ends: the interpreter's exit skips its last garbage
    collections over TensorFlow's and Keras' objects, which took 1.1 s of CPU after every run
    (0.09 s frozen; measured on a script that only imports both).

    Everything of ours is closed and flushed by then (files are written through temporary names
    and closed; summary writers closed); atexit handlers, TensorFlow's included, still run.
    """

    def main_then_freeze(argv: list[str]) -> None:
        try:
            main(argv)
        finally:
            gc.freeze()

    return main_then_freeze


def _exit_on_version(argv: list[str]) -> list[str]:
    if _VERSION.value:
        print(
            f"train_loop {train_loop.__version__} (tensorflow {_installed('tensorflow')}, "
            f"keras {_installed('keras')}, Python {sys.version.split()[0]})"
        )
        sys.exit(0)
    return argv


def _installed(distribution: str) -> str:
    """The installed version, read from its metadata: importing TensorFlow would take seconds."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"
