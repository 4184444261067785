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

# Lines TensorFlow prints at every start on a machine without CUDA or with a generic build:
# informational, or about hardware the user does not have. Anything else is passed through.
_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub\.cc|cuda_platform\.cc.*cuInit"
    r"|cpu_feature_guard\.cc|To enable the following instructions|oneDNN custom operations"
    r"|Unable to register cu(DNN|FFT|BLAS) factory|computation_placer|TF-TRT Warning"
    r"|rebuild TensorFlow with the appropriate compiler flags|cuda_(dnn|fft|blas)\.cc")


def start_tensorflow() -> None:
    """Imports TensorFlow and lists its devices with the start-up noise filtered out of stderr.

    `TF_CPP_MIN_LOG_LEVEL=1` hides TensorFlow's INFO lines only; the lines printed before its
    logging is set up, and the CUDA probe's error on machines without a GPU, need filtering.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    with _filtered_stderr():
        import tensorflow as tf

        tf.config.list_physical_devices()
    # TensorFlow's Python INFO lines ("Sharding callback duration") are progress noise too.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    absl_logging.set_verbosity(absl_logging.WARNING)


@contextlib.contextmanager
def _filtered_stderr() -> Iterator[None]:
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
                if line.strip() and not _NOISE.search(line):
                    print(line, file=sys.stderr)
