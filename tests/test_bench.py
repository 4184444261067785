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
    finished = subprocess.run([sys.executable, "-m", "train_loop.bench", "--quick", "--dataset=synthetic"],
                              capture_output=True, text=True, timeout=600, cwd=REPO)
    assert finished.returncode == 0, finished.stderr[-3000:]
    figures = json.loads(finished.stdout.strip().splitlines()[-1])
    assert figures["dataset"] == "synthetic" and figures["steps"] == 100
    for contender in ("keras_fit", "keras_fit_nojit", "train_loop", "train_loop_xla", "train_loop_noxla"):
        assert figures[contender]["examples_per_second"] > 0
        assert 2**20 < figures[contender]["peak_rss_bytes"] < 2**40
    assert figures["training_flops_per_example"] == 23_331_840  # pinned: the convnet's shapes
    assert figures["peak_flops_per_second"]["float32"] > figures["achieved_flops_per_second"] > 0
    assert figures["cpu"] and figures["cores"] >= 1
    phases = figures["train_loop"]["seconds"]
    assert {"imports", "data", "decide_xla", "first_step", "training", "summaries", "evaluation",
            "save_model"} <= set(phases)
    assert phases["total"] >= phases["training"] > phases["summaries"] > 0
    assert "| Keras 3 fit, jit_compile=False" in finished.stdout and "auto chose XLA" in finished.stdout
    assert "summaries and histograms at the default cadence: " in finished.stdout
