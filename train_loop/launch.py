"""`python -m train_loop.launch --workers=N -- <train flags>`: N local workers of one
MultiWorkerMirroredStrategy run, on free 127.0.0.1 ports.

The way to try multi-worker training on one machine (and what the tests use): each worker is
`python -m train_loop --strategy=multi_worker <train flags>` with its own `TF_CONFIG`; their
output comes through with a `[worker i]` prefix. If one worker fails, the others are stopped
(they would wait on its collectives forever) and the launcher exits with that worker's status.
SIGTERM and SIGINT are passed on to every worker, which checkpoint and stop together.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from absl import flags

from train_loop import apps, cli, orphans
from train_loop.study import jobs

_WORKERS = flags.DEFINE_integer("workers", 2, "Local worker processes to start.", lower_bound=1)
_STOP_SECONDS = 30  # After a failure or a signal: how long workers get before they are killed.


def main(argv: Sequence[str]) -> None:
    num_workers = _WORKERS.value
    # Training flags before `--` are the workers' too.
    given = cli.given_training_flags()
    train_flags = [*given, *argv[1:], "--strategy=multi_worker"]

    def check_and_launch() -> None:
        # Checked once here, so a bad flag is one line, not one per worker.
        cli.config_from_args(train_flags)
        sys.exit(launch(num_workers, train_flags))

    # Ctrl-C before the workers run (or before the signals are passed on) is one line too.
    cli.run_guarded(check_and_launch)


def launch(num_workers: int, train_flags: Sequence[str]) -> int:
    """Runs the workers to the end; returns 0, or the first failing worker's exit status."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(num_workers)]}
    workers: list[subprocess.Popen] = []
    signalled: list[int] = []

    def pass_on(signum: int, _frame) -> None:
        signalled.append(signum)
        _send(workers, signum)

    # Passed on from the start, with no moment of the default handlers between (a signal then
    # ended the launcher and left its workers running). The workers are started with SIGINT
    # ignored: a Ctrl-C in a worker's first instants, before Python can turn it into one line,
    # would be a traceback. `cli.run` restores it; `_wait` passes it on again.
    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        workers.extend(_start(index, cluster, train_flags) for index in range(num_workers))
    finally:
        signal.signal(signal.SIGINT, pass_on)
    forwarders = [
        threading.Thread(target=_forward, args=(index, worker.stdout), daemon=True)
        for index, worker in enumerate(workers)
    ]
    for thread in forwarders:
        thread.start()
    status = _wait(workers, signalled)
    for thread in forwarders:
        thread.join(timeout=5)
    return status


def free_ports(count: int) -> list[int]:
    """Ports the kernel reports free now; held together so that they are distinct."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def _start(index: int, cluster: dict, train_flags: Sequence[str]) -> subprocess.Popen:
    tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
    return subprocess.Popen(
        [sys.executable, "-m", "train_loop", *train_flags],
        env=orphans.child_environment({**os.environ, "TF_CONFIG": json.dumps(tf_config), "PYTHONUNBUFFERED": "1"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )


def _forward(index: int, stream) -> None:
    for line in stream:
        print(f"[worker {index}] {line}", end="", flush=True)


def _wait(workers: list[subprocess.Popen], signalled: list[int]) -> int:
    """Waits for all; at the first failure, stops the rest and returns its status.

    After a signal every worker stops on its own (with a checkpoint, if training): the signal is
    passed on again every second, for workers still starting, until all have ended or the grace
    period is over.
    """
    resent_at = deadline = None
    while True:
        statuses = [worker.poll() for worker in workers]
        failed = [status for status in statuses if status not in (None, 0)]
        if signalled and None in statuses:
            now = time.monotonic()
            deadline = deadline or now + _STOP_SECONDS
            if now > deadline:
                _stop(workers)
            elif resent_at is None or now - resent_at > 1.0:
                _send(workers, signalled[-1])
                resent_at = now
        elif failed:
            _stop(workers)
            return jobs.exit_status(failed[0])
        elif all(status == 0 for status in statuses):
            return 0
        time.sleep(0.2)


def _send(workers: list[subprocess.Popen], signum: int) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signum)


def _stop(workers: list[subprocess.Popen]) -> None:
    """SIGTERM to the workers still running, SIGKILL to those still there after the grace period."""
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    deadline = time.monotonic() + _STOP_SECONDS
    for worker in workers:
        try:
            worker.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


USAGE = """Usage: train-loop-launch --workers=N [training flags] [-- training flags]
       (or: python -m train_loop.launch ...)

Trains one run with N local worker processes of MultiWorkerMirroredStrategy on this machine,
on free 127.0.0.1 ports, each with its own TF_CONFIG; the output of every worker comes through.
"""


def run() -> None:
    """The console script `train-loop-launch` and `python -m train_loop.launch`."""
    apps.run(main, usage=USAGE, groups={"launch": ("workers",), **cli.GROUPS})


if __name__ == "__main__":
    run()
