"""`study.md`: a study's findings as markdown, from `conclusions`: a one-seed study's warning,
the table of experiments, the findings in sentences, the paired differences, the selection, the
regularization path and links to the figures."""

from __future__ import annotations

import os
from collections.abc import Sequence

from train_loop.model.models import NEAR_ZERO
from train_loop.study.conclusions import (
    COMPARED,
    PATH_COLUMNS,
    RULE,
    STUDY_COLUMNS,
    BySeed,
    Numbers,
    paired,
    path_points,
    select,
    sentences,
    spreads,
)
from train_loop.study.plans import SEEDS_FLAG, Plan
from train_loop.study.report import COLUMNS


def markdown(plan: Plan, numbers: Numbers, figures: Sequence[str]) -> str:
    """`study.md`: the tables, the sentences that read them, the rule they use, the selection, and
    links to the figures."""
    seeds = ", ".join(str(seed) for seed in plan.seeds if seed is not None) or "the one given by --seed"
    parts = [
        f"# Study {os.path.basename(os.path.normpath(plan.folder))}\n",
        one_seed_notice() if _one_seed(plan) else "",
        f"Seeds: {seeds}. {_cell_meaning(plan)} The train columns are the last epoch's means, the "
        f"validation ones the final model's, and `abs w < {NEAR_ZERO:g}` is the share of the first "
        "layer's kernel that is nearly zero.\n",
        _experiments_table(numbers),
        _findings(plan, numbers),
        _comparison(plan, numbers),
        _selection(numbers),
    ]
    if plan.sweep:
        parts.append(_path_table(plan, numbers))
    parts.append("## Figures\n\n" + "\n".join(f"![{name}]({name})" for name in figures) + "\n" if figures else "")
    return "\n".join(part for part in parts if part)


def _cell_meaning(plan: Plan) -> str:
    """What a table's cell is: one run's value at one seed, with no spread to give."""
    if _one_seed(plan):
        return "Each cell is the one run's value."
    return "Each cell is the mean ± the sample standard deviation over the seeds (n runs)."


def one_seed_notice() -> str:
    """Said once, at the top, rather than in every cell: one run an experiment has no seed-to-seed
    spread, so no difference in this study can be told from a seed's luck."""
    return (
        "> **One seed.** Each experiment was trained once, so this study cannot separate an effect "
        "from seed-to-seed noise: any difference below may be a seed's luck. "
        f"`--{SEEDS_FLAG}=0,1,2` trains each experiment at several seeds and says which differences "
        "are beyond the seed spread (the runs already trained are not reused: they are named without a seed).\n"
    )


def _one_seed(plan: Plan) -> bool:
    return len(plan.seeds) < 2


def _findings(plan: Plan, numbers: Numbers) -> str:
    if _one_seed(plan):
        lead = "From one run each; no difference is judged against the seed spread (see the note at the top)."
    else:
        lead = f"Means over {len(plan.seeds)} seeds; beyond the seed spread or within it by the rule below."
    return (
        "## Findings\n\n" + lead + "\n\n" + "\n".join(f"- {said}" for said in sentences(numbers, plan.reference)) + "\n"
    )


def _experiments_table(numbers: Numbers) -> str:
    headings = ["experiment", "n", *(COLUMNS[key][0] for key in STUDY_COLUMNS)]
    rows = [[name, str(len(runs)), *_cells(runs, STUDY_COLUMNS)] for name, runs in numbers.items()]
    return _table(headings, rows)


def _comparison(plan: Plan, numbers: Numbers) -> str:
    """Experiment minus reference, seed by seed; with one seed, the differences alone (the notice at
    the top says why there is no verdict), not "one seed" in every cell."""
    reference, judged = numbers[plan.reference], not _one_seed(plan)
    compared = list(spreads(reference, COMPARED))  # A task without accuracy compares its data terms alone.
    headings = ["experiment"]
    for key in compared:
        headings += [f"Δ {COLUMNS[key][0]} (mean ± s.e.)", "beyond the spread"] if judged else [f"Δ {COLUMNS[key][0]}"]
    rows = []
    for name in list(numbers)[1:]:
        row = [name]
        for key in compared:
            difference = paired(numbers[name], reference, key)
            error = difference.standard_error
            row.append(f"{difference.mean:+.4f}" + ("" if error is None else f" ± {error:.4f}"))
            row += [{True: "yes", False: "no"}[difference.beyond_spread]] if judged else []
        rows.append(row)
    rule = f"Rule: {RULE}.\n\n" if judged else ""
    heading = f"## Against the reference, {plan.reference}, seed by seed\n\n{rule}"
    return heading + _table(headings, rows) if rows else ""


def _selection(numbers: Numbers) -> str:
    best = select(numbers)
    cells = spreads(numbers[best], ["validation_cross_entropy", "test_accuracy", "test_cross_entropy"])
    # A task without accuracy (`--loss`, `--task`) is ranked and tested on the sum of its data terms.
    ranked, tested = (
        ("cross-entropy", "accuracy")
        if "test_accuracy" in cells
        else ("sum of the loss terms", "sum of the loss terms")
    )
    test = cells["test_accuracy" if "test_accuracy" in cells else "test_cross_entropy"]
    return (
        f"## Selection\n\nBest by validation {ranked}: **{best}** "
        f"({cells['validation_cross_entropy'].format('{:.4f}')}, n = {len(numbers[best])}). "
        f"Its test {tested}, the test split's only use in this study (it ranks nothing): "
        f"**{test.format('{:.4f}')}**.\n"
    )


def _path_table(plan: Plan, numbers: Numbers) -> str:
    flag = plan.sweep.flag
    headings = [flag, "experiment", "n", *(COLUMNS[key][0] for key in PATH_COLUMNS)]
    rows = [
        [f"{strength:g}", name, str(len(numbers[name])), *_cells(numbers[name], PATH_COLUMNS)]
        for name, strength in path_points(plan).items()
    ]
    return f"## Regularization path: {flag} on top of {plan.reference}\n\n" + _table(headings, rows)


def _cells(runs: BySeed, keys: Sequence[str]) -> list[str]:
    """Each column as `mean ± std` in its format; `-` where a run lacks it (no validation split)."""
    cells = spreads(runs, keys)
    return [cells[key].format(COLUMNS[key][1]) if key in cells else "-" for key in keys]


def _table(headings: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
