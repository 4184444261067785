"""Training processes that end with the process that started them (a study's jobs, a launcher's workers).

A parent killed by SIGKILL cannot pass a signal on: its children would train on, orphaned. So
the parent names itself in the child's environment (`child_environment`), and the child asks
Linux, as it starts (`end_with_parent`), for SIGTERM when that parent dies
(`prctl(PR_SET_PDEATHSIG)`): a training process then stops at its next loop-call boundary with
a checkpoint, as on any SIGTERM. Linux sends it when the *thread* that started the child ends,
so a parent must start each child from a thread that outlives it (one that waits for it).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Mapping

PARENT_ENV = "TRAIN_LOOP_PARENT_PID"  # Set by the parent for its child; not a user setting.
_PR_SET_PDEATHSIG = 1  # From <linux/prctl.h>.


def child_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """`environment` for a child that `end_with_parent` ties to this process."""
    return {**environment, PARENT_ENV: str(os.getpid())}


def end_with_parent() -> None:
    """In a child started with `child_environment`: SIGTERM to this process when its parent dies.

    If the parent died before the request was made, the process is already an orphan, and
    signals itself now. The variable is taken out of the environment, so processes this one
    starts are not tied to a parent that is not theirs. Elsewhere than on Linux, nothing is done.
    """
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        return  # Refused (a sandbox without prctl): the child lives on as before.
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)
