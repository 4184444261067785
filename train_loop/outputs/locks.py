"""Who owns a folder: an advisory `fcntl.flock` on a lock file inside it, which dies with its process.

A marker file would outlive a killed process and need guessing whether it is stale; the kernel
drops a flock the moment its holder exits, however it exits. flock works on local file
systems and, on Linux, on NFS (emulated with POSIX locks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os

LOCK_FILE = ".lock"


@dataclasses.dataclass(frozen=True)
class Lock:
    path: str
    descriptor: int

    def release(self) -> None:
        """Removes the file before letting go, so that no process can win a lock on a file that is
        no longer there (`acquire` checks for that)."""
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.descriptor)


def acquire(folder: str) -> Lock | None:
    """Locks the existing `folder` for this process and records its PID there; None when another
    process holds it.

    Raises:
      OSError: the lock file cannot be made.
    """
    path = os.path.join(folder, LOCK_FILE)
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return None
        if _still_there(descriptor, path):
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
            return Lock(path, descriptor)
        os.close(descriptor)  # Its holder released it and removed it meanwhile: try the new one.


def is_held(folder: str) -> bool:
    """Whether a process holds `folder`'s lock now (a free one is left as it was found); a folder
    that cannot be locked (another user's) counts as held, to be left alone."""
    try:
        lock = acquire(folder) if os.path.isdir(folder) else None
    except OSError:
        return True
    if lock is None:
        return os.path.isdir(folder)
    lock.release()
    return False


def owner(folder: str) -> str:
    """`process <PID>` of the lock's holder, as it recorded itself, for messages."""
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(folder, LOCK_FILE)) as stream:
            return f"process {int(stream.read())}"
    return "another process"  # It has the lock but has not written its PID yet.


def _still_there(descriptor: int, path: str) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(descriptor)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)
