"""Starting a command-line tool: absl's app with a usage line for users, `--helpshort` listing the
flags the tool takes, and `--version`, the same whether it runs as a console script or `python -m`.

Flags live with the tool that reads them: `training_flags` holds the training flags and `cli`
their groups (which `study` and `launch` pass on, and so list too), `study`, `launch` and `bench`
their own. This module defines only `--version`, which every tool takes, how a user error ends
every tool (`fail`: one line, exit 2), a bad flag's included, and the check of a flag that names a
file (`require_utf8`); it imports neither `cli` nor TensorFlow, so `bench`, whose flags share
names with the training flags, can use it.
"""

from __future__ import annotations

import gc
import importlib.resources
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata

from absl import app, flags

import train_loop

_VERSION = flags.DEFINE_bool("version", False, "Print the version of train_loop and its TensorFlow, and exit.")


def run(main: Callable[[list[str]], None], *, usage: str, groups: Mapping[str, Sequence[str]]) -> None:
    """Runs `main` as an absl app; `--help` and `--helpshort` print `usage` and the tool's flags
    under the headings of `groups` (heading: flag names, in order), then exit 0.

    absl's own `--helpshort` lists the key flags of the main module in one block and exits 1;
    a newcomer reading forty flags wants them by purpose. `--helpfull` stays absl's (every flag,
    absl's own included). The usage text is also `__main__`'s docstring, which absl prints for a
    bad command line.
    """
    sys.modules["__main__"].__doc__ = usage
    if any(argument in ("--help", "--helpshort", "-h", "-?") for argument in sys.argv[1:]):
        print(grouped_help(usage, {**groups, "this tool": ("version",)}))
        sys.exit(0)
    app.run(_frozen_on_return(main), flags_parser=lambda argv: _exit_on_version(parse_flags(argv)))


def grouped_help(usage: str, groups: Mapping[str, Sequence[str]]) -> str:
    """`usage`, then each group's heading and its flags as absl prints them (`--name: help`, then
    the default)."""
    lines = [usage.rstrip(), ""]
    for heading, names in groups.items():
        lines.append(f"{heading}:")
        for name in names:
            flag = flags.FLAGS[name]
            prefix = "[no]" if flag.boolean else ""
            lines.append(flags.text_wrap(f"--{prefix}{name}: {flag.help}", indent="    ", firstline_indent="  "))
            lines.append(flags.text_wrap(f"(default: {flag.default_as_str})", indent="    "))
        lines.append("")
    lines.append("--helpfull lists every flag, absl's own too.")
    return "\n".join(lines)


def parse_flags(argv: Sequence[str], *, flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl's parsing into `flag_values`, but a bad flag is one line and exit 2, like every other
    user error (absl's own prints two lines and exits 1); a shipped flagfile may be named alone
    (`--flagfile=l2`, see `_with_shipped_flagfile`)."""
    try:
        return flag_values([argv[0], *(_with_shipped_flagfile(argument) for argument in argv[1:])])
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


def shipped_flagfiles() -> dict[str, str]:
    """The flagfiles the package ships (the study's experiments), by name: `{"l2": "<path>/l2.cfg"}`.

    The package's `flags/` is a real folder once installed (see pyproject.toml), so its paths can
    be handed to absl as they are.
    """
    folder = importlib.resources.files("train_loop").joinpath("flags")
    return {entry.name.removesuffix(".cfg"): str(entry) for entry in folder.iterdir() if entry.name.endswith(".cfg")}


def _with_shipped_flagfile(argument: str) -> str:
    """`--flagfile=NAME`, where NAME is a bare name and no file here, as the shipped flagfile of
    that name, so that `--flagfile=l2` works after a wheel install from any folder; a bare name
    that is neither is one line."""
    name = argument.removeprefix("--flagfile=")
    if name == argument or os.path.exists(name) or os.sep in name:
        return argument  # A path: absl reads it, or says in one line that it cannot.
    shipped = shipped_flagfiles()
    if name.removesuffix(".cfg") in shipped:
        return f"--flagfile={shipped[name.removesuffix('.cfg')]}"
    fail(
        f"--flagfile={name}: no such file, and no shipped flagfile of that name; the shipped ones are "
        f"{', '.join(sorted(shipped))} (e.g. --flagfile={min(shipped)}), or give the path of a file of "
        "--flag=value lines."
    )
    return argument


def require_utf8(name: str) -> None:
    """Makes the parsing of the flag `name`, a path or a folder's name, refuse bytes that are not
    UTF-8 (the command line hands them over as surrogate escapes): TensorFlow takes file names as
    UTF-8 text, so such a run would fail at its first TensorFlow write, after its folder was made."""
    flags.register_validator(name, _check_utf8)


def _check_utf8(value: str | None) -> bool:
    try:
        (value or "").encode("utf-8")
    except UnicodeEncodeError:
        raise flags.ValidationError(
            "it holds bytes that are not UTF-8, and TensorFlow takes file names as UTF-8 text: use a UTF-8 name"
        ) from None
    return True


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
