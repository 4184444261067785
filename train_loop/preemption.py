"""SIGTERM and SIGINT: stop at the next loop-call boundary, checkpointed, agreed by every worker."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import tensorflow as tf

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalStop:
    """Notes a SIGTERM or SIGINT instead of dying on it, so the outer loop can finish the call
    under way, checkpoint and exit (within seconds: one loop call, at most an evaluation).

    On a multi-worker cluster every worker must stop after the same call, or the others would
    wait on its collectives forever: `requested` is agreed through one tiny all-reduce per loop
    call. (`tf.distribute.experimental.PreemptionCheckpointHandler` agrees the same way through
    the coordination service, but it watches SIGTERM alone, saves under its own numbering and
    exits by itself; here SIGINT counts too and the checkpoint is the run's, at its step.)
    """

    def __init__(self, strategy: tf.distribute.Strategy):
        self._strategy = strategy
        self._multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        self._received: int | None = None

    @contextlib.contextmanager
    def catching(self) -> Iterator[None]:
        """Handles the signals while training; the previous handlers come back afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield  # Python delivers signals to the main thread only; nothing to catch here.
            return
        previous = {signum: signal.signal(signum, self._note) for signum in SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _note(self, signum: int, _frame) -> None:
        self._received = self._received or signum

    def requested(self) -> int | None:
        """The signal to stop for, if this process or (multi-worker) any worker received one."""
        if not self._multi_worker:
            return self._received
        vote = tf.constant(1.0 if self._received else 0.0)
        votes = self._strategy.experimental_distribute_values_from_function(lambda _: vote)
        stopping = float(self._strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None)) > 0
        return (self._received or signal.SIGTERM) if stopping else None
