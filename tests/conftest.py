"""Test set-up: two logical CPU devices before TensorFlow starts, so mirrored runs have replicas."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ["TRAIN_LOOP_OFFLINE"] = "1"  # Tests never download.
# --jit_compile=auto's measurements go to a cache of the test session's own, not the user's.
_CACHE_DIR = tempfile.mkdtemp(prefix="train_loop-test-cache-")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
os.environ["TRAIN_LOOP_CACHE"] = os.path.join(_CACHE_DIR, "speed.json")
os.environ["TRAIN_LOOP_DATA_CACHE"] = _CACHE_DIR  # So are the decoded IDX sets.


from train_loop.training import distribute  # noqa: E402

distribute.split_cpu(2)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run_cli(tmp_path):
    """Runs `python -m train_loop` in a fresh process with `--logdir` under the test's folder."""

    def run(*flags: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "train_loop", f"--logdir={tmp_path / 'logs'}", *flags]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})}
        )

    return run
