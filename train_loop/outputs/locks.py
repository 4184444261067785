"""Who owns a folder: an advisory `fcntl.flock` on the folder itself, which dies with its process.

A marker file would outlive a killed process and need guessing whether it is stale; the kernel
drops a flock the moment its holder exits, however it exits. The flock is taken on a descriptor
of the folder (opened read-only, as a directory) rather than on a file inside it, since a file
can be deleted under its holder, and a second process would then lock a new one and train the
same folder at the same time; nothing done to the folder's entries undoes a lock on the folder.

`.lock` is flocked too, for two reasons: it records the holder's PID for messages, and Linux's
NFS client keeps a flock on a folder to its own machine (it forwards flocks on files alone to
the server, as POSIX locks), so only `.lock` keeps two machines sharing a run over NFS apart. It
is opened without following links (a symlink's target is never written) and only as a regular
file. With the folder locked, a `.lock` that cannot be used (a symlink, a folder, another user's
file) is left as it is: the run goes on, unrecorded. A file system that refuses flock on a
folder falls back on `.lock` alone, the lock train_loop took before the folder's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import stat

LOCK_FILE = ".lock"
_LOCKS_TABLE = "/proc/locks"  # Linux's list of the locks held, with their holders' PIDs.


@dataclasses.dataclass(frozen=True)
class Lock:
    path: str  # The folder's `.lock`.
    folder: int | None  # The folder's descriptor; None where folders cannot be locked.
    file: int | None = None  # `.lock`'s; None when it could not be used.

    def release(self) -> None:
        """Removes `.lock`, if it is still the one locked here, before letting go: no process can
        then win a lock on a file that is no longer there (`acquire` checks for that)."""
        if self.file is not None:
            if _still_there(self.file, self.path):
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            os.close(self.file)
        if self.folder is not None:  # Last: while it is held, no other process touches `.lock`.
            os.close(self.folder)


def acquire(folder: str) -> Lock | None:
    """Locks the existing `folder` for this process and records its PID there; None when another
    process holds it.

    Raises:
      OSError: the folder cannot be opened, or cannot be locked at all.
    """
    while True:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return None
        except OSError:  # This file system does not lock folders: `.lock` alone is the lock.
            os.close(descriptor)
            return _lock_file(folder, None)
        if not _still_there(descriptor, folder, follow_symlinks=True):
            os.close(descriptor)  # Its holder removed it meanwhile (an empty run folder): try again.
            continue
        try:
            lock = _lock_file(folder, descriptor)
        except BaseException:
            os.close(descriptor)
            raise
        if lock is None:
            os.close(descriptor)
        return lock


def _lock_file(folder: str, folder_descriptor: int | None) -> Lock | None:
    """Adds to the folder's lock (`folder_descriptor`, or None when it has none) `.lock`'s, with
    this process's PID written into it; None when another process holds it. With the folder
    locked, a `.lock` that cannot be opened as a regular file is left out.

    Raises:
      OSError: the folder has no lock and `.lock` cannot be opened as a regular file.
    """
    path = os.path.join(folder, LOCK_FILE)
    while True:
        try:
            descriptor = _open_regular(path)
        except OSError:
            if folder_descriptor is None:
                raise
            return Lock(path, folder_descriptor)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _still_there(descriptor, path):
                os.ftruncate(descriptor, 0)
                os.write(descriptor, f"{os.getpid()}\n".encode())
                return Lock(path, folder_descriptor, descriptor)
        except BlockingIOError:  # Held on another machine (NFS), or, without a folder lock, anywhere.
            os.close(descriptor)
            return None
        except BaseException:
            os.close(descriptor)
            raise
        os.close(descriptor)  # Its holder released it and removed it meanwhile: try the new one.


def _open_regular(path: str) -> int:
    """`path` opened for reading and writing, made if missing; never through a link, nor a FIFO
    or a device (which could block, or hold something else).

    Raises:
      OSError: it is a symlink, a folder or anything but a regular file, or cannot be opened.
    """
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OSError(errno.EINVAL, f"{LOCK_FILE} is not a regular file", path)
    return descriptor


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
    """`process <PID>` of the lock's holder, for messages: as it recorded itself in `.lock`, or, when
    that record is gone or unreadable, as the kernel lists the holder of the folder's flock."""
    with contextlib.suppress(OSError, ValueError):
        descriptor = os.open(os.path.join(folder, LOCK_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            return f"process {int(os.read(descriptor, 32))}"
        finally:
            os.close(descriptor)
    holder = _kernel_holder(folder)
    return f"process {holder}" if holder else "another process"  # It may not have written its PID yet.


def _kernel_holder(folder: str) -> int | None:
    """The PID /proc/locks gives the holder of `folder`'s flock; None off Linux, or when it is gone."""
    try:
        info = os.stat(folder)
        with open(_LOCKS_TABLE, encoding="ascii") as stream:
            table = stream.read()
    except OSError:
        return None
    # Each lock is `<id>: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> <start> <end>`;
    # a process waiting for it has `->` after the id.
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for fields in map(str.split, table.splitlines()):
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
            return int(fields[4])
    return None


def _still_there(descriptor: int, path: str, *, follow_symlinks: bool = False) -> bool:
    """Whether `path` still names the file or folder `descriptor` holds."""
    try:
        on_disk = os.stat(path, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        return False
    held = os.fstat(descriptor)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)
