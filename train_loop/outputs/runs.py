"""The run folder: its name, whether it resumes or starts anew, its settings and `result.json`."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from train_loop import files
from train_loop.configs import Config
from train_loop.errors import UsageError
from train_loop.outputs import locks
from train_loop.outputs.metrics_file import METRICS_FILE

RESULT_FILE = "result.json"
SETTINGS_FILE = "settings.json"
SOURCE_KEY = "source_fingerprint"  # In settings.json: a streamed source's fingerprint (`check_same_source`).
CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.keras"
BEST_DIR = "best"
EXPORT_DIR = "saved_model"
EVENT_DIRS = ("train", "validation", "test")  # The splits' TensorBoard writers (see `summaries`).
# What a resumed run writes again, each of its kind: one of another kind, or a folder that cannot be
# written, would fail the run only when it gets there (the export, after the whole training).
_OWN_FOLDERS = (CHECKPOINTS_DIR, BEST_DIR, EXPORT_DIR, *EVENT_DIRS)
_OWN_FILES = (METRICS_FILE, MODEL_FILE, os.path.join(BEST_DIR, MODEL_FILE))
_JSON_BYTES = 16 << 20  # settings.json and result.json hold a few KB (a confusion matrix of many classes, more).


def choose_run_dir(config: Config) -> str:
    """`<logdir>/<run_name>`, or `-2`, `-3`, ... past runs that finished (never overwritten).

    An unfinished folder is returned as it is, to be resumed, once its saved settings are
    checked against `config`. Nothing is written: `owned` then claims the folder.

    Raises:
      UsageError: the logdir or run folder cannot be written, the name is too long, or the
        unfinished run is damaged or has other settings.
    """
    _check_writable(config.logdir, f"--logdir={config.logdir!r}", "pick another --logdir")
    run_dir = next(path for path in _candidates(config) if not is_finished(path))
    check_run_dir(run_dir, config)
    return run_dir


@contextlib.contextmanager
def owned(config: Config, run_dir: str, *, chief: bool) -> Iterator[str]:
    """The run folder this process writes, locked for as long as it trains (see `locks`): the
    chosen `run_dir`, or the next free one if it changed meanwhile.

    A folder another process holds is refused, unless the run name was chosen by default: then
    the next free `-N` is taken, as for a finished run. A worker that is not the chief takes no
    lock and writes nothing into the folder but its streamed data's position (`positions`). A
    folder made here and left empty is removed, and so is one made here for a run that bad input
    ended (a `UsageError` met while training, such as a streamed example that changed shape): bad
    input leaves nothing written.

    Raises:
      UsageError: the run folder is held by another process, or became unfit meanwhile.
    """
    if not chief:
        yield run_dir
        return
    for run_dir in _candidates(config):
        existing = _nearest_existing(run_dir)
        lock = _lock(run_dir) if not is_finished(run_dir) else None
        if lock is None:
            if os.path.lexists(run_dir) and not is_finished(run_dir) and config.run_name:
                raise UsageError(
                    f"{run_dir} is in use by {locks.owner(run_dir)}: wait for it to end, "
                    "or pass another --run_name (--study_name for a study)."
                )
            continue
        try:
            if is_finished(run_dir):
                continue  # Another process finished it while this one looked.
            check_run_dir(run_dir, config)
            yield run_dir
            return
        except UsageError:
            if existing != os.path.abspath(run_dir):  # Made here: what is in it, this run wrote.
                _remove_outputs(run_dir)
            raise
        finally:
            lock.release()
            _remove_empty_folders(run_dir, up_to=existing)


def _remove_outputs(run_dir: str) -> None:
    """Removes what a run wrote into `run_dir`, all but the lock it still holds (the folder itself
    goes with the empty ones once that is released)."""
    for entry in os.scandir(run_dir):
        if entry.name == locks.LOCK_FILE:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def _remove_empty_folders(path: str, *, up_to: str) -> None:
    """Removes `path` and its parents below `up_to` that are empty: the folders made for a run
    that failed before writing anything (the logdir too, if it was made for it)."""
    path = os.path.abspath(path)
    with contextlib.suppress(OSError):  # Not empty: the run wrote something, so it stays.
        while path != up_to and path.startswith(up_to):
            os.rmdir(path)
            path = os.path.dirname(path)


def is_finished(run_dir: str) -> bool:
    return os.path.lexists(os.path.join(run_dir, RESULT_FILE))


def _candidates(config: Config) -> Iterator[str]:
    """`<logdir>/<run_name>`, then with `-2`, `-3`, ...; each name checked against the file system's
    limit, which a long name can pass alone and fail with its suffix."""
    name = config.run_name or config.default_run_name
    limit = _name_limit(config.logdir)
    for number in itertools.count(1):
        candidate = name if number == 1 else f"{name}-{number}"
        if len(os.fsencode(candidate)) > limit:
            raise UsageError(
                f"run folder name {candidate!r} is {len(os.fsencode(candidate))} bytes, more than the "
                f"{limit} the file system under --logdir allows: pass a shorter --run_name."
            )
        yield os.path.join(config.logdir, candidate)


def _name_limit(logdir: str) -> int:
    try:
        return os.pathconf(_nearest_existing(logdir), "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255  # Linux's NAME_MAX, which nearly every file system shares.


def _lock(run_dir: str) -> locks.Lock | None:
    try:
        os.makedirs(run_dir, exist_ok=True)
        return locks.acquire(run_dir)
    except OSError as error:
        raise UsageError(f"cannot write {run_dir} ({error.strerror}): pick another --logdir or --run_name.") from None


def check_run_dir(run_dir: str, config: Config) -> None:
    """Raises UsageError if `run_dir` cannot hold this run: a file in its place, one of the run's own
    outputs of the wrong kind (a folder where it writes a file, or the reverse) or that cannot be
    written, damaged or missing settings beside checkpoints (whose run could not be told apart from
    another), or other settings."""
    if not os.path.lexists(run_dir):
        return
    for path in (run_dir, *(os.path.join(run_dir, name) for name in _OWN_FOLDERS)):
        if os.path.lexists(path) and not os.path.isdir(path):
            raise UsageError(f"{path} is a file, not a folder: move it away, or pass another --run_name.")
    for path in (os.path.join(run_dir, name) for name in _OWN_FILES):
        if os.path.lexists(path) and not os.path.isfile(path):
            kind = "a folder, not a file" if os.path.isdir(path) else "not a regular file"
            raise UsageError(f"{path} is {kind}: move it away, or pass another --run_name.")
    if not os.path.lexists(os.path.join(run_dir, SETTINGS_FILE)) and _has_checkpoints(run_dir):
        raise UsageError(
            f"{run_dir} holds checkpoints but no {SETTINGS_FILE}, so its settings are unknown; nothing "
            "was changed: pass a new --run_name."
        )
    check_same_settings(run_dir, config)
    _check_writable(run_dir, run_dir, "pass another --run_name")
    _check_own_outputs_writable(run_dir)


def _check_own_outputs_writable(run_dir: str) -> None:
    """The run's folders take new files, and `metrics.jsonl` takes lines (appended in place, while
    the other files are replaced through a new name in their folder)."""
    for name in _OWN_FOLDERS:
        if os.path.isdir(path := os.path.join(run_dir, name)):
            _check_writable(path, f"the run's {name}/ folder", "make it writable, or pass another --run_name")
    metrics = os.path.join(run_dir, METRICS_FILE)
    try:
        if os.path.isfile(metrics):
            open(metrics, "ab").close()  # Opened to append nothing: the file is left as it was.
    except OSError as error:
        raise UsageError(
            f"{metrics} cannot be written ({error.strerror}): make it writable, or pass another --run_name."
        ) from None


def _has_checkpoints(run_dir: str) -> bool:
    try:
        return bool(os.listdir(os.path.join(run_dir, CHECKPOINTS_DIR)))
    except FileNotFoundError:
        return False
    except OSError:
        return True  # Unreadable, so it may hold some.


def _nearest_existing(path: str) -> str:
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return existing


def _check_writable(path: str, what: str, fix: str) -> None:
    """Probes `path`, or the nearest existing folder on the way to it, with a folder made and
    removed at once: permission bits alone miss read-only mounts, /proc, and root's own limits."""
    existing = _nearest_existing(path)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        tempfile.TemporaryDirectory(dir=existing, prefix=".train_loop-probe-").cleanup()
    except OSError as error:
        raise UsageError(f"{what} cannot be written ({existing}: {error.strerror or error}): {fix}.") from None


def check_same_settings(
    run_dir: str, config: Config, fix: str = "pass a new --run_name, or the same settings to resume it"
) -> None:
    """Raises UsageError, ending with `fix`, if `run_dir` holds a run with other naming settings.

    A setting that a run's `settings.json` lacks (written before the setting existed) had its default."""
    saved = read_settings(run_dir)
    if saved is None:
        return
    # A setting added since the run was written is missing from its settings: it ran with its default.
    defaults = {field.name: field.default for field in dataclasses.fields(config)}
    differ = [
        f"{name} (run has {saved.get(name, defaults[name])!r}, flags say {value!r})"
        for name, value in config.naming_settings().items()
        if saved.get(name, defaults[name]) != value
    ]
    if differ:
        raise UsageError(f"{run_dir} holds a run with other settings: {'; '.join(differ)}; {fix}.")


def create(run_dir: str, config: Config, decided: dict[str, Any] | None = None, *, source: str = "") -> None:
    """Makes the folder and records the settings that a resumption must match, with what was
    decided on this machine (`decided`, e.g. XLA or not), which a resumption reuses, and the
    fingerprint of a streamed `source` (see `check_same_source`)."""
    os.makedirs(run_dir, exist_ok=True)
    if not os.path.exists(os.path.join(run_dir, SETTINGS_FILE)):
        recorded = {**config.to_dict(), "decided": decided or {}, **({SOURCE_KEY: source} if source else {})}
        files.write_json(os.path.join(run_dir, SETTINGS_FILE), recorded)


def record_check(run_dir: str, config: Config, decided: dict[str, Any], name: str, *, source: str = "") -> None:
    """settings.json with the verdict `decided[name]` of a check run before training: made as
    `create` makes it when the run has none yet; else that verdict alone replaced (the newest
    check's over an earlier one's), what else was decided (XLA) left as it was recorded.

    A failed check's verdict is then the one file in its run folder, and no result.json, which
    would mark the run finished: the same command takes the folder and starts the run."""
    create(run_dir, config, decided, source=source)
    settings = read_settings(run_dir)
    recorded = {**settings, "decided": {**settings.get("decided", {}), name: decided[name]}}
    files.write_json(os.path.join(run_dir, SETTINGS_FILE), recorded)


def check_same_source(run_dir: str, source: str, described: str) -> None:
    """Raises UsageError if `run_dir` holds a run of a streamed source whose fingerprint (its
    function, its files' names, sizes and modification times) differs from `source`'s;
    `described` names the source."""
    saved = read_settings(run_dir)
    if saved is not None and saved.get(SOURCE_KEY, "") != source:
        raise UsageError(
            f"{run_dir} holds a run of {described} as it was (fingerprint {saved.get(SOURCE_KEY)!r}, now "
            f"{source!r}): its function or files changed since; pass a new --run_name, or restore them to resume it."
        )


def read_result(run_dir: str) -> dict[str, Any]:
    """The run's `result.json`.

    Raises:
      UsageError: it is missing, empty or damaged.
    """
    result = _read_json(os.path.join(run_dir, RESULT_FILE), "move the run away, or delete the file to train it again")
    if not isinstance(result.get("train"), dict) or not isinstance(result.get("test"), dict):
        raise UsageError(
            f"{os.path.join(run_dir, RESULT_FILE)} is damaged (no train and test results): "
            "move the run away, or delete the file to train it again."
        )
    return result


def read_settings(run_dir: str) -> dict[str, Any] | None:
    """The settings the run in `run_dir` started with, or None when there is no run there.

    Raises:
      UsageError: `settings.json` exists but cannot be read as a JSON object.
    """
    path = os.path.join(run_dir, SETTINGS_FILE)
    if not os.path.lexists(path):
        return None
    return _read_json(path, "nothing was changed: pass a new --run_name")


def _read_json(path: str, fix: str) -> dict[str, Any]:
    """A JSON object from `path`; anything else, or an unreadable file, is one line ending in `fix`.

    Read as a regular file of at most `_JSON_BYTES`: a FIFO in its place would block the run, a
    device fill its memory (see `files`).
    """
    try:
        content = json.loads(files.read_regular(path, limit=_JSON_BYTES).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise UsageError(f"cannot read {path} ({reason}): {fix}.") from None
    if not isinstance(content, dict):
        raise UsageError(f"{path} holds a JSON {type(content).__name__}, not an object: {fix}.")
    return content
