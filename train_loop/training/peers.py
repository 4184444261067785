"""Waiting for the other workers of a multi-worker run, bounded in time and stopped by a signal."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator

from train_loop.errors import Interrupted, UsageError

PEER_TIMEOUT_ENV = "TRAIN_LOOP_PEER_TIMEOUT"
_PEER_TIMEOUT_SECONDS = 120
_PEER_POLL_SECONDS = 0.5
_BACKLOG = 64  # Peers' probes wait in the backlog; nothing accepts them.


def peer_timeout() -> float:
    """Seconds to wait for the other workers: `TRAIN_LOOP_PEER_TIMEOUT`, default 120.

    Raises:
      UsageError: the variable is not a positive number.
    """
    text = os.environ.get(PEER_TIMEOUT_ENV, "") or str(_PEER_TIMEOUT_SECONDS)
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise UsageError(f"{PEER_TIMEOUT_ENV}={text!r} must be a positive number of seconds, e.g. 120.")
    return seconds


def wait_for_peers(tf_config: dict, timeout: float) -> None:
    """Returns once every other worker in `tf_config` listens on its port.

    TensorFlow's own wait, inside `MultiWorkerMirroredStrategy()`, holds the interpreter while it
    waits and has no end: a leftover TF_CONFIG would make a single run hang, deaf to SIGTERM and
    SIGINT. So the workers meet here first, in Python: each listens on its own port (closed
    before TensorFlow's server takes it; a peer that comes later finds that server instead)
    and connects to every other one; a signal stops the wait, and so does `timeout`.

    Raises:
      UsageError: this worker's port is taken, or a peer did not answer within `timeout`.
      Interrupted: SIGTERM or SIGINT arrived while waiting.
    """
    cluster, task = tf_config["cluster"], tf_config["task"]
    own = cluster[task["type"]][task["index"]]
    peers = [address for job in ("chief", "worker") for address in cluster.get(job, []) if address != own]
    deadline = time.monotonic() + timeout
    with _listening(own), _interruptible("waiting for the other workers"):
        for address in peers:
            while not _answers(address):
                if time.monotonic() > deadline:
                    raise UsageError(
                        f"waited {timeout:g} s for the workers TF_CONFIG names, and {address} did not answer: "
                        f"start every worker, or unset TF_CONFIG for a single run ({PEER_TIMEOUT_ENV} sets the wait).")
                time.sleep(_PEER_POLL_SECONDS)


@contextlib.contextmanager
def _listening(address: str) -> Iterator[None]:
    port = int(address.rpartition(":")[2])
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", port))
        listener.listen(_BACKLOG)
    except OSError as error:
        listener.close()
        raise UsageError(f"TF_CONFIG gives this worker {address}, but port {port} is taken ({error.strerror}): "
                         "stop what holds it, or pick another port.") from None
    try:
        yield
    finally:
        listener.close()


@contextlib.contextmanager
def _interruptible(doing: str) -> Iterator[None]:
    """SIGTERM and SIGINT raise `Interrupted` instead of waiting for the end of `doing`."""

    def stop(signum: int, _frame) -> None:
        raise Interrupted(f"stopped by {signal.Signals(signum).name} while {doing}; nothing was written.", signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=_PEER_POLL_SECONDS).close()
    except OSError:
        return False
    return True
