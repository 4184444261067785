"""Restore-or-initialize and save, through `tf.train.CheckpointManager`.

Restoring never trusts the `checkpoint` index file alone: a kill, a full disk or a bad copy can
leave it missing, garbled or naming deleted files, and the newest checkpoint can be damaged.
The `ckpt-<step>.index` files on disk are the record; the newest one that restores is used,
and when none does the run is refused with nothing touched, since starting over would throw
the interrupted run's history away.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

import tensorflow as tf

from train_loop.errors import NoSpace, UsageError
from train_loop.outputs import locks, runs
from train_loop.outputs.stderr import quiet_stderr, warn

MAX_TO_KEEP = 3
INDEX_FILE = "checkpoint"
_SAVED = re.compile(r"ckpt-(\d+)\.index")
_TEMPORARY = re.compile(r"ckpt-\d+_temp")  # What a save writes before renaming (see functional_saver).
# What a damaged or foreign checkpoint raises while it restores: TensorFlow's read and checksum
# errors, Python's when a file is cut short, and the checks that every variable found its value.
RESTORE_ERRORS = (tf.errors.OpError, ValueError, AssertionError, IndexError)
_REASON_CHARACTERS = 200  # A mismatch lists every unmatched variable; the start says enough.
# The epoch's sums as one vector: how a checkpoint written before the measurements had names is told.
_POSITIONAL_KEY = "epoch_sums/.ATTRIBUTES/VARIABLE_VALUE"


def directory(run_dir: str) -> str:
    return os.path.join(run_dir, runs.CHECKPOINTS_DIR)


@contextlib.contextmanager
def save_directory(run_dir: str, chief: bool) -> Iterator[str]:
    """Where this process saves checkpoints: the run's folder on the chief (the owner of the run,
    see `runs.owned`), cleared of the temporaries a kill during a save left.

    Elsewhere a temporary folder, removed at the end (saving is collective, so every worker
    saves). Its name carries the run's, and it is locked while its worker lives, so that the
    folders of this run's killed workers can be told apart and removed at the next start.
    """
    if chief:
        remove_temporaries(directory(run_dir))
        yield directory(run_dir)
        return
    prefix = worker_folder_prefix(run_dir)
    for stale in glob.glob(os.path.join(tempfile.gettempdir(), f"{prefix}*")):
        if not locks.is_held(stale):
            shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        lock = locks.acquire(folder)
        try:
            yield folder
        finally:
            lock.release()


class Manager(tf.train.CheckpointManager):
    """The run's checkpoint manager, with the manager of this worker's data position (`beside`,
    see `positions`) when it has one, which `save` writes first."""

    def __init__(
        self, checkpoint: tf.train.Checkpoint, directory: str, *, beside: tf.train.CheckpointManager | None = None
    ):
        super().__init__(checkpoint, directory, max_to_keep=MAX_TO_KEEP)
        self.beside = beside


def make_manager(
    checkpoint: tf.train.Checkpoint, checkpoint_dir: str, *, beside: tf.train.CheckpointManager | None = None
) -> Manager:
    """A manager saving `checkpoint` (model, optimizer, counters) into `checkpoint_dir`, and this
    worker's data position with `beside`; made after `restore_latest`, which may have rewritten
    the index the manager reads."""
    return Manager(checkpoint, checkpoint_dir, beside=beside)


def restore_latest(
    checkpoint: tf.train.Checkpoint,
    checkpoint_dir: str,
    *,
    repair: bool,
    positional: tf.train.Checkpoint | None = None,
    steps: set[int] | None = None,
) -> bool:
    """Restores the newest checkpoint in `checkpoint_dir` that restores; says whether there was one.

    A checkpoint written before the measurements had names is restored into `positional`, the
    same objects under the names it used (`TrainState.positional_trackables`). With `steps`, only
    a checkpoint of one of them is restored: the steps at which every worker saved its data
    position (`positions`).

    `checkpoint_dir` is the run's: a worker that saves its copies elsewhere restores the chief's.
    When the index file was unreadable or the newest checkpoint damaged, one line says which
    checkpoint was used instead; with `repair` (the process that owns the run), the index is
    then rewritten to match, so that the manager rotates the right files.

    Raises:
      UsageError: the folder holds checkpoints (or their index) but none restores.
    """
    saved = saved_checkpoints(checkpoint_dir)
    if not saved:
        if _holds_anything(checkpoint_dir):
            raise _none_restores(checkpoint_dir, "no ckpt-<step>.index file beside its other files")
        return False
    failures = []
    for prefix in saved:
        if steps is not None and int(prefix.rpartition("-")[2]) not in steps:
            failures.append(f"{os.path.basename(prefix)}: not every worker's data position was saved with it")
            continue
        failure = _restore(checkpoint, prefix, positional=positional)
        if failure:
            failures.append(f"{os.path.basename(prefix)}: {failure}")
            continue
        indexed = _indexed_latest(checkpoint_dir)
        if failures or indexed != prefix:
            trouble = "; ".join(failures) or _index_trouble(indexed)
            warn(f"{checkpoint_dir}: {trouble}; resuming from {os.path.basename(prefix)}.")
            if repair:
                _rewrite_index(checkpoint_dir, saved[saved.index(prefix) :])
        return True
    raise _none_restores(checkpoint_dir, "; ".join(failures))


def restore(checkpoint: tf.train.Checkpoint, prefix: str) -> str:
    """Restores the checkpoint `prefix` into `checkpoint`; returns why it failed, or "" when it did not."""
    return _restore(checkpoint, prefix, positional=None)


def _restore(checkpoint: tf.train.Checkpoint, prefix: str, *, positional: tf.train.Checkpoint | None) -> str:
    """Restores `prefix` into `checkpoint` (or `positional`, if it was written with those names);
    returns why it failed, or "" when it did not."""
    try:
        # A damaged file makes TensorFlow's kernels log it too; the reason goes in our line instead.
        with quiet_stderr():
            if positional is not None and _POSITIONAL_KEY in dict(tf.train.list_variables(prefix)):
                checkpoint = positional
            checkpoint.restore(prefix).assert_existing_objects_matched()
    except RESTORE_ERRORS as error:
        # The failed attempt's values stay pending on the model and optimizer, which list them
        # when they are deleted (at exit, after the one line that says the same).
        logging.getLogger("tensorflow").addFilter(_unrestored_values)
        return _reason(error)
    return ""


def _unrestored_values(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return "with unrestored values" not in message and "could not be found in the restored object" not in message


def saved_checkpoints(checkpoint_dir: str) -> list[str]:
    """The checkpoint prefixes on disk, newest (highest step) first.

    Raises:
      UsageError: the folder exists but cannot be listed (or is a file).
    """
    if not os.path.lexists(checkpoint_dir):
        return []
    try:
        names = os.listdir(checkpoint_dir)
    except OSError as error:
        raise UsageError(
            f"cannot read {checkpoint_dir} ({error.strerror}); nothing was changed: fix it, or pass "
            "a new --run_name to start over."
        ) from None
    steps = sorted((int(match[1]) for match in map(_SAVED.fullmatch, names) if match), reverse=True)
    return [os.path.join(checkpoint_dir, f"ckpt-{step}") for step in steps]


def worker_folder_prefix(run_dir: str) -> str:
    """The start of the temporary folder names of this run's non-chief workers."""
    return f"train_loop-worker-{hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:12]}-"


def remove_temporaries(checkpoint_dir: str) -> None:
    """Removes the `ckpt-<step>_temp` folders a kill during a save left behind; call it only in the
    process that owns the run, before it saves."""
    with contextlib.suppress(OSError):
        for name in os.listdir(checkpoint_dir):
            if _TEMPORARY.fullmatch(name):
                shutil.rmtree(os.path.join(checkpoint_dir, name), ignore_errors=True)


def save(manager: tf.train.CheckpointManager, step: int) -> str:
    """Saves under the global step's number, so file names say where training stood; a step
    already saved (a stop requested right after a periodic checkpoint) is not written twice.
    This worker's data position (a `Manager`'s `beside`) is written first: a kill between the two
    leaves a position without weights, which a resume skips (`positions`).

    Raises:
      NoSpace: the disk is full; the half-written checkpoint is removed first.
    """
    latest = manager.latest_checkpoint
    if latest is not None and latest.endswith(f"-{step}"):
        return latest
    # A failed write is logged by TensorFlow's kernels too; the one line comes from `_no_space`.
    with (
        no_space_left(manager.directory, temporary=os.path.join(manager.directory, f"ckpt-{step}_temp")),
        quiet_stderr(),
    ):
        beside = getattr(manager, "beside", None)
        if beside is not None:
            beside.save(checkpoint_number=step)
        return manager.save(checkpoint_number=step)


@contextlib.contextmanager
def no_space_left(path: str, *, temporary: str = "") -> Iterator[None]:
    """Turns a full disk met by TensorFlow's file system (checkpoints, event files) into `NoSpace`
    naming `path`, after removing the `temporary` folder being written, if any. TensorFlow
    reports it as an OpError carrying ENOSPC's message."""
    try:
        yield
    except tf.errors.OpError as error:
        if os.strerror(errno.ENOSPC) not in str(error):
            raise
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
        raise NoSpace(path) from None


def _holds_anything(checkpoint_dir: str) -> bool:
    """Whether the folder holds an index or checkpoint files (litter and nothing else is no history)."""
    with contextlib.suppress(OSError):
        return any(not _TEMPORARY.fullmatch(name) for name in os.listdir(checkpoint_dir))
    return False


def _indexed_latest(checkpoint_dir: str) -> str | None:
    """The newest checkpoint the index file names, read without TensorFlow's complaints about a
    garbled one; None when it is missing or unreadable."""
    try:
        with open(os.path.join(checkpoint_dir, INDEX_FILE), encoding="utf-8") as stream:
            found = re.search(r'^model_checkpoint_path: "([^"]+)"$', stream.read(), re.MULTILINE)
    except (OSError, UnicodeDecodeError):
        return None
    return os.path.join(checkpoint_dir, found[1]) if found else None


def _index_trouble(indexed: str | None) -> str:
    if indexed is None:
        return f"its {INDEX_FILE} file is missing or unreadable"
    return f"its {INDEX_FILE} file names {os.path.basename(indexed)}, which is not there"


def _rewrite_index(checkpoint_dir: str, prefixes: list[str]) -> None:
    """The index naming `prefixes` (newest first) with their files' times, as the manager wrote it."""
    oldest_first = prefixes[::-1]
    times = [os.path.getmtime(f"{prefix}.index") for prefix in oldest_first]
    # TensorFlow's one writer of the index is deprecated in favour of the manager, which cannot
    # be told about checkpoints it did not write; its deprecation warning is not the user's.
    with _tensorflow_warnings_off():
        tf.compat.v1.train.update_checkpoint_state(
            checkpoint_dir,
            os.path.basename(prefixes[0]),
            [os.path.basename(path) for path in oldest_first],
            all_model_checkpoint_timestamps=times,
            last_preserved_timestamp=min(times) - 1.0,
        )


@contextlib.contextmanager
def _tensorflow_warnings_off() -> Iterator[None]:
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tf_logger.setLevel(level)


def _reason(error: BaseException) -> str:
    """The first line of a restore error; a mismatch with the model is named as such."""
    # TensorFlow prefixes the op that failed ("{{function_node __wrapped__RestoreV2...}}"): noise here.
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", str(error)).strip()
    first_line = (text.splitlines() or [type(error).__name__])[0][:_REASON_CHARACTERS]
    if isinstance(error, (AssertionError, ValueError)):
        return f"its variables do not match the model ({first_line})"
    return f"damaged ({first_line})"


def _none_restores(checkpoint_dir: str, reasons: str) -> UsageError:
    return UsageError(
        f"no checkpoint in {checkpoint_dir} restores ({reasons}); nothing was changed: pass a new "
        "--run_name to start over."
    )
