"""The bench's rounds: every contender once a round, round after round, and each one's fastest kept.

Apart from `main`, which defines the bench's flags, so that a test can import it beside the
training flags.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def fastest_rounds(one_round: Callable[[], dict[str, dict[str, Any]]], rounds: int) -> dict[str, dict[str, Any]]:
    """Each contender's fastest of `rounds` interleaved rounds, with every round's speed under "rounds".

    On a shared virtual machine a process can run a quarter slower than the one before it for no
    reason of its own (BENCHMARKS.md); interleaving spreads such spells over the contenders, and
    the fastest round, as `timeit` takes the fastest repeat, is the one least disturbed.
    """
    runs = [one_round() for _ in range(rounds)]
    fastest = {}
    for name in runs[0]:
        speeds = [each[name]["examples_per_second"] for each in runs]
        fastest[name] = {**runs[speeds.index(max(speeds))][name], "rounds": speeds}
    return fastest
