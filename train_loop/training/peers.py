"""Waiting for the other workers of a multi-worker run, bounded in time and stopped by a signal."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

from train_loop.errors import Interrupted, UsageError

PEER_TIMEOUT_ENV = "TRAIN_LOOP_PEER_TIMEOUT"
_PEER_TIMEOUT_SECONDS = 120
_PEER_POLL_SECONDS = 0.5
_BACKLOG = 64
# A worker answers a greeting at once; a loaded machine may take a moment. The listener gives a
# greeter less, so that it is free again soon after a peer that connects and says nothing.
_ANSWER_SECONDS = 5.0
_GREETING_SECONDS = 1.0
_GREETING_BYTES = 256  # More than any greeting: a longer line is not one.
_PROTOCOL = b"train_loop peers 1\n"  # Changed with the greeting, so that other versions never meet.
_MET, _ABSENT, _STRANGER = "met", "absent", "stranger"  # What greeting a peer's address gives.


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


def wait_for_peers(tf_config: dict, timeout: float, *, named_by: str, remedy: str) -> None:
    """Returns once this worker has met every other worker of `tf_config`'s cluster.

    TensorFlow's own wait, inside `MultiWorkerMirroredStrategy()`, holds the interpreter while it
    waits and has no end: a leftover TF_CONFIG would make a single run hang, deaf to SIGTERM and
    SIGINT, and so would a peer's port held by another program. So the workers meet here first,
    in Python: each listens on its own port and greets every other one with a token of the
    cluster and its own address, and the peer answers in kind. Whatever answers otherwise, or
    not at all, is not a worker of this run, and the wait goes on. One greeting meets both
    workers of a pair, so a worker that has met all its peers closes its port (for TensorFlow's
    server) when no peer needs it any more. A signal stops the wait, and so does `timeout`.

    Args:
      tf_config: the cluster and this worker's task, as `TF_CONFIG` holds them.
      timeout: seconds to wait.
      named_by: what names the cluster, for the error lines (`TF_CONFIG`).
      remedy: how to bring the missing workers, for the error line.

    Raises:
      UsageError: this worker's port is taken, or a peer did not answer within `timeout`.
      Interrupted: SIGTERM or SIGINT arrived while waiting.
    """
    cluster, task = tf_config["cluster"], tf_config["task"]
    own = cluster[task["type"]][task["index"]]
    peers = [address for job in ("chief", "worker") for address in cluster.get(job, []) if address != own]
    token = hashlib.sha256(_PROTOCOL + json.dumps(cluster, sort_keys=True).encode()).hexdigest()
    met: set[str] = set()  # Peers met, by this worker's greeting or by theirs.
    outcomes: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    with interruptible("waiting for the other workers"), _answering(own, token, met, named_by=named_by):
        while True:
            for address in [address for address in peers if address not in met]:
                outcomes[address] = _greet(address, own, token, deadline)
                if outcomes[address] == _MET:
                    met.add(address)
            missing = [address for address in peers if address not in met]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise UsageError(_missing_line(missing[0], outcomes[missing[0]], timeout, named_by, remedy))
            time.sleep(_PEER_POLL_SECONDS)


@contextlib.contextmanager
def interruptible(doing: str) -> Iterator[None]:
    """SIGTERM and SIGINT raise `Interrupted` instead of waiting for the end of `doing`.

    Python runs signal handlers in the main thread only; elsewhere (a notebook's worker thread)
    the signals keep their handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame) -> None:
        raise Interrupted(f"stopped by {signal.Signals(signum).name} while {doing}; nothing was written.", signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _missing_line(address: str, outcome: str, timeout: float, named_by: str, remedy: str) -> str:
    waited = f"waited {timeout:g} s for the workers {named_by} names, and"
    if outcome == _STRANGER:
        return (
            f"{waited} something else answers at {address}, not a train_loop worker of this run: stop "
            f"what holds that port, or give that worker another one ({PEER_TIMEOUT_ENV} sets the wait)."
        )
    return f"{waited} {address} did not answer: {remedy} ({PEER_TIMEOUT_ENV} sets the wait)."


@contextlib.contextmanager
def _answering(own: str, token: str, met: set[str], *, named_by: str) -> Iterator[None]:
    """Answers peers' greetings on this worker's port, noting the greeters in `met`, until the
    block ends; the port is closed then, for TensorFlow's server."""
    port = int(own.rpartition(":")[2])
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", port))
        listener.listen(_BACKLOG)
    except OSError as error:
        listener.close()
        raise UsageError(
            f"{named_by} gives this worker {own}, but port {port} is taken ({error.strerror}): "
            "stop what holds it, or give this worker another port."
        ) from None
    listener.settimeout(_PEER_POLL_SECONDS)
    done = threading.Event()
    thread = threading.Thread(target=_answer_greetings, args=(listener, own, token, met, done), daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()  # Before the close: the listener's number must not name TensorFlow's socket in it.
        listener.close()


def _answer_greetings(listener: socket.socket, own: str, token: str, met: set[str], done: threading.Event) -> None:
    while not done.is_set():
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        with connection:
            try:
                token_received, _, greeter = _read_line(connection, _GREETING_SECONDS).partition(" ")
                if token_received == token:
                    connection.settimeout(_GREETING_SECONDS)
                    connection.sendall(_greeting(token, own))
                    met.add(greeter)
            except OSError:
                pass  # A greeter that went away; it greets again.


def _greet(address: str, own: str, token: str, deadline: float) -> str:
    """`_MET` once the worker at `address` answered this worker's greeting; `_ABSENT` when nothing
    listens there; `_STRANGER` when what does is not a worker of this run."""
    host, _, port = address.rpartition(":")
    try:
        connection = socket.create_connection((host, int(port)), timeout=_PEER_POLL_SECONDS)
    except OSError:
        return _ABSENT
    with connection:
        try:
            connection.sendall(_greeting(token, own))
            answer = _read_line(connection, min(_ANSWER_SECONDS, max(deadline - time.monotonic(), 0.1)))
        except OSError:
            return _STRANGER
    return _MET if answer == _greeting(token, address).decode().rstrip("\n") else _STRANGER


def _greeting(token: str, address: str) -> bytes:
    return f"{token} {address}\n".encode()


def _read_line(connection: socket.socket, seconds: float) -> str:
    """The first line `connection` sends within `seconds`, without its newline; '' if there is none."""
    deadline = time.monotonic() + seconds
    received = b""
    while b"\n" not in received and len(received) < _GREETING_BYTES:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return ""
        connection.settimeout(remaining)
        try:
            chunk = connection.recv(_GREETING_BYTES - len(received))
        except TimeoutError:
            return ""
        if not chunk:
            return ""
        received += chunk
    line, newline, _ = received.partition(b"\n")
    return line.decode("utf-8", "replace") if newline else ""
