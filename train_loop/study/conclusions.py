"""What a study's runs show: each experiment's mean ± standard deviation over seeds, its paired
difference from the reference and whether that is beyond the seed-to-seed spread, the experiment
the validation split selects, and the same findings in sentences (`writeup` puts them in `study.md`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from train_loop.model.models import NEAR_ZERO
from train_loop.study.plans import Plan
from train_loop.study.report import COLUMNS, RunNumbers

# One experiment's runs by seed (None: the one seed --seed gave), as `report.read_run` reads them;
# and every experiment's.
BySeed = Mapping[int | None, RunNumbers]
Numbers = Mapping[str, BySeed]
# The study table leaves out the test split: it is read once, for the selected experiment.
STUDY_COLUMNS = tuple(key for key in COLUMNS if not key.startswith("test_") and key != "gap")
PATH_COLUMNS = ("validation_cross_entropy", "validation_accuracy", "validation_gap", "kernel_small_share")
COMPARED = ("validation_cross_entropy", "validation_accuracy")
# The columns each experiment's sentence reads, in its words: the compared ones, then the first layer's sparsity.
_WORDS = {
    "validation_cross_entropy": "validation cross-entropy",
    "validation_accuracy": "validation accuracy",
    "kernel_small_share": "near-zero share",
}
# How many standard errors of the paired difference count as beyond the seed-to-seed spread.
SPREAD_FACTOR = 2.0
RULE = (
    f"a difference counts as beyond the seed-to-seed spread when the mean of its per-seed differences "
    f"(experiment minus reference, same seed) exceeds {SPREAD_FACTOR:g} standard errors of that mean "
    "(their standard deviation / sqrt(n)); it needs 2 seeds or more"
)


@dataclasses.dataclass(frozen=True)
class Spread:
    """One column of one experiment over its seeds: the mean, and the sample standard deviation
    (n - 1 in the denominator: the seeds are a sample of the seeds one could have drawn)."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else None

    def format(self, form: str) -> str:
        """`mean ± std` in the column's format; the mean alone from one seed."""
        return form.format(self.mean) + ("" if self.std is None else f" ± {form.format(self.std).lstrip('+')}")


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """Experiment minus reference, seed by seed: why paired. The same seed gives both runs the
    same initial weights, validation split and batch order, so the pairs' differences are free of
    what a seed does to every experiment alike, and a real effect stands out against a smaller
    spread than the columns' own standard deviations. Two standard errors is the usual ~95% screen
    of a normal mean; with 3 seeds Student's t would ask 4.3, so a "yes" at 3 seeds says "worth
    more seeds", and a "no" says the seeds do not show it, not that there is no effect."""

    differences: tuple[float, ...]

    @property
    def mean(self) -> float:
        return Spread(self.differences).mean

    @property
    def standard_error(self) -> float | None:
        std = Spread(self.differences).std
        return None if std is None else std / math.sqrt(len(self.differences))

    @property
    def beyond_spread(self) -> bool | None:
        """None from one seed, which has no spread to compare with."""
        error = self.standard_error
        return None if error is None else abs(self.mean) > SPREAD_FACTOR * error


def spreads(numbers: BySeed, keys: Sequence[str]) -> dict[str, Spread]:
    """Each column over the experiment's seeds."""
    return {
        key: Spread(tuple(run.row[key] for run in numbers.values()))
        for key in keys
        if all(run.row[key] is not None for run in numbers.values())
    }


def paired(numbers: BySeed, reference: BySeed, key: str) -> PairedDifference:
    """`key`'s difference from the reference over the seeds both have."""
    seeds = [seed for seed in numbers if seed in reference]
    return PairedDifference(tuple(numbers[seed].row[key] - reference[seed].row[key] for seed in seeds))


def select(plan_numbers: Numbers) -> str:
    """The experiment with the lowest mean validation cross-entropy: the test split ranks nothing."""
    return min(
        plan_numbers,
        key=lambda name: spreads(plan_numbers[name], ["validation_cross_entropy"])["validation_cross_entropy"].mean,
    )


def path_points(plan: Plan) -> dict[str, float]:
    """The path's experiments by strength, weakest first: the reference at its own strength and
    each experiment of the sweep."""
    points = {plan.reference: float(plan.reference_strength), **plan.sweep_experiments()}
    return dict(sorted(points.items(), key=lambda item: item[1]))


def sentences(numbers: Numbers, reference: str) -> list[str]:
    """The study's findings in words, one sentence an experiment, every number read from the same
    means and paired differences as the tables, so the words cannot drift from them: the reference's
    own values, then what each other experiment changed against it and whether that is beyond the
    seed-to-seed spread (said only when there are 2 seeds or more to tell)."""
    words = _words(numbers[reference])
    values = [_value(numbers[reference], words, key) for key in words]
    found = [f"**{reference}**, the reference: " + "; ".join(values) + "."]
    for name in list(numbers)[1:]:
        changes = [_change(numbers[name], numbers[reference], words, key, reference) for key in words]
        found.append(f"**{name}**: " + "; ".join(changes) + ".")
    return found


def _words(runs: BySeed) -> dict[str, str]:
    """The columns the sentences read, in words: a task without accuracy (`--loss`, `--task`) has
    none to say, and its data terms' sum where the classifier has its cross-entropy."""
    if "validation_accuracy" in spreads(runs, COMPARED):
        return _WORDS
    return {
        "validation_cross_entropy": "validation sum of the loss terms",
        "kernel_small_share": _WORDS["kernel_small_share"],
    }


def _value(runs: BySeed, words: Mapping[str, str], key: str) -> str:
    layer = _layer(runs) if key == "kernel_small_share" else ""
    return f"{words[key]}{layer} {_mean_text(runs, key)}"


def _change(runs: BySeed, reference_runs: BySeed, words: Mapping[str, str], key: str, reference: str) -> str:
    """`<what> <value>, <size> <higher|lower> than <reference>'s <value> (<beyond|within> the seed
    spread)`; `the same as` when the difference rounds to nothing in the column's format."""
    difference = paired(runs, reference_runs, key)
    size = _size_text(key, difference.mean)
    theirs = f"{reference}'s {_mean_text(reference_runs, key)}"
    if not any(digit in "123456789" for digit in size):
        said = f"{_value(runs, words, key)}, the same as {theirs}"
    else:
        said = f"{_value(runs, words, key)}, {size} {'higher' if difference.mean > 0 else 'lower'} than {theirs}"
    verdict = difference.beyond_spread
    return said if verdict is None else f"{said} ({'beyond' if verdict else 'within'} the seed spread)"


def _mean_text(runs: BySeed, key: str) -> str:
    return COLUMNS[key][1].format(spreads(runs, [key])[key].mean)


def _size_text(key: str, difference: float) -> str:
    """A difference's size as the comparison table shows it; a share's in percentage points, which
    a `%` would leave open to being read as relative."""
    if key == "kernel_small_share":
        return f"{abs(difference) * 100:.1f} percentage points"
    return f"{abs(difference):.4f}"


def _layer(runs: BySeed) -> str:
    """Which kernel the share counts, and what near zero means."""
    return f" of {next(iter(runs.values())).layer_path}'s kernel (abs w < {NEAR_ZERO:g})"
