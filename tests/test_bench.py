"""The benchmark's smoke test: `--quick` on synthetic data prints its table and one JSON line.

No speed is asserted here (CI machines vary); BENCHMARKS.md holds the figures.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # every test here trains a model


def test_quick_benchmark_reports_every_figure():
    # --steps=20: the fewest the bench takes; the figures' shapes and relations are the subject here.
    command = [sys.executable, "-m", "train_loop.bench", "--quick", "--dataset=synthetic", "--rounds=2", "--steps=20"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert finished.returncode == 0, finished.stderr[-3000:]
    figures = json.loads(finished.stdout.strip().splitlines()[-1])
    assert figures["dataset"] == "synthetic" and figures["steps"] == 20
    for contender in ("keras_fit", "keras_fit_nojit", "train_loop", "train_loop_xla", "train_loop_noxla"):
        # Each contender ran twice, interleaved, and reports its faster round.
        rounds = figures[contender]["rounds"]
        assert len(rounds) == 2 and figures[contender]["examples_per_second"] == max(rounds) > 0
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
    xla, no_xla = (figures[name]["examples_per_second"] for name in ("train_loop_xla", "train_loop_noxla"))
    faster = "on" if xla > no_xla else "off"
    assert f"the forced runs found XLA {faster} faster" in finished.stdout
    assert "summaries and histograms at the default cadence: " in finished.stdout
    assert "fastest of 2 interleaved round(s)" in finished.stdout and "slowest round ran " in finished.stdout
