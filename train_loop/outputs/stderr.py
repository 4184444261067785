"""What reaches stderr besides our one-line errors: a warning about something repaired on the way,
and TensorFlow's C++ log lines dropped around an attempt whose failure is reported otherwise.

A leaf that every layer may use: it imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator


def warn(message: str) -> None:
    """One line on stderr about something repaired or skipped on the way, training goes on."""
    print(f"train_loop: warning: {message}", file=sys.stderr, flush=True)


# The filter runs in a process of its own, so that it still passes on what was written when an
# import dies of a signal (an illegal instruction, a failed CHECK): no Python is left to do it then.
_FILTER = """
import re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; this drains the pipe.
noise = re.compile(sys.argv[1])
dropped = False
for line in sys.stdin:
    if not line.strip():
        continue
    # A tab-led line continues the log line before it: it goes where that one went.
    dropped = bool(noise.search(line)) or (dropped and line.startswith("\\t"))
    if not dropped:
        sys.stderr.write(line)
        sys.stderr.flush()
"""


def quiet_stderr() -> contextlib.AbstractContextManager[None]:
    """Drops what TensorFlow's C++ side logs within: for an attempt whose failure is reported
    otherwise. Python's own lines (one of ours, a traceback) still come through."""
    return filtered_stderr(re.compile(r"^([IWE]\d{4} |\t)"))  # A log line, or its continuation.


@contextlib.contextmanager
def filtered_stderr(noise: re.Pattern) -> Iterator[None]:
    """Sends file descriptor 2 (C++ writes there directly) through a filter that drops `noise`."""
    sys.stderr.flush()
    saved = os.dup(2)
    filter_process = subprocess.Popen(
        [sys.executable, "-c", _FILTER, noise.pattern],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=saved,
        text=True,
    )
    os.dup2(filter_process.stdin.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        filter_process.stdin.close()  # The filter reads to the end, then exits.
        filter_process.wait()
