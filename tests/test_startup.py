"""Starting TensorFlow: its start-up noise filtered, everything else kept, even through a crash;
the user's `--verbosity` obeyed; `TRAIN_LOOP_VERBOSE_STARTUP=1` showing it all.

Each case is a fresh Python process, since TensorFlow starts once per process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from absl import logging as absl_logging
from conftest import REPO

NOISE = "I1128 05:00:00.000000  1234 cpu_feature_guard.cc:227] start-up chatter"
WARNING = "W1128 05:00:00.000000  1234 some_op.cc:1] a warning the user must see"


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # As in a user's shell: none of the logging settings conftest makes for the test session.
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("TRAIN_LOOP_VERBOSE_STARTUP", "TF_CPP_MIN_LOG_LEVEL")
    }
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**environment, **(env or {})},
    )


def test_lines_written_before_a_crash_still_come_through():
    """A process killed while its stderr is filtered (as an import dying of SIGILL would be)
    still shows what it wrote before, noise left out."""
    crashed = run_python(f"""
        import os, signal
        from train_loop import startup
        from train_loop.outputs.stderr import filtered_stderr
        with filtered_stderr(startup._NOISE):
            os.write(2, b"{NOISE}\\n{WARNING}\\n")
            os.kill(os.getpid(), signal.SIGKILL)
        """)

    assert crashed.returncode == -signal.SIGKILL
    assert crashed.stderr.splitlines() == [WARNING]


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
def test_verbosity_given_by_the_user_reaches_absl_and_tensorflows_logger():
    code = """
        import logging, sys
        from absl import flags, logging as absl_logging
        from train_loop import startup
        flags.FLAGS(sys.argv)
        startup.start_tensorflow()
        print(absl_logging.get_verbosity(), logging.getLogger("tensorflow").level)
        """
    default = run_python(code)
    debug = run_python(code.replace("flags.FLAGS(sys.argv)", "flags.FLAGS([sys.argv[0], '--verbosity=1'])"))

    assert default.stdout.split() == [str(absl_logging.WARNING), str(logging.WARNING)], default.stderr
    assert debug.stdout.split() == ["1", str(logging.DEBUG)], debug.stderr


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
def test_verbose_startup_shows_tensorflows_start_up_lines():
    code = "from train_loop import startup; startup.start_tensorflow()"
    quiet = run_python(code)
    verbose = run_python(code, env={"TRAIN_LOOP_VERBOSE_STARTUP": "1"})

    assert quiet.returncode == verbose.returncode == 0
    assert "cpu_feature_guard" not in quiet.stderr
    assert "cpu_feature_guard" in verbose.stderr
