"""Starting TensorFlow without its start-up chatter, while every real warning still shows."""

from __future__ import annotations

import contextlib
import logging
import os
import re

from absl import flags
from absl import logging as absl_logging

from train_loop.outputs.stderr import filtered_stderr

# What TensorFlow prints at every start: INFO lines (its logging prints them before it reads
# TF_CPP_MIN_LOG_LEVEL), and the CUDA probe's complaint on machines without a GPU driver.
# Anything else, warnings included, is passed through.
_NOISE = re.compile(
    r"^I\d{4} |All log messages before absl::InitializeLog|cuda_platform\.cc.*cuInit"
    r"|To enable the following instructions|rebuild TensorFlow with the appropriate compiler flags"
)


VERBOSE_ENV = "TRAIN_LOOP_VERBOSE_STARTUP"  # 1: show TensorFlow's start-up lines, unfiltered.


def start_tensorflow(cpu_replicas: int = 0, strategy: str = "one_device") -> None:
    """Imports TensorFlow and lists its devices with the start-up noise filtered out of stderr
    (all of it shown under `TRAIN_LOOP_VERBOSE_STARTUP=1`).

    It starts TensorFlow's devices, so the CPU is split into `cpu_replicas` logical devices
    here (N >= 2), while that is still possible. A multi-worker or TPU run (`strategy`, as
    `--strategy` names it) is left before any op runs: its cluster must be connected first.
    """
    verbose = os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    with contextlib.nullcontext() if verbose else filtered_stderr(_NOISE):
        import tensorflow as tf

        from train_loop.training.distribute import resolve_strategy_name, split_cpu

        tf.config.list_physical_devices()
        if cpu_replicas:
            split_cpu(cpu_replicas)
        if resolve_strategy_name(strategy) not in ("multi_worker", "tpu"):
            # XLA announces itself at its first compile; a trivial one here keeps that out of training.
            tf.function(lambda: tf.constant(1.0) + 1.0, jit_compile=True)()
    # TensorFlow's Python INFO lines ("Sharding callback duration") are progress noise too, unless
    # the user asked for them with --verbosity (absl's flag), which TensorFlow's import overrides.
    verbosity = flags.FLAGS["verbosity"]
    level = verbosity.value if verbosity.present else absl_logging.WARNING
    absl_logging.set_verbosity(level)
    logging.getLogger("tensorflow").setLevel(absl_logging.converter.absl_to_standard(level))
