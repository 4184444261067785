"""One worker of a cluster (its TF_CONFIG in the environment) whose own action raises on worker 1
alone, for tests/test_task_equivalence.py: `python tests/failing_worker.py LOGDIR`. Prints the
line the run stops with and exits with the run's status."""

from __future__ import annotations

import json
import os
import sys

import train_loop
from train_loop.errors import RunStopped

WORKER = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
FAILING_STEP = 10


def samples(context: train_loop.ActionContext) -> None:
    if WORKER == 1 and context.step == FAILING_STEP:
        raise OSError("disk of worker 1 unplugged")


if __name__ == "__main__":
    try:
        train_loop.train(
            dataset="digits",
            strategy="multi_worker",
            epochs=1,
            steps_per_loop=5,
            jit_compile=False,
            logdir=sys.argv[1],
            run_name="run",
            actions=[train_loop.PeriodicAction(samples, every=5)],
        )
    except RunStopped as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_status)
