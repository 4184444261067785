"""Whole runs through the command line: accuracy, what a run writes, resumption, no overwrites."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import kill_at_first_checkpoint, numpy_regularization

from train_loop import Config
from train_loop.data import named_sets, sources
from train_loop.data.arrays import hold_out
from train_loop.model import models
from train_loop.outputs.events import scalar_series

pytestmark = pytest.mark.slow  # every test here trains a model

RESULT_KEYS = {
    "dataset",
    "strategy",
    "replicas",
    "steps",
    "epochs",
    "train",
    "validation",
    "test",
    "examples_per_second",
}
DIGITS_STEPS = (1437 - round(0.1 * 1437)) // 32  # digits' training examples less the validation split, batch 32.


def run_dirs(logdir) -> list[str]:
    return sorted(os.listdir(logdir)) if os.path.isdir(logdir) else []


def test_digits_reaches_90_percent_in_three_epochs(run_cli, tmp_path):
    finished = run_cli("--dataset=digits", "--epochs=3", "--l2=0.001")
    assert finished.returncode == 0, finished.stderr
    run_dir = tmp_path / "logs" / "convnet-dataset=digits-l2=0.001-epochs=3"
    result = json.loads((run_dir / "result.json").read_text())
    assert RESULT_KEYS <= set(result)
    assert set(result["train"]) == {"cross_entropy", "regularization", "total", "accuracy"}
    assert set(result["validation"]) == set(result["test"]) == {"cross_entropy", "accuracy"}
    assert result["test"]["accuracy"] >= 0.90 and result["validation"]["accuracy"] >= 0.90
    assert (result["steps"], result["epochs"], result["replicas"]) == (3 * DIGITS_STEPS, 3, 1)
    assert result["train"]["total"] == pytest.approx(
        result["train"]["cross_entropy"] + result["train"]["regularization"], rel=1e-6
    )
    assert "epoch 3/3: train cross_entropy" in finished.stdout
    assert_metrics_file(run_dir, result)
    assert finished.stderr == "", "TensorFlow's start-up noise reached the user"
    config = Config(dataset="digits")
    splits = hold_out(sources.load_splits(config), config.validation_split, config.seed)
    assert finished.stdout.splitlines()[1] == (
        f"{len(splits.x_train):,} training, {len(splits.x_validation):,} validation and "
        f"{len(splits.x_test):,} test examples; OneDeviceStrategy, 1 replica in sync, here on CPU:0"
    )


def assert_metrics_file(run_dir, result: dict) -> None:
    """metrics.jsonl: a line per epoch, the last one's means those of result.json, each epoch's
    validation the one TensorBoard has at its step."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epoch_ends = [DIGITS_STEPS * epoch for epoch in range(1, result["epochs"] + 1)]
    assert [(line["epoch"], line["step"]) for line in lines] == list(enumerate(epoch_ends, start=1))
    assert {f"train/{name}": value for name, value in result["train"].items()}.items() <= lines[-1].items()
    for name in ("accuracy", "loss/cross_entropy"):
        logged = scalar_series(str(run_dir), "validation", name)
        key = f"validation/{name.removeprefix('loss/')}"
        assert [line[key] for line in lines] == pytest.approx([logged[step] for step in epoch_ends], abs=1e-6)
    assert all(line["learning_rate"] == 0.001 and line["examples_per_second"] > 0 for line in lines)
    assert sorted(line["wall_time"] for line in lines) == [line["wall_time"] for line in lines]


def test_logged_step_zero_regularization_is_the_initial_weights(run_cli, tmp_path):
    """TensorBoard's first point is λ·Σw² of the seeded initial weights, layer by layer."""
    finished = run_cli("--dataset=digits", "--l2=0.002", "--bias_l1=0.001", "--run_name=r")
    assert finished.returncode == 0, finished.stderr
    config = Config(dataset="digits", l2=0.002, bias_l1=0.001)
    initial = models.build_model(config, sources.load_splits(config).x_train.shape[1:])
    run_dir = str(tmp_path / "logs" / "r")
    logged = scalar_series(run_dir, "train", "loss/regularization")
    assert logged[0] == pytest.approx(numpy_regularization(initial, config), rel=1e-6)
    for path, layer in models.weighted_layers(initial):
        single = Config(l2=0.002, bias_l1=0.001)
        kernel, bias = layer.get_weights()
        expected = single.l2 * np.square(kernel.astype(np.float64)).sum() + single.bias_l1 * np.abs(bias).sum()
        assert scalar_series(run_dir, "train", f"regularization/{path}")[0] == pytest.approx(expected, rel=1e-6)


def test_saved_model_loads_with_plain_keras_and_carries_its_regularizers(run_cli, tmp_path):
    finished = run_cli("--dataset=digits", "--l1=0.001", "--l2=0.001", "--run_name=r")
    assert finished.returncode == 0, finished.stderr
    run_dir = tmp_path / "logs" / "r"
    model = keras.models.load_model(run_dir / "model.keras")
    final_step = json.loads((run_dir / "result.json").read_text())["steps"]
    for path, layer in models.weighted_layers(model):
        logged = scalar_series(str(run_dir), "train", f"regularization/{path}")[final_step]
        assert float(sum(layer.losses)) == pytest.approx(logged, rel=1e-6)
    assert float(sum(model.losses)) == pytest.approx(numpy_regularization(model, Config(l1=0.001, l2=0.001)), rel=1e-5)


@pytest.mark.skipif(
    not os.path.isdir(named_sets.DEBIAN_FASHION_MNIST),
    reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)",
)
def test_fashion_mnist_one_epoch_reaches_85_percent(run_cli, tmp_path):
    finished = run_cli("--dataset=fashion_mnist", "--l2=0.001", "--batch_size=32")
    assert finished.returncode == 0, finished.stderr
    result = json.loads((tmp_path / "logs" / "convnet-dataset=fashion_mnist-l2=0.001" / "result.json").read_text())
    assert result["steps"] == (60_000 - 6_000) // 32  # 10% held out for validation
    assert result["test"]["accuracy"] >= 0.85


def test_a_finished_run_is_never_overwritten(run_cli, tmp_path):
    flags = ("--dataset=digits", "--model=linear")
    assert run_cli(*flags).returncode == 0
    first = tmp_path / "logs" / "linear-dataset=digits"
    before = {path: path.read_bytes() for path in first.rglob("*") if path.is_file()}
    again = run_cli(*flags)
    assert again.returncode == 0, again.stderr
    assert run_dirs(tmp_path / "logs") == ["linear-dataset=digits", "linear-dataset=digits-2"]
    assert {path: path.read_bytes() for path in first.rglob("*") if path.is_file()} == before
    assert (tmp_path / "logs" / "linear-dataset=digits-2" / "result.json").exists()


def test_an_interrupted_run_resumes_from_its_newest_checkpoint(tmp_path):
    """SIGKILL after the first checkpoint; the same command resumes there and finishes."""
    logdir = tmp_path / "logs"
    command = [
        sys.executable,
        "-m",
        "train_loop",
        f"--logdir={logdir}",
        "--dataset=digits",
        "--epochs=6",
        "--checkpoint_every=10",
        "--steps_per_loop=5",
        "--run_name=r",
    ]
    kill_at_first_checkpoint(command, logdir / "r")
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    line = next(line for line in resumed.stdout.splitlines() if line.startswith("resuming"))
    step = int(line.rsplit(" ", 1)[1])
    assert step > 0 and step % 10 == 0
    result = json.loads((logdir / "r" / "result.json").read_text())
    assert (result["steps"], result["epochs"]) == (6 * DIGITS_STEPS, 6)
    assert run_dirs(logdir) == ["r"]


def test_resuming_with_other_settings_is_refused(run_cli, tmp_path):
    run_dir = tmp_path / "logs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "settings.json").write_text(json.dumps({**Config(dataset="digits").to_dict(), "l2": 0.5}))
    refused = run_cli("--dataset=digits", "--run_name=r")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "l2" in refused.stderr and "--run_name" in refused.stderr
    assert sorted(path.name for path in run_dir.iterdir()) == ["settings.json"]


def test_a_diverging_run_stops_with_status_3_and_keeps_finite_checkpoints(run_cli, tmp_path):
    finished = run_cli(
        "--dataset=digits",
        "--epochs=3",
        "--optimizer=sgd",
        "--learning_rate=1e12",
        "--run_name=r",
        "--checkpoint_every=2",
        "--steps_per_loop=2",
        "--summary_every=2",
    )
    assert finished.returncode == 3, finished.stderr
    assert finished.stderr.count("\n") == 1 and "diverged" in finished.stderr
    assert re.search(
        r"(cross_entropy|regularization|gradient_norm) became (nan|inf|-inf) between steps \d+", finished.stderr
    ), finished.stderr
    checkpoints = tmp_path / "logs" / "r" / "checkpoints"
    assert not (tmp_path / "logs" / "r" / "result.json").exists()
    for index in checkpoints.glob("*.index"):
        reader = tf.train.load_checkpoint(str(index)[: -len(".index")])
        for name in reader.get_variable_to_shape_map():
            value = reader.get_tensor(name)
            if np.issubdtype(np.asarray(value).dtype, np.floating):
                assert np.all(np.isfinite(value)), name
