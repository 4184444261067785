"""The study speaks for itself: a one-seed study says so once, study.md's findings are sentences
that agree with its own tables, and the figures are small multiples of lines that do not hide one
another, readable with one evaluation and at a README's width.

The quick tests build the study's numbers (`report.RunNumbers`) by hand, with values chosen so
that each case is hit (higher, lower, the same; beyond and within the spread); one slow test reads
them from a real one-seed study on digits. Every check recomputes from the per-seed values, not
from the code under test.
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.patches import Polygon
from test_study import parse_sections, parse_table, run_module, run_numbers

from train_loop.study import figures, plans, report, writeup

NOTICE = "**One seed.**"
SHARE = "abs w < 0.001"
# Each clause of a findings sentence, as writeup writes it: what, its value, and against the reference.
CLAUSE = re.compile(
    r"(?P<what>validation cross-entropy|validation accuracy|near-zero share of conv1's kernel \(abs w < 0\.001\))"
    r" (?P<ours>[0-9.]+%?)"
    r"(?:, (?:(?P<size>[0-9.]+)(?P<points> percentage points)? (?P<direction>higher|lower) than|the same as)"
    r" (?P<reference>\w+)'s (?P<theirs>[0-9.]+%?))?"
    r"(?: \((?P<verdict>beyond|within) the seed spread\))?"
)
HEADINGS = {
    "validation cross-entropy": "val CE",
    "validation accuracy": "val acc",
    "near-zero share of conv1's kernel (abs w < 0.001)": SHARE,
}


def synthetic_run(val_ce: float, val_acc: float, zeros: int, seed: int) -> report.RunNumbers:
    """One run's numbers as `report.read_run` gives them, with a 3x3x1x32 kernel holding `zeros` zeros."""
    kernel = np.random.default_rng(seed).uniform(0.01, 0.2, size=(3, 3, 1, 32)) * np.where(
        np.arange(288) < zeros, 0, 1
    ).reshape(3, 3, 1, 32)
    row = {key: 0.5 for key in report.COLUMNS}
    row.update(validation_cross_entropy=val_ce, validation_accuracy=val_acc, kernel_small_share=zeros / kernel.size)
    return report.RunNumbers(row, "conv1", kernel)


# Two seeds: dropout lowers the cross-entropy on both (beyond the spread) and raises the accuracy
# by 1.5 standard errors of the paired difference (+0.0050 and +0.0010: within 2); l1 raises the
# cross-entropy on both, leaves the accuracy exactly the reference's (the same) and zeroes a
# third of the kernel.
TWO_SEEDS = {
    "baseline": {0: (0.3012, 0.9020, 1), 1: (0.3104, 0.8950, 2)},
    "dropout": {0: (0.2811, 0.9070, 2), 1: (0.2895, 0.8960, 4)},
    "l1": {0: (0.4012, 0.9020, 100), 1: (0.3904, 0.8950, 120)},
}
ONE_SEED = {name: {None: by_seed[0]} for name, by_seed in TWO_SEEDS.items()}


def numbers_of(values: dict) -> dict[str, dict[int | None, report.RunNumbers]]:
    return {
        name: {seed: synthetic_run(*run, seed=seed or 0) for seed, run in by_seed.items()}
        for name, by_seed in values.items()
    }


def raw_of(values: dict) -> dict[str, list[dict[str, float]]]:
    """The per-seed values by the table's headings, as the tests recompute from."""
    return {
        name: [{"val CE": ce, "val acc": acc, SHARE: zeros / 288} for ce, acc, zeros in by_seed.values()]
        for name, by_seed in values.items()
    }


def plan_of(tmp_path: Path, values: dict) -> plans.Plan:
    seeds = [seed for seed in next(iter(values.values())) if seed is not None] or None
    return plans.make_plan({name: [] for name in values}, folder=str(tmp_path / "mine"), seeds=seeds, sweep=None)


def check_findings(markdown: str, raw: dict[str, list[dict[str, float]]]) -> int:
    """Checks every clause of the findings against the tables and the per-seed values; returns the
    number of clauses checked."""
    sections = parse_sections(markdown)
    means = {name: [cell.split(" ± ")[0] for cell in cells] for name, cells in parse_table(sections[""]).items()}
    columns = means.pop("experiment")
    (comparison_heading,) = [heading for heading in sections if heading.startswith("Against the reference")]
    compared = parse_table(sections[comparison_heading])
    compared_headings = compared.pop("experiment")
    reference, *others = raw
    lines = [line for line in sections["Findings"].splitlines() if line.startswith("- ")]
    assert [line.split("**")[1] for line in lines] == list(raw)
    checked = 0
    for line in lines:
        name = line.split("**")[1]
        clauses = line.split(": ", 1)[1].removesuffix(".").split("; ")
        assert [CLAUSE.fullmatch(clause) is not None for clause in clauses] == [True] * 3, clauses
        for clause in map(CLAUSE.fullmatch, clauses):
            heading = HEADINGS[clause["what"]]
            assert clause["ours"] == means[name][columns.index(heading)]
            if name == reference:
                assert clause["theirs"] is None and clause["verdict"] is None
                continue
            check_change(clause, raw[name], raw[reference], heading, reference=reference)
            assert clause["theirs"] == means[reference][columns.index(heading)]
            if heading != SHARE:  # The comparison table holds the same difference and verdict.
                cells = compared[name][
                    compared_headings.index(f"Δ {heading}" + ("" if len(raw[name]) == 1 else " (mean ± s.e.)")) :
                ]
                assert (clause["size"] or "0.0000") == cells[0].split(" ± ")[0].lstrip("+-")
                if clause["verdict"]:
                    assert cells[1] == {"beyond": "yes", "within": "no"}[clause["verdict"]]
            checked += 1
    assert checked == 3 * len(others)
    return checked


def check_change(
    clause: re.Match, runs: list[dict], reference_runs: list[dict], heading: str, *, reference: str
) -> None:
    """The size, direction and verdict of one clause, recomputed from the per-seed values."""
    differences = [run[heading] - base[heading] for run, base in zip(runs, reference_runs)]
    mean = float(np.mean(differences))
    size = f"{abs(mean) * 100:.1f}" if heading == SHARE else f"{abs(mean):.4f}"
    assert clause["reference"] == reference
    if float(size) == 0:
        assert clause["size"] is None and clause["direction"] is None  # "the same as"
    else:
        assert (clause["size"], clause["direction"]) == (size, "higher" if mean > 0 else "lower")
        assert (clause["points"] is not None) == (heading == SHARE)
    if len(differences) == 1:
        assert clause["verdict"] is None  # One seed cannot tell.
    else:
        error = np.std(differences, ddof=1) / math.sqrt(len(differences))
        assert clause["verdict"] == ("beyond" if abs(mean) > 2 * error else "within")


def test_two_seed_findings_agree_with_the_tables_and_the_spread_rule(tmp_path):
    markdown = writeup.markdown(plan_of(tmp_path, TWO_SEEDS), numbers_of(TWO_SEEDS), [])
    assert check_findings(markdown, raw_of(TWO_SEEDS)) == 6
    findings = parse_sections(markdown)["Findings"]
    # Each case is hit, as the values were chosen: lower and beyond, higher within, the same, higher and beyond.
    assert "validation cross-entropy 0.2853, 0.0205 lower than baseline's 0.3058 (beyond the seed spread)" in findings
    assert "validation accuracy 0.9015, 0.0030 higher than baseline's 0.8985 (within the seed spread)" in findings
    assert "validation accuracy 0.8985, the same as baseline's 0.8985" in findings
    assert "0.0900 higher than baseline's 0.3058 (beyond the seed spread)" in findings
    assert "38.2%, 37.7 percentage points higher than baseline's 0.5%" in findings
    assert NOTICE not in markdown and "Rule: " in markdown
    assert "Each cell is the mean ± the sample standard deviation over the seeds (n runs)." in markdown


def test_a_one_seed_study_says_so_once_at_the_top_and_judges_no_difference(tmp_path):
    markdown = writeup.markdown(plan_of(tmp_path, ONE_SEED), numbers_of(ONE_SEED), [])
    assert check_findings(markdown, raw_of(ONE_SEED)) == 6
    check_one_seed_notice(markdown)


def check_one_seed_notice(markdown: str) -> None:
    """Once, right under the title, naming the flag that would separate effects from noise; no table
    cell says "one seed", and no column or rule asks for a spread that one seed does not have."""
    assert markdown.count(NOTICE) == 1 and markdown.count("seed-to-seed noise") == 1
    title, notice, *_ = markdown.split("\n\n")
    assert title.startswith("# Study ") and notice.startswith(f"> {NOTICE}")
    assert f"`--{plans.SEEDS_FLAG}=0,1,2`" in notice and plans.SEEDS_FLAG == "seeds"
    cells = [cell.strip() for line in markdown.splitlines() if line.startswith("| ") for cell in line.split("|")]
    assert not [cell for cell in cells if "seed" in cell or cell in ("yes", "no")]
    assert "beyond the spread" not in markdown and "Rule: " not in markdown
    assert "standard deviation" not in markdown and "Each cell is the one run's value." in markdown


def test_kernel_histograms_are_one_panel_an_experiment(tmp_path):
    """Five experiments: five panels (of a 2 x 3 grid, the empty cell removed), each its own
    histogram over the reference's in grey, the same bins and axes everywhere; saved at 1200 pixels wide."""
    values = {**TWO_SEEDS, "l2": TWO_SEEDS["dropout"], "l1l2": TWO_SEEDS["l1"]}
    figure = figures.kernel_histograms(numbers_of(values))
    assert [axis.get_title().split("\n")[0] for axis in figure.axes] == list(values)
    # Its own histogram (a step outline), and the reference's bars behind it in every other panel.
    drawn = [(len(axis.containers), sum(isinstance(patch, Polygon) for patch in axis.patches)) for axis in figure.axes]
    assert drawn == [(0, 1), (1, 1), (1, 1), (1, 1), (1, 1)]
    assert len({axis.get_xlim() for axis in figure.axes}) == 1 and len({axis.get_ylim() for axis in figure.axes}) == 1
    assert figure.axes[3].get_title() == "l2\n1.0% with |w| < 0.001"  # The mean share over its 2 seeds: 3 of 288.
    figure.savefig(tmp_path / "kernels.png", dpi=figures.DPI)
    assert png_size_and_dpi(tmp_path / "kernels.png") == (1200, 750, 150)
    four = figures.kernel_histograms(numbers_of(dict(list(values.items())[:4])))
    assert len(four.axes) == 4  # 2 x 2: no cell left over.
    plt.close(figure)
    plt.close(four)


def test_line_styles_differ_and_narrow_so_no_line_hides_another():
    styles = figures.line_styles([f"e{index}" for index in range(20)])
    assert len({(style["linestyle"], style["marker"]) for style in styles.values()}) == 20
    widths = [style["linewidth"] for style in styles.values()]
    assert all(earlier > later > 0 for earlier, later in zip(widths, widths[1:]))
    assert {style["fillstyle"] for style in styles.values()} == {
        "none"
    }  # Hollow: a marker does not cover one under it.


def png_size_and_dpi(path: Path) -> tuple[int, int, int]:
    """Width and height in pixels, and the dots per inch of the PNG's pHYs chunk."""
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", data[16:24])
    offset = 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        body = data[offset + 8 : offset + 8 + length]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])[0]
        if kind == b"pHYs":
            per_metre, _, unit = struct.unpack(">IIB", body)
            assert unit == 1
            return width, height, round(per_metre * 0.0254)
        offset += 12 + length
    raise AssertionError(f"{path} has no pHYs chunk")


@pytest.mark.slow
def test_a_real_one_seed_study_speaks_for_itself(tmp_path):
    """Two experiments on digits, one epoch, one seed: one evaluation of each, which the curves
    show as markers, one each at a place of its own."""
    experiments = ["baseline", "l1"]
    flags = ["--dataset=digits", "--epochs=1"]
    done = run_module(
        "train_loop.study",
        f"--experiments={','.join(experiments)}",
        *flags,
        f"--logdir={tmp_path}",
        "--study_name=mine",
    )
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "mine"
    markdown = (folder / "study.md").read_text()
    check_one_seed_notice(markdown)
    assert check_findings(markdown, {name: [run_numbers(folder / name)] for name in experiments}) == 3
    drawn = {
        "learning_curves.png": (1200, 600),
        "first_layer_kernels.png": (1200, 420),
        "near_zero_weights.png": (1200, 600),
    }
    for name, size in drawn.items():
        assert f"![{name}]({name})" in markdown
        assert png_size_and_dpi(folder / name) == (*size, 150), name
    plan = plans.make_plan(plans.experiment_flags(experiments, flags), folder=str(folder), seeds=None, sweep=None)
    shown = figures.draw(plan, {name: {None: report.read_run(str(folder / name))} for name in experiments})
    assert [len(figure.axes) for figure in shown.values()] == [2, 2, 1]
    for axis in shown["learning_curves.png"].axes:  # One evaluation: a marker each, side by side.
        points = {container.get_label(): container.lines[0] for container in axis.containers}  # errorbar's
        assert [(list(line.get_xdata()), line.get_marker(), line.get_markersize()) for line in points.values()] == [
            ([0], "o", 7),
            ([1], "s", 7),
        ]
        assert list(points) == experiments
        assert [label.get_text() for label in axis.get_xticklabels()] == experiments
    (axis,) = shown["near_zero_weights.png"].axes  # Sparsity is logged at step 0 too: two points, a line each.
    lines = {line.get_label(): line for line in axis.lines}
    assert [len(line.get_xdata()) for line in lines.values()] == [2, 2] and list(lines) == experiments
    assert lines["baseline"].get_linewidth() > lines["l1"].get_linewidth()
    assert lines["baseline"].get_linestyle() != lines["l1"].get_linestyle()
    for figure in shown.values():
        plt.close(figure)
