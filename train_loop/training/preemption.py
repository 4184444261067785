"""SIGTERM and SIGINT: stop at a loop-call boundary with a checkpoint, agreed by every worker."""

from __future__ import annotations

import contextlib
import logging
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator

import tensorflow as tf

from train_loop.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalStop:
    """Notes a SIGTERM or SIGINT instead of dying on it; after the loop call under way, the
    controller saves a checkpoint and raises `Interrupted` (exit 143 or 130).

    On a multi-worker cluster every worker must stop after the same call, or the others would
    wait on its collectives forever. There TensorFlow's `PreemptionCheckpointHandler` agrees on
    the call through the coordination service: it polls the signal noted here (SIGINT counts
    too), has every worker save at the same step and then stop.
    """

    def __init__(self, strategy: tf.distribute.Strategy):
        self._strategy = strategy
        self._received: int | None = None
        self._pending: tuple[int, Callable[[], None]] = (0, lambda: None)
        self._handler = None

    @contextlib.contextmanager
    def catching(self) -> Iterator[None]:
        """Handles the signals while training and scoring the end of the run (see `finish`); the
        previous handlers come back afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield  # Python delivers signals to the main thread only; nothing to catch here.
            return
        previous = {signum: signal.signal(signum, self._note) for signum in SIGNALS}
        try:
            with self._cluster_agreement():
                yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @contextlib.contextmanager
    def _cluster_agreement(self) -> Iterator[None]:
        if not isinstance(self._strategy, tf.distribute.MultiWorkerMirroredStrategy):
            yield
            return
        # The handler wants a checkpoint to restore on creation; the run restored its own
        # already, so it gets an empty one, and saves through `save_fn` into the run's.
        tf_logger = logging.getLogger("tensorflow")
        tf_logger.addFilter(_own_deprecation)
        with tempfile.TemporaryDirectory(prefix="train_loop-preemption-") as folder:
            self._handler = tf.distribute.experimental.PreemptionCheckpointHandler(
                self._strategy.cluster_resolver,
                tf.train.CheckpointManager(tf.train.Checkpoint(), folder, max_to_keep=1),
                termination_config=tf.distribute.experimental.TerminationConfig(
                    termination_watcher_fn=lambda: self._received is not None,
                    exit_fn=self._exit,
                    save_fn=self._save,
                    grace_period=0,
                ),
            )
            try:
                yield
            finally:
                # The handler stops its watcher threads in `__del__`, which never runs while they
                # hold it; stopped here, on every worker, none is left waiting on the chief's
                # coordination service when the chief exits.
                self._handler.__del__()
                tf_logger.removeFilter(_own_deprecation)

    def _note(self, signum: int, _frame) -> None:
        self._received = self._received or signum

    def stop_if_signalled(self, step: int, save: Callable[[], None] | None = None) -> None:
        """Called after every loop call, which ended at `step`, with what saves a checkpoint
        there, and once more at the end of the run (`save` None: the last step's checkpoint is
        written): if a signal asks to stop, saves and raises `Interrupted`. On a cluster the
        workers first agree on the call to stop after (the next one, at the latest)."""
        self._pending = (step, save or (lambda: None))
        if self._handler is not None:
            self._handler.save_checkpoint_if_preempted()
        elif self._received:
            self._save()
            self._exit()

    def _save(self) -> None:
        self._pending[1]()

    def _exit(self) -> None:
        signum = self._received or signal.SIGTERM  # A peer's signal stops this worker too.
        raise Interrupted(
            f"stopped by {signal.Signals(signum).name} at step {self._pending[0]} with a "
            "checkpoint; the same command resumes the run.",
            signum,
        )


def _own_deprecation(record: logging.LogRecord) -> bool:
    """Drops the deprecation warning the handler's own code triggers when it saves (it reads its
    deprecated `total_run_calls`): nothing a user could change. Other warnings pass."""
    return "PreemptionCheckpointHandler.total_run_calls" not in record.getMessage()
