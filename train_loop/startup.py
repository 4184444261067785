"""Starting TensorFlow without its start-up chatter, while every real warning still shows."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

from absl import logging as absl_logging

# What TensorFlow prints at every start: INFO lines (its logging prints them before it reads
# TF_CPP_MIN_LOG_LEVEL), and the CUDA probe's complaint on machines without a GPU driver.
# Anything else, warnings included, is passed through.
_NOISE = re.compile(
    r"^I\d{4} |All log messages before absl::InitializeLog|cuda_platform\.cc.*cuInit"
    r"|To enable the following instructions|rebuild TensorFlow with the appropriate compiler flags")


def start_tensorflow(cpu_replicas: int = 0, strategy: str = "one_device") -> None:
    """Imports TensorFlow and lists its devices with the start-up noise filtered out of stderr.

    It starts TensorFlow's devices, so the CPU is split into `cpu_replicas` logical devices
    here (N >= 2), while that is still possible. A multi-worker or TPU run (`strategy`, as
    `--strategy` names it) is left before any op runs: its cluster must be connected first.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    with _filtered_stderr(_NOISE):
        import tensorflow as tf

        from train_loop.distribute import resolve_strategy_name, split_cpu

        tf.config.list_physical_devices()
        if cpu_replicas:
            split_cpu(cpu_replicas)
        if resolve_strategy_name(strategy) not in ("multi_worker", "tpu"):
            # XLA announces itself at its first compile; a trivial one here keeps that out of training.
            tf.function(lambda: tf.constant(1.0) + 1.0, jit_compile=True)()
    # TensorFlow's Python INFO lines ("Sharding callback duration") are progress noise too.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    absl_logging.set_verbosity(absl_logging.WARNING)


def quiet_stderr() -> contextlib.AbstractContextManager[None]:
    """Drops what TensorFlow's C++ side logs within: for an attempt whose failure is reported
    otherwise. Python's own lines (one of ours, a traceback) still come through."""
    return _filtered_stderr(re.compile(r"^([IWE]\d{4} |\t)"))  # A log line, or its continuation.


@contextlib.contextmanager
def _filtered_stderr(noise: re.Pattern) -> Iterator[None]:
    """Captures file descriptor 2 (C++ writes there directly), then replays all but the noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines():
                if line.strip() and not noise.search(line):
                    print(line, file=sys.stderr)
