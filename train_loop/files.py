"""Files of ours, read and written safely: the one helper that writes through a temporary name
and renames (a kill leaves the old file or the new one, never half of one), and the reading of
files a user can point elsewhere, which must be regular files.

A FIFO at such a path blocks an open or a read until a writer comes, which may be never, and a
device such as /dev/zero never ends: read as a cache, it fills memory until the out-of-memory
killer ends the run. Renamed over, a device node would be replaced (root may write in /dev). So
these are opened without blocking, checked on the open descriptor, read up to a bound, and a
cache is never replaced unless it is a regular file.

A leaf below every layer (the data layer's IDX cache uses it as the outputs do): it imports
nothing of ours but `errors`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
from collections.abc import Callable
from typing import Any, BinaryIO

from train_loop.errors import NoSpace

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def open_regular(path: str) -> BinaryIO:
    """`path` (links followed) opened for reading in binary, if it is a regular file.

    The open does not block (a FIFO's waits for a writer), and the check is made on the opened
    descriptor, so nothing swapped in between the check and the read can slip through.

    Raises:
      OSError: the file cannot be opened, or is not a regular file (the error says what it is).
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a file")
            raise OSError(errno.EINVAL, f"{kind}, not a regular file", path)
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def read_regular(path: str, *, limit: int) -> bytes:
    """The bytes of the regular file `path`, which must hold at most `limit` of them.

    Raises:
      OSError: the file cannot be read, is not a regular file, or is larger than `limit`.
    """
    with open_regular(path) as stream:
        content = stream.read(limit + 1)
    if len(content) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit:,} bytes", path)
    return content


def write_atomically(path: str, write: Callable[[str], None], *, temporary: str = "") -> None:
    """Calls `write` on a temporary name beside `path`, then renames it over `path`: a kill leaves
    the old file (or folder) or the new one. Whatever stops the write (a full disk, Ctrl-C)
    removes the temporary.

    The temporary name is `path`'s with `.tmp` before its extension (Keras insists on the
    extension), unless `temporary` names another (event files must not look like event files
    while they are written). A folder replaces a folder (the `saved_model/` export).

    Raises:
      NoSpace: the disk is full.
    """
    root, extension = os.path.splitext(path)
    temporary = temporary or f"{root}.tmp{extension}"
    try:
        write(temporary)
        if os.path.isdir(temporary):
            shutil.rmtree(path, ignore_errors=True)  # A killed process's, before its result.json.
        os.replace(temporary, path)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise NoSpace(path) from None
    finally:
        _remove(temporary)


def write_json(path: str, content: dict[str, Any]) -> None:
    """Writes `content` as indented JSON through `write_atomically`, synced to the disk."""

    def write(temporary: str) -> None:
        with open(temporary, "w") as stream:
            json.dump(content, stream, indent=2)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())

    write_atomically(path, write)


def replace_quietly(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Writes a cache file through `write_atomically`: `write` fills a new file beside `path`.

    For a cache, which must never fail a run: nothing is written when `path` is there but is not
    a regular file (a FIFO, a device, a folder), and a failed write leaves `path` as it was. The
    new file is created exclusively, so no link or FIFO left at its name is followed.
    """
    if os.path.lexists(path) and not os.path.isfile(path):
        return

    def exclusive(temporary: str) -> None:
        with open(temporary, "xb") as stream:
            write(stream)

    with contextlib.suppress(OSError, NoSpace):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_atomically(path, exclusive, temporary=f"{path}.{os.getpid()}.tmp")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
