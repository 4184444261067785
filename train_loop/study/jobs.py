"""`--jobs=N`: a study's trainings as separate `python -m train_loop` processes, N at a time."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence

from train_loop import orphans
from train_loop.errors import RunStopped

_PREFIX = "train_loop: "
_ERROR_PREFIX = "train_loop: error: "


class JobFailed(RunStopped):
    """A training process ended badly: its own last line, named by its run, and its exit status;
    an error if its line was one (a signal's stop is not)."""

    def __init__(self, run_name: str, stderr: str, status: int):
        lines = [line for line in stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else "ended without a message"
        self.is_error = not last.startswith(_PREFIX) or last.startswith(_ERROR_PREFIX)
        super().__init__(f"{run_name}: {last.removeprefix(_ERROR_PREFIX).removeprefix(_PREFIX)}", exit_status(status))


def threads_per_job(jobs: int) -> int:
    """The cores this process may use, shared out: N processes each with every core would spend
    their time switching instead of computing."""
    return max(1, len(os.sched_getaffinity(0)) // jobs)


def train_all(trainings: Sequence[tuple[str, Sequence[str]]], *, jobs: int) -> None:
    """Trains each (run name, training flags) in a process of its own, at most `jobs` at once.

    Each process owns its run folder as a single training does (`runs.owned`), so a second study
    on the same folder, or a run already being trained, is refused or reused as usual. After the
    first failure, or a SIGTERM or SIGINT (passed on to the processes under way, which checkpoint
    and stop), no new process starts; those running end, then the first failure is raised. If
    this process dies without passing a signal on (SIGKILL), the processes get SIGTERM from Linux
    (see `orphans`).

    Raises:
      JobFailed: a training ended with a non-zero status (a usage error in it keeps status 2).
    """
    processes = _Processes(threads_per_job(jobs))
    # SIGINT too: a Ctrl-C reaches the whole process group, but `kill -INT` only this process.
    previous = {signum: signal.signal(signum, processes.pass_on) for signum in (signal.SIGTERM, signal.SIGINT)}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
    try:
        for future in [pool.submit(processes.run_process, name, args) for name, args in trainings]:
            future.result()
    finally:
        pool.shutdown(cancel_futures=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if processes.failures:
        raise processes.failures[0]


class _Processes:
    """The training processes of `train_all`: those under way, and how the ended ones failed."""

    def __init__(self, threads: int):
        # TensorFlow sizes its thread pools from these at start-up (tensorflow/core/common_runtime/process_util.cc).
        self._env = orphans.child_environment(
            {**os.environ, "TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": str(threads)}
        )
        self._running: set[subprocess.Popen] = set()
        self._stopping = False
        # Held while a process starts, so a signal is passed on to it or it does not start.
        # Reentrant: a second signal runs the handler again in the main thread, which may hold it.
        self._starting = threading.RLock()
        self.failures: list[JobFailed] = []

    def run_process(self, run_name: str, args: Sequence[str]) -> None:
        # Its stderr goes to a file, not a pipe: a process whose study was killed must still be
        # able to write its last lines while it stops.
        with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as stderr:
            with self._starting:
                if self.failures or self._stopping:
                    return
                print(
                    f"{run_name}: training in a process of its own, TF_NUM_INTRAOP_THREADS="
                    f"{self._env['TF_NUM_INTRAOP_THREADS']}",
                    flush=True,
                )
                # Started from this thread, which waits for it: see `orphans` for why that matters.
                process = subprocess.Popen(
                    [sys.executable, "-m", "train_loop", *args], stdout=subprocess.DEVNULL, stderr=stderr, env=self._env
                )
                self._running.add(process)
            process.wait()
            self._running.discard(process)
            stderr.seek(0)
            if process.returncode:
                self.failures.append(JobFailed(run_name, stderr.read(), process.returncode))
                return
        print(f"{run_name}: finished", flush=True)

    def pass_on(self, signum: int, _frame: object) -> None:
        with self._starting:
            self._stopping = True
            for process in list(self._running):
                process.send_signal(signum)


def exit_status(status: int) -> int:
    """A process killed by signal N (negative status) passes on 128 + N, as a shell does."""
    return 128 - status if status < 0 else status
