"""What `--on_divergence=rollback` keeps in the checkpoint: how many rollbacks there were, the
learning rate's factor they left, and the steps they skipped; so that a run killed after a
rollback resumes with them (`training/divergence.py` rolls back)."""

from __future__ import annotations

import tensorflow as tf


class Rollbacks(tf.Module):
    """The rollbacks' counters, as variables: plain ones, which only the eager loop reads, but for
    `learning_rate_factor`, which the traced step reads on every replica (`optimizers.Rescaled`),
    made in `strategy`'s scope."""

    def __init__(self, max_rollbacks: int, strategy: tf.distribute.Strategy):
        super().__init__(name="rollbacks")
        self.count = tf.Variable(0, dtype=tf.int64, trainable=False)
        with strategy.scope():
            self.learning_rate_factor = tf.Variable(1.0, dtype=tf.float32, trainable=False)
        # The steps skipped (1-based), one slot a rollback; 0: none.
        self._skipped = tf.Variable(tf.zeros([max(max_rollbacks, 1)], tf.int64), trainable=False)
        # The step each rollback started from and the step it diverged at, one slot a rollback.
        self._history = tf.Variable(tf.zeros([max(max_rollbacks, 1), 2], tf.int64), trainable=False)

    @property
    def skipped(self) -> frozenset[int]:
        return frozenset(int(step) for step in self._skipped.numpy() if step)

    @property
    def history(self) -> list[dict[str, int]]:
        """Each rollback so far: the step it diverged at and the step it went back to."""
        rows = self._history.numpy()[: int(self.count)]
        return [{"diverged_at": int(diverged), "back_to": int(back)} for back, diverged in rows]

    def record(self, *, back_to: int, diverged_at: int, factor: float, skip: bool) -> None:
        """Counts one rollback (call after restoring the checkpoint it goes back to, whose counts
        these were): multiplies the rate's factor and, with `skip`, skips the step."""
        slot = int(self.count)
        self.count.assign_add(1)
        self.learning_rate_factor.assign(self.learning_rate_factor.numpy() * factor)
        self._history[slot].assign([back_to, diverged_at])
        if skip:
            self._skipped[slot].assign(diverged_at)

    def values(self) -> list[tf.Tensor]:
        return [self.count, self.learning_rate_factor, self._skipped, self._history]
