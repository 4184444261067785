"""The study's figures, drawn with matplotlib beside `study.md`: learning curves, the
regularization path, the first layer's kernel histograms (one panel an experiment) and its
near-zero share over training.

Curves come from the runs' event files, read back through TensorBoard's loader
(`events.scalar_series`), so a figure shows what TensorBoard shows; seeds are a band (mean ±
standard deviation) around their mean. A panel whose curves have a single point (one evaluation)
shows each experiment's value as a marker with its spread instead: a one-point line is invisible.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # Files only: a study runs on machines without a display.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from train_loop.model.models import NEAR_ZERO  # noqa: E402
from train_loop.outputs import events  # noqa: E402
from train_loop.outputs.runs import read_result  # noqa: E402
from train_loop.study import conclusions, report  # noqa: E402
from train_loop.study.conclusions import Numbers  # noqa: E402
from train_loop.study.plans import Plan  # noqa: E402
from train_loop.study.report import COLUMNS  # noqa: E402

# 8 inches at 150 dpi: 1200 pixels, so that at the ~800 pixels of a README or a docs page the
# 10-point text is about 14 pixels high, and sharp on a high-density screen.
DPI = 150
WIDTH = 8.0
# Dash patterns and hollow markers of two co-prime lengths: no two of the first 20 experiments look alike.
_DASHES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v")
Series = list[dict[int, float]]  # One experiment's curve, a {step: value} per seed.


def draw_all(plan: Plan, numbers: Numbers) -> list[str]:
    """Writes every figure the study has data for into its folder; returns their file names."""
    drawn = draw(plan, numbers)
    for name, figure in drawn.items():
        figure.savefig(f"{plan.folder}/{name}", dpi=DPI)
        plt.close(figure)
    return list(drawn)


def draw(plan: Plan, numbers: Numbers) -> dict[str, plt.Figure]:
    """Every figure the study has data for, by file name, not yet saved."""
    drawn = {
        "learning_curves.png": _learning_curves(plan, numbers),
        "first_layer_kernels.png": kernel_histograms(numbers),
        "near_zero_weights.png": _near_zero_over_training(plan, numbers),
    }
    if plan.sweep:
        drawn["regularization_path.png"] = _regularization_path(plan, numbers)
    return drawn


def line_styles(names: list[str]) -> dict[str, dict]:
    """Each experiment's look: its colour, dash pattern and hollow marker differ from the others',
    and each line is narrower than the one drawn before it, so where two curves coincide the later
    one runs inside the earlier one instead of covering it."""
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {
        name: {
            "color": colours[index % len(colours)],
            "linestyle": _DASHES[index % len(_DASHES)],
            "marker": _MARKERS[index % len(_MARKERS)],
            "fillstyle": "none",
            "markersize": 7,
            "linewidth": 3.5 * 0.8**index,
            "zorder": 2 + index,
        }
        for index, name in enumerate(names)
    }


def _learning_curves(plan: Plan, numbers: Numbers) -> plt.Figure:
    figure, axes = plt.subplots(1, 2, figsize=(WIDTH, 4), layout="constrained")
    styles = line_styles(list(numbers))
    run_dirs = plan.run_dirs()
    first_run = next(iter(next(iter(run_dirs.values())).values()))
    terms = report.data_terms(read_result(first_run)["train"])
    # A task's terms are summed, as the tables sum them; the classifier's one is its cross-entropy.
    label = "cross-entropy" if terms == ["cross_entropy"] else "sum of the loss terms"
    for axis, writer in zip(axes, ("train", "validation")):
        series = {
            name: [_summed_series(run_dir, writer, terms) for run_dir in by_seed.values()]
            for name, by_seed in run_dirs.items()
        }
        _curves(axis, series, styles)
        axis.set(title=f"{writer} {label}", ylabel=label)
    _legend(figure, axes[0])
    return figure


def _summed_series(run_dir: str, writer: str, terms: list[str]) -> dict[int, float]:
    """The sum of the loss terms `terms` by step, as `writer` logged them, at the steps it logged all."""
    by_term = [events.scalar_series(run_dir, writer, f"loss/{term}") for term in terms]
    steps = [step for step in by_term[0] if all(step in series for series in by_term)]
    return {step: sum(series[step] for series in by_term) for step in steps}


def _near_zero_over_training(plan: Plan, numbers: Numbers) -> plt.Figure:
    figure, axis = plt.subplots(figsize=(WIDTH, 4), layout="constrained")
    series = {
        name: [
            events.scalar_series(run_dir, "train", f"sparsity/{next(iter(numbers[name].values())).layer_path}")
            for run_dir in by_seed.values()
        ]
        for name, by_seed in plan.run_dirs().items()
    }
    _curves(axis, series, line_styles(list(numbers)))
    axis.set(title=f"first layer: share of |w| < {NEAR_ZERO:g} (sparsity/<layer>)", ylabel="share")
    _legend(figure, axis)
    return figure


def kernel_histograms(numbers: Numbers) -> plt.Figure:
    """Where the first layer's weights end up, every seed pooled: one panel an experiment (five
    histograms on one axis hide one another), the reference in grey behind each other panel."""
    kernels = {name: np.concatenate([run.kernel.ravel() for run in runs.values()]) for name, runs in numbers.items()}
    limit = max(float(np.abs(values).max()) for values in kernels.values())
    bins = np.linspace(-limit, limit, 61)
    columns = math.ceil(math.sqrt(len(kernels)))
    rows = math.ceil(len(kernels) / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(WIDTH, 0.6 + 2.2 * rows), sharex=True, sharey=True, layout="constrained", squeeze=False
    )
    reference, *_ = kernels
    shares = {name: conclusions.spreads(runs, ["kernel_small_share"]) for name, runs in numbers.items()}
    styles = line_styles(list(kernels))
    for axis, (name, values) in zip(axes.flat, kernels.items()):
        if name != reference:
            axis.hist(kernels[reference], bins=bins, color="0.8", label=reference)
        axis.hist(values, bins=bins, histtype="step", linewidth=1.5, color=styles[name]["color"])
        share = COLUMNS["kernel_small_share"][1].format(shares[name]["kernel_small_share"].mean)
        axis.set_title(f"{name}\n{share} with |w| < {NEAR_ZERO:g}", fontsize="medium")
        axis.set_yscale("log")
    for axis in axes.flat[len(kernels) :]:
        axis.remove()  # A grid has more cells than experiments: an empty panel would read as one with no weights.
    layer = next(iter(next(iter(numbers.values())).values())).layer_path
    figure.suptitle(f"{layer} kernel at the end of training (grey: {reference})")
    figure.supxlabel("w")
    figure.supylabel("weights")
    return figure


def _regularization_path(plan: Plan, numbers: Numbers) -> plt.Figure:
    points = conclusions.path_points(plan)
    strengths = list(points.values())
    figure, axes = plt.subplots(2, 2, figsize=(WIDTH, 6), layout="constrained")
    for axis, key in zip(axes.flat, conclusions.PATH_COLUMNS):
        cells = [conclusions.spreads(numbers[name], [key])[key] for name in points]
        axis.errorbar(
            strengths, [cell.mean for cell in cells], yerr=[cell.std or 0.0 for cell in cells], marker="o", capsize=3
        )
        # symlog: the reference's strength is often 0, which a log axis cannot show.
        positive = [strength for strength in strengths if strength > 0]
        axis.set_xscale("symlog", linthresh=min(positive) if positive else 1.0)
        axis.set(title=COLUMNS[key][0], xlabel=plan.sweep.flag)
    return figure


def _curves(axis: plt.Axes, series: dict[str, Series], styles: dict[str, dict]) -> None:
    """Each experiment's curve against step; at a single step, its value as a marker instead."""
    steps = {name: _common_steps(runs) for name, runs in series.items()}
    if all(len(found) <= 1 for found in steps.values()):
        _markers(axis, series, styles)
        return
    for index, (name, runs) in enumerate(series.items()):
        _band(axis, name, runs, steps[name], styles[name], offset=index)
    axis.set_xlabel("step")


def _markers(axis: plt.Axes, series: dict[str, Series], styles: dict[str, dict]) -> None:
    """One evaluation: each experiment's value (± the seeds' standard deviation) at a place of its
    own along x, so markers of close values sit side by side instead of on top of each other."""
    for place, (name, runs) in enumerate(series.items()):
        values = [value for points in runs for value in points.values()]
        spread = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        style = {key: value for key, value in styles[name].items() if key not in ("linestyle", "linewidth")}
        axis.errorbar([place], [np.mean(values)], yerr=[spread], capsize=4, label=name, **style)
    steps = sorted({step for runs in series.values() for points in runs for step in points})
    axis.set_xticks(range(len(series)), list(series), rotation=30, ha="right")
    axis.set_xlim(-0.5, len(series) - 0.5)
    axis.set_xlabel(f"at step {', '.join(map(str, steps))}")


def _band(axis: plt.Axes, label: str, runs: Series, steps: list[int], style: dict, *, offset: int) -> None:
    """The mean over seeds as a line, ± the standard deviation as a band (none from one seed);
    about ten markers a line, each line's shifted so they do not land on one another's."""
    values = np.array([[points[step] for step in steps] for points in runs])
    mean = values.mean(axis=0)
    every = max(1, len(steps) // 10)
    axis.plot(steps, mean, label=label, markevery=(offset % every, every), **style)
    if len(runs) > 1:
        spread = values.std(axis=0, ddof=1)
        axis.fill_between(steps, mean - spread, mean + spread, color=style["color"], alpha=0.15, linewidth=0)


def _common_steps(runs: Series) -> list[int]:
    return sorted(set.intersection(*(set(points) for points in runs)))


def _legend(figure: plt.Figure, axis: plt.Axes) -> None:
    """One legend under the panels, where it covers no curve."""
    handles, labels = axis.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize="small")
