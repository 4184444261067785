"""The workers' agreement on a check's verdict: a check that failed on one worker fails on all,
so that none goes on into a collective that the stopped one would leave it waiting in."""

from __future__ import annotations

import tensorflow as tf


def failed_anywhere(strategy: tf.distribute.Strategy, failed: bool) -> bool:
    """Whether the check failed on any worker: one all-reduce, which every worker must call."""
    flag = tf.constant(float(failed))

    @tf.function(autograph=False)
    def any_failed() -> tf.Tensor:
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.identity(flag)), axis=None)

    return bool(any_failed() > 0)
