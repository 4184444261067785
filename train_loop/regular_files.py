"""Small files of ours at paths a user can name (caches, a run's JSON): regular files only.

A FIFO at such a path blocks an open or a read until a writer comes, which may be never, and a
device such as /dev/zero never ends: read as a cache, it fills memory until the out-of-memory
killer ends the run. Renamed over, a device node would be replaced (root may write in /dev). So
these are opened without blocking, checked on the open descriptor, read up to a bound, and
never replaced unless they are regular files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from typing import BinaryIO

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


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


def replace_quietly(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Writes a cache file: `write` fills a new file beside `path`, which then replaces it.

    For a cache, which must never fail a run: nothing is written when `path` is there but is not
    a regular file (a FIFO, a device, a folder), and any OSError leaves `path` as it was. The new
    file is created exclusively, so no link or FIFO left at its name is followed.
    """
    if os.path.lexists(path) and not os.path.isfile(path):
        return
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        stream = open(temporary, "xb")  # Closed below, before the rename.
    except OSError:
        return
    try:
        with stream:
            write(stream)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(temporary)
