"""The study's figures, drawn with matplotlib beside `study.md`: learning curves, the
regularization path, the first layer's kernel histograms and its near-zero share over training.

Curves come from the runs' event files, read back through TensorBoard's loader
(`events.scalar_series`), so a figure shows what TensorBoard shows; seeds are a band (mean ±
standard deviation) around their mean.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # Files only: a study runs on machines without a display.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from train_loop.model.models import NEAR_ZERO  # noqa: E402
from train_loop.outputs import events
from train_loop.study import conclusions  # noqa: E402
from train_loop.study.conclusions import Numbers  # noqa: E402
from train_loop.study.plans import Plan  # noqa: E402
from train_loop.study.report import COLUMNS  # noqa: E402

_DPI = 80  # Small files: the figures are read beside a table, not printed.


def draw_all(plan: Plan, numbers: Numbers) -> list[str]:
    """Writes every figure the study has data for into its folder; returns their file names."""
    drawn = {
        "learning_curves.png": _learning_curves(plan, numbers),
        "first_layer_kernels.png": _kernel_histograms(numbers),
        "near_zero_weights.png": _near_zero_over_training(plan, numbers),
    }
    if plan.sweep:
        drawn["regularization_path.png"] = _regularization_path(plan, numbers)
    for name, figure in drawn.items():
        figure.savefig(f"{plan.folder}/{name}", dpi=_DPI)
        plt.close(figure)
    return list(drawn)


def _learning_curves(plan: Plan, numbers: Numbers) -> plt.Figure:
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True, layout="constrained")
    for axis, writer in zip(axes, ("train", "validation")):
        for name in numbers:
            _band(
                axis,
                name,
                [
                    events.scalar_series(run_dir, writer, "loss/cross_entropy")
                    for run_dir in plan.run_dirs()[name].values()
                ],
            )
        axis.set(title=f"{writer} cross-entropy", xlabel="step")
    axes[0].set_ylabel("cross-entropy")
    axes[1].legend(fontsize="small")
    return figure


def _near_zero_over_training(plan: Plan, numbers: Numbers) -> plt.Figure:
    figure, axis = plt.subplots(figsize=(6, 4), layout="constrained")
    for name, runs in numbers.items():
        layer = next(iter(runs.values())).layer_path
        _band(
            axis,
            name,
            [events.scalar_series(run_dir, "train", f"sparsity/{layer}") for run_dir in plan.run_dirs()[name].values()],
        )
    axis.set(title=f"first layer: share of |w| < {NEAR_ZERO:g} (sparsity/<layer>)", xlabel="step", ylabel="share")
    axis.legend(fontsize="small")
    return figure


def _kernel_histograms(numbers: Numbers) -> plt.Figure:
    """The original study's picture: where the first layer's weights end up, every seed pooled."""
    kernels = {name: np.concatenate([run.kernel.ravel() for run in runs.values()]) for name, runs in numbers.items()}
    limit = max(float(np.abs(values).max()) for values in kernels.values())
    bins = np.linspace(-limit, limit, 81)
    figure, axis = plt.subplots(figsize=(6, 4), layout="constrained")
    for name, values in kernels.items():
        axis.hist(values, bins=bins, histtype="step", label=name)
    layer = next(iter(next(iter(numbers.values())).values())).layer_path
    axis.set(title=f"{layer} kernel at the end of training", xlabel="w", ylabel="weights", yscale="log")
    axis.legend(fontsize="small")
    return figure


def _regularization_path(plan: Plan, numbers: Numbers) -> plt.Figure:
    points = conclusions.path_points(plan)
    strengths = list(points.values())
    figure, axes = plt.subplots(1, len(conclusions.PATH_COLUMNS), figsize=(14, 3.6), layout="constrained")
    for axis, key in zip(axes, conclusions.PATH_COLUMNS):
        cells = [conclusions.spreads(numbers[name], [key])[key] for name in points]
        axis.errorbar(
            strengths, [cell.mean for cell in cells], yerr=[cell.std or 0.0 for cell in cells], marker="o", capsize=3
        )
        # symlog: the reference's strength is often 0, which a log axis cannot show.
        positive = [strength for strength in strengths if strength > 0]
        axis.set_xscale("symlog", linthresh=min(positive) if positive else 1.0)
        axis.set(title=COLUMNS[key][0], xlabel=plan.sweep.flag)
    return figure


def _band(axis: plt.Axes, label: str, series: list[dict[int, float]]) -> None:
    """The mean over seeds as a line, ± the standard deviation as a band (none from one seed)."""
    steps = sorted(set.intersection(*(set(points) for points in series)))
    values = np.array([[points[step] for step in steps] for points in series])
    mean = values.mean(axis=0)
    (line,) = axis.plot(steps, mean, label=label, marker="." if len(steps) < 3 else None)
    if len(series) > 1:
        spread = values.std(axis=0, ddof=1)
        axis.fill_between(steps, mean - spread, mean + spread, color=line.get_color(), alpha=0.2)
