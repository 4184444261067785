"""What a study's runs show, as `study.md`: each experiment's mean ± standard deviation over
seeds, its paired difference from the reference, the experiment the validation split selects
(with its test accuracy, reported once), and the regularization path of a sweep."""

from __future__ import annotations

import dataclasses
import math
import os
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


def markdown(plan: Plan, numbers: Numbers, figures: Sequence[str]) -> str:
    """`study.md`: the tables, the rule they use, the selection, and links to the figures."""
    seeds = ", ".join(str(seed) for seed in plan.seeds if seed is not None) or "the one given by --seed"
    parts = [
        f"# Study {os.path.basename(os.path.normpath(plan.folder))}\n",
        f"Seeds: {seeds}. Each cell is the mean ± the sample standard deviation over the seeds (n "
        "runs); the train columns are the last epoch's means, the validation ones the final "
        f"model's, and `abs w < {NEAR_ZERO:g}` is the share of the first layer's kernel that is "
        "nearly zero.\n",
        _experiments_table(numbers),
        _comparison(plan, numbers),
        _selection(numbers),
    ]
    if plan.sweep:
        parts.append(_path_table(plan, numbers))
    parts.append("## Figures\n\n" + "\n".join(f"![{name}]({name})" for name in figures) + "\n" if figures else "")
    return "\n".join(part for part in parts if part)


def _experiments_table(numbers: Numbers) -> str:
    headings = ["experiment", "n", *(COLUMNS[key][0] for key in STUDY_COLUMNS)]
    rows = [[name, str(len(runs)), *_cells(runs, STUDY_COLUMNS)] for name, runs in numbers.items()]
    return _table(headings, rows)


def _comparison(plan: Plan, numbers: Numbers) -> str:
    reference = numbers[plan.reference]
    headings = ["experiment"]
    for key in COMPARED:
        headings += [f"Δ {COLUMNS[key][0]} (mean ± s.e.)", "beyond the spread"]
    rows = []
    for name in list(numbers)[1:]:
        row = [name]
        for key in COMPARED:
            difference = paired(numbers[name], reference, key)
            error = difference.standard_error
            row += [
                f"{difference.mean:+.4f}" + ("" if error is None else f" ± {error:.4f}"),
                {True: "yes", False: "no", None: "one seed"}[difference.beyond_spread],
            ]
        rows.append(row)
    heading = f"## Against the reference, {plan.reference}, seed by seed\n\nRule: {RULE}.\n"
    return heading + "\n" + _table(headings, rows) if rows else ""


def _selection(numbers: Numbers) -> str:
    best = select(numbers)
    cells = spreads(numbers[best], ["validation_cross_entropy", "test_accuracy"])
    return (
        f"## Selection\n\nBest by validation cross-entropy: **{best}** "
        f"({cells['validation_cross_entropy'].format('{:.4f}')}, n = {len(numbers[best])}). "
        f"Its test accuracy, the test split's only use in this study (it ranks nothing): "
        f"**{cells['test_accuracy'].format('{:.4f}')}**.\n"
    )


def _path_table(plan: Plan, numbers: Numbers) -> str:
    flag = plan.sweep.flag
    headings = [flag, "experiment", "n", *(COLUMNS[key][0] for key in PATH_COLUMNS)]
    rows = [
        [f"{strength:g}", name, str(len(numbers[name])), *_cells(numbers[name], PATH_COLUMNS)]
        for name, strength in path_points(plan).items()
    ]
    return f"## Regularization path: {flag} on top of {plan.reference}\n\n" + _table(headings, rows)


def path_points(plan: Plan) -> dict[str, float]:
    """The path's experiments by strength, weakest first: the reference at its own strength and
    each experiment of the sweep."""
    points = {plan.reference: float(plan.reference_strength), **plan.sweep_experiments()}
    return dict(sorted(points.items(), key=lambda item: item[1]))


def _cells(runs: BySeed, keys: Sequence[str]) -> list[str]:
    """Each column as `mean ± std` in its format; `-` where a run lacks it (no validation split)."""
    cells = spreads(runs, keys)
    return [cells[key].format(COLUMNS[key][1]) if key in cells else "-" for key in keys]


def _table(headings: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
