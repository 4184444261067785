"""The benchmark's smoke test: `--quick` prints its table and one JSON line; and the table's
lines for the rows the smoke test leaves out, from figures given.

No speed is asserted here (CI machines vary); BENCHMARKS.md holds the figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from train_loop.bench import rounds, table
from train_loop.data import named_sets

# The smoke test's contenders: the forced-XLA pair is left out, so that the two ratio rows cost no
# more time than it did (their line is checked from figures below).
_SMOKE = ("keras_fit", "keras_fit_nojit", "train_loop", "train_loop_streamed", "train_loop_accumulation")


@pytest.mark.slow  # trains a model in each of five processes
def test_quick_benchmark_reports_every_figure():
    # --steps=20: the fewest the bench takes; the figures' shapes and relations are the subject here.
    # One round: the choice of the fastest of several is tested below, on figures given.
    # Fashion-MNIST where its files are (CI installs them), for the streamed row; else synthetic data.
    command = [
        sys.executable,
        "-m",
        "train_loop.bench",
        "--quick",
        "--dataset=fashion_mnist",
        f"--contenders={','.join(_SMOKE)}",
        "--rounds=1",
        "--steps=20",
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert finished.returncode == 0, finished.stderr[-3000:]
    figures = json.loads(finished.stdout.strip().splitlines()[-1])
    assert figures["steps"] == 20
    streamed = figures["dataset"] == "fashion_mnist"
    assert streamed or not os.path.isdir(named_sets.DEBIAN_FASHION_MNIST)
    assert figures["skipped"] == ({} if streamed else {"train_loop_streamed": _MISSING})
    timed = [name for name in _SMOKE if streamed or name != "train_loop_streamed"]
    assert set(timed) < set(figures) and "train_loop_xla" not in figures
    for contender in timed:
        assert figures[contender]["rounds"] == [figures[contender]["examples_per_second"]]
        assert figures[contender]["examples_per_second"] > 0
        assert 2**20 < figures[contender]["peak_rss_bytes"] < 2**40
    assert figures["training_flops_per_example"] == 23_331_840  # pinned: the convnet's shapes
    assert figures["peak_flops_per_second"]["float32"] > figures["achieved_flops_per_second"] > 0
    assert figures["cpu"] and figures["cores"] >= 1
    phases = figures["train_loop"]["seconds"]
    assert {"imports", "data", "decide_xla", "first_step", "training", "summaries", "evaluation", "save_model"} <= set(
        phases
    )
    assert phases["total"] >= phases["training"] > phases["summaries"] > 0
    assert "| Keras 3 fit, jit_compile=False" in finished.stdout
    assert figures["keras_fit_nojit"]["jit_compile"] is False
    keras_xla = "on" if figures["keras_fit"]["jit_compile"] else "off"  # Keras' own "auto": off without accelerators.
    assert f"| Keras 3 fit, default (chose XLA {keras_xla})" in finished.stdout
    assert "the forced runs found XLA" not in finished.stdout  # Not chosen, so not timed.
    assert figures["train_loop_accumulation"]["peak_rss_bytes"] > 0
    speed = figures["train_loop"]["examples_per_second"]
    ratio = figures["train_loop_accumulation"]["examples_per_second"] / speed
    assert f"--accumulation_steps=4: {ratio:.2f}x the examples/s of K=1 at batch 32" in finished.stdout
    if streamed:
        ratio = figures["train_loop_streamed"]["examples_per_second"] / speed
        assert (
            f"streamed from TFRecord shards: {ratio:.2f}x the examples/s of the same data in memory" in finished.stdout
        )
    else:
        assert f"streamed from TFRecord shards: skipped, {_MISSING}" in finished.stdout
    assert "summaries and histograms at the default cadence: " in finished.stdout
    assert "fastest of 1 interleaved round(s)" in finished.stdout and "slowest round ran " not in finished.stdout


def test_each_contender_keeps_its_fastest_of_the_interleaved_rounds(capsys):
    """Whole rounds one after another (every contender once a round), each contender's fastest
    kept with its figures, and the table's line of the spread between rounds."""
    speeds = [{"keras_fit": 900.0, "train_loop": 1200.0}, {"keras_fit": 1000.0, "train_loop": 1100.0}]
    calls = []

    def one_round() -> dict:
        calls.append(len(calls))
        return {
            name: {"examples_per_second": speed, "round": len(calls)} for name, speed in speeds[len(calls) - 1].items()
        }

    fastest = rounds.fastest_rounds(one_round, 2)
    assert calls == [0, 1]
    assert fastest == {
        "keras_fit": {"examples_per_second": 1000.0, "round": 2, "rounds": [900.0, 1000.0]},
        "train_loop": {"examples_per_second": 1200.0, "round": 1, "rounds": [1200.0, 1100.0]},
    }


_MISSING = "it streams Fashion-MNIST, whose files are missing (apt-get install dataset-fashion-mnist)"


def test_table_compares_the_forced_xla_runs_and_says_why_a_row_was_skipped(capsys):
    run = {"examples_per_second": 1000.0, "peak_rss_bytes": 2**30, "rounds": [1000.0, 800.0]}
    default = {**run, "jit_compile": False, "seconds_to_first_step": 9.0}
    default["seconds"] = {"imports": 5.0, "training": 2.0, "summaries": 0.1}
    figures = {
        "cpu": "a CPU",
        "cpu_features": [],
        "cores": 2,
        "dataset": "synthetic",
        "batch_size": 30,
        "precision": "float32",
        "steps": 20,
        "rounds": 2,
        "keras_fit": {**run, "jit_compile": False},
        "train_loop": default,
        "train_loop_xla": {**run, "examples_per_second": 1250.0},
        "train_loop_noxla": {**run, "examples_per_second": 800.0},
        "skipped": {
            "train_loop_streamed": "it streams Fashion-MNIST, and --dataset=synthetic was given",
            "train_loop_accumulation": "--batch_size=30 does not split into 4 micro-batches",
        },
        "training_flops_per_example": 1,
        "achieved_flops_per_second": 1,
        "peak_flops_per_second": {"float32": 2},
        "utilization": 0.5,
    }
    table.print_table(figures)
    printed = capsys.readouterr().out
    assert "auto chose XLA off; the forced runs found XLA on faster (1,250 vs 800 examples/s); " in printed
    assert "auto's own run: 0.80x the faster" in printed
    assert "fastest of 2 interleaved round(s)" in printed
    assert "each contender's slowest round ran 20-20% below its fastest" in printed
    assert (
        "streamed from TFRecord shards: skipped, it streams Fashion-MNIST, and --dataset=synthetic was given" in printed
    )
    assert "--accumulation_steps=4: skipped, --batch_size=30 does not split into 4 micro-batches" in printed


def test_contenders_without_a_baseline_are_one_line():
    """Refused while the flags are parsed, before TensorFlow starts: one line, exit 2."""
    finished = subprocess.run(
        [sys.executable, "-m", "train_loop.bench", "--contenders=train_loop"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert (finished.returncode, finished.stdout) == (2, ""), finished.stderr
    [line] = finished.stderr.splitlines()
    assert line.startswith("train_loop: error: flag --contenders=")
    assert line.endswith("keras_fit and train_loop among them. Run with --helpfull to see every flag.")
