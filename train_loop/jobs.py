"""`--jobs=N`: a study's trainings as separate `python -m train_loop` processes, N at a time."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from collections.abc import Sequence

from train_loop.errors import RunStopped

_ERROR_PREFIX = "train_loop: error: "


class JobFailed(RunStopped):
    """A training process ended badly: its own last line, named by its run, and its exit status."""

    is_error = True


def threads_per_job(jobs: int) -> int:
    """The cores this process may use, shared out: N processes each with every core would spend
    their time switching instead of computing."""
    return max(1, len(os.sched_getaffinity(0)) // jobs)


def train_all(trainings: Sequence[tuple[str, Sequence[str]]], *, jobs: int) -> None:
    """Trains each (run name, training flags) in a process of its own, at most `jobs` at once.

    Each process owns its run folder as a single training does (`runs.owned`), so a second study
    on the same folder, or a run already being trained, is refused or reused as usual. After the
    first failure no new process starts; those running finish, then the failure is raised.

    Raises:
      JobFailed: a training ended with a non-zero status (a usage error in it keeps status 2).
    """
    threads = str(threads_per_job(jobs))
    # TensorFlow sizes its thread pools from these at start-up (tensorflow/core/common_runtime/process_util.cc).
    env = {**os.environ, "TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": threads}
    failures: list[JobFailed] = []

    def train(run_name: str, args: Sequence[str]) -> None:
        if failures:
            return
        print(f"{run_name}: training in a process of its own, TF_NUM_INTRAOP_THREADS={threads}", flush=True)
        done = subprocess.run([sys.executable, "-m", "train_loop", *args], capture_output=True, text=True, env=env)
        if done.returncode:
            failures.append(JobFailed(f"{run_name}: {_last_line(done.stderr)}", exit_status(done.returncode)))
        else:
            print(f"{run_name}: finished", flush=True)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
    try:
        for future in [pool.submit(train, name, args) for name, args in trainings]:
            future.result()
    finally:
        # Ctrl-C reaches the processes under way too (they checkpoint and stop); none new may start.
        pool.shutdown(cancel_futures=True)
    if failures:
        raise failures[0]


def exit_status(status: int) -> int:
    """A process killed by signal N (negative status) passes on 128 + N, as a shell does."""
    return 128 - status if status < 0 else status


def _last_line(stderr: str) -> str:
    """The process's one-line message, without its own `train_loop: error:` (the study adds it back)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else "ended without a message"
    return last.removeprefix(_ERROR_PREFIX)
