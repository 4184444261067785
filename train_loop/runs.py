"""The run folder: its name, whether it resumes or starts anew, its settings and `result.json`."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from typing import Any

from train_loop.configs import Config
from train_loop.errors import UsageError

RESULT_FILE = "result.json"
SETTINGS_FILE = "settings.json"


def choose_run_dir(config: Config) -> str:
    """`<logdir>/<run_name>`, or `-2`, `-3`, ... past runs that finished (never overwritten).

    An unfinished folder is returned as it is, to be resumed, once its saved settings are
    checked against `config`.

    Raises:
      UsageError: the logdir cannot be written, or the unfinished run has other settings.
    """
    _check_writable(config.logdir)
    base = os.path.join(config.logdir, config.run_name or config.default_run_name)
    run_dir, number = base, 1
    while os.path.exists(os.path.join(run_dir, RESULT_FILE)):
        number += 1
        run_dir = f"{base}-{number}"
    check_same_settings(run_dir, config)
    return run_dir


def _check_writable(logdir: str) -> None:
    """Probes the nearest existing folder on the way to `logdir` with a folder made and removed
    at once: permission bits alone miss read-only mounts, /proc, and root's own limits."""
    existing = os.path.abspath(logdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        tempfile.TemporaryDirectory(dir=existing, prefix=".train_loop-probe-").cleanup()
    except OSError as error:
        raise UsageError(
            f"--logdir={logdir!r} cannot be written ({existing}: {error.strerror or error}): "
            "pick another --logdir.") from None


def check_same_settings(run_dir: str, config: Config,
                        fix: str = "pass a new --run_name, or the same settings to resume it") -> None:
    """Raises UsageError, ending with `fix`, if `run_dir` holds a run with other naming settings."""
    saved = read_settings(run_dir)
    if saved is None:
        return
    differ = [f"{name} (run has {saved.get(name)!r}, flags say {value!r})"
              for name, value in config.naming_settings().items() if saved.get(name) != value]
    if differ:
        raise UsageError(
            f"{run_dir} holds a run with other settings: {'; '.join(differ)}; {fix}.")


def create(run_dir: str, config: Config, decided: dict[str, Any] | None = None) -> None:
    """Makes the folder and records the settings that a resumption must match, with what was
    decided on this machine (`decided`, e.g. XLA or not), which a resumption reuses."""
    os.makedirs(run_dir, exist_ok=True)
    if not os.path.exists(os.path.join(run_dir, SETTINGS_FILE)):
        write_json(os.path.join(run_dir, SETTINGS_FILE), {**config.to_dict(), "decided": decided or {}})


def write_json(path: str, content: dict[str, Any]) -> None:
    """Writes to a temporary name, then renames: a kill leaves the old file or the new one."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as stream:
        json.dump(content, stream, indent=2)
        stream.write("\n")
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def read_result(run_dir: str) -> dict[str, Any]:
    return _read_json(os.path.join(run_dir, RESULT_FILE))


def read_settings(run_dir: str) -> dict[str, Any] | None:
    """The settings the run in `run_dir` started with, or None when there is no run there."""
    path = os.path.join(run_dir, SETTINGS_FILE)
    return _read_json(path) if os.path.exists(path) else None


def _read_json(path: str) -> dict[str, Any]:
    with open(path) as stream:
        return json.load(stream)
