"""What a run minimizes (issue 20): the default classifier, a Keras loss by name (`--loss`), and a
user's task of named per-example terms (`--task`).

Each logged term of the first step equals NumPy's recomputation from the model's outputs; every
bad task, loss, metric or target is one line, exit 2, with nothing written; a regression never
trains as a classifier; and 2 replicas train what 1 device trains. The regression data is
scikit-learn's diabetes (442 patients, float targets 25..346), which ships with the package.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import user_tasks
from helpers import assert_one_line_error, events, numpy_regularization, run_example
from sklearn.datasets import load_diabetes

import train_loop
from train_loop import Config
from train_loop.data import inputs, sources
from train_loop.data.arrays import fingerprint
from train_loop.model import steps, tasks
from train_loop.model.state import build_state
from train_loop.settings import ARRAYS_PREFIX

TASKS = "tests/user_tasks.py"
BATCH = 32


def diabetes() -> dict[str, np.ndarray]:
    """Scikit-learn's diabetes as a Keras-layout split of float32 features and float32 targets."""
    features, targets = load_diabetes(return_X_y=True)
    features, targets = features.astype(np.float32), targets.astype(np.float32)
    return {"x_train": features[:400], "y_train": targets[:400], "x_test": features[400:], "y_test": targets[400:]}


def first_step(config: Config, task: tasks.Task, arrays: dict | None = None) -> tuple[dict, np.ndarray, tuple]:
    """The first step's measurements of `task` on the first global batch, the model's outputs on
    it before the step, and the batch as NumPy arrays."""
    splits = sources.load_splits(config, arrays, targets=task.targets)
    strategy = tf.distribute.get_strategy()
    state = build_state(
        config,
        strategy,
        splits.x_train.shape[1:],
        num_classes=splits.num_classes,
        task=task,
        sample=inputs.sample_batch(splits),
    )
    for layer in state.model.layers:  # Biases start at zero: give them values, so their terms are tested.
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(np.random.default_rng(1).normal(size=layer.bias.shape).astype(np.float32))
    batch = (splits.x_train[:BATCH], splits.y_train[:BATCH])
    outputs = state.model(batch[0], training=True).numpy().astype(np.float64)
    regularization = numpy_regularization(state.model, config) if config.l2 else 0.0
    measured, _ = steps.make_replica_gradients(state.model, BATCH, task=task)(tuple(map(tf.constant, batch)))
    return {name: float(value) for name, value in measured.items()}, outputs, (*batch, regularization)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(labels)), labels]


def hits(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return (logits.argmax(axis=1) == labels).astype(np.float64)


def assert_measured(measured: dict, expected: dict) -> None:
    """Exactly the names expected, besides the step's own, each equal to NumPy's."""
    assert set(measured) == {*expected, "non_finite_gradients"}, sorted(measured)
    for name, value in expected.items():
        assert measured[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_the_classifier_logs_cross_entropy_and_accuracy_as_numpy_computes_them():
    config = Config(dataset="digits", model="linear", l2=1e-3)
    measured, logits, (_, labels, regularization) = first_step(config, tasks.classifier())
    data = cross_entropy(logits, labels).mean()
    expected = {"cross_entropy": data, "regularization": regularization, "total": data + regularization}
    assert_measured(measured, {**expected, "accuracy": hits(logits, labels).mean()})


def test_a_keras_loss_by_name_logs_its_term_and_metrics_as_numpy_computes_them():
    arrays = diabetes()
    config = Config(dataset=ARRAYS_PREFIX + fingerprint(arrays), model="linear", l2=1e-3)
    task = tasks.keras_loss("huber", ("mean_absolute_error",))
    measured, outputs, (_, targets, regularization) = first_step(config, task, arrays)
    assert outputs.shape == (BATCH, 1)  # One output per target value, not 347 logits.
    error = outputs[:, 0] - targets
    huber = np.where(np.abs(error) <= 1.0, 0.5 * error**2, np.abs(error) - 0.5).mean()
    expected = {"huber": huber, "regularization": regularization, "total": huber + regularization}
    assert_measured(measured, {**expected, "mean_absolute_error": np.abs(error).mean()})


def test_a_task_of_two_terms_logs_each_apart_as_numpy_computes_them():
    config = Config(dataset="digits", l2=1e-3)
    measured, logits, (_, labels, regularization) = first_step(config, tasks.user_task(user_tasks.TwoTerms()))
    data = cross_entropy(logits, labels).mean()
    penalty = user_tasks.PENALTY * np.square(logits).mean()
    expected = {"data": data, "logit_penalty": penalty, "regularization": regularization}
    assert_measured(
        measured, {**expected, "total": data + penalty + regularization, "hits": hits(logits, labels).mean()}
    )


def test_a_task_without_targets_trains_on_its_inputs_alone():
    measured, outputs, (images, _, _) = first_step(Config(dataset="digits"), tasks.user_task(user_tasks.Autoencoder()))
    reconstruction = np.square(outputs - images).mean()
    assert_measured(measured, {"reconstruction": reconstruction, "regularization": 0.0, "total": reconstruction})


# From the command line: exit 2, the one line, nothing written.

BAD_INPUTS = {
    "task-no-file": (("--task=nowhere.py:Task",), ("--task=nowhere.py:Task", "no file nowhere.py")),
    "task-no-name": ((f"--task={TASKS}:Missing",), (f"--task={TASKS}:Missing", "has no task Missing")),
    "task-no-loss-terms": ((f"--task={TASKS}:NoLossTerms",), ("has no loss_terms", "loss_terms(batch, outputs)")),
    "task-not-an-object": ((f"--task={TASKS}:not_a_task",), ("has no model and no loss_terms",)),
    "term-of-shape-b-k": (
        (f"--task={TASKS}:WideTerm",),
        ("loss term data", "shape (2, 10)", "expected floats of shape (2,)"),
    ),
    "term-of-integers": ((f"--task={TASKS}:IntegerTerm",), ("loss term data is int32",)),
    "term-named-total": ((f"--task={TASKS}:TotalTerm",), ("loss term 'total' cannot be a name",)),
    "term-not-an-identifier": ((f"--task={TASKS}:SpacedTerm",), ("loss term 'my term' cannot be a name",)),
    "unknown-loss": (("--loss=squared_wrongness",), ("--loss=squared_wrongness is not a Keras loss name",)),
    "unknown-metric": (("--metrics=mean_absolute_error,nope",), ("nope is not a Keras metric name",)),
    "metric-the-classifier-has": (("--metrics=accuracy",), ("the classifier logs its accuracy already",)),
    "metric-with-state": (("--metrics=auc",), ("auc is not a mean of per-example values",)),
    "task-and-model": (("--model=linear", f"--task={TASKS}:TwoTerms"), ("--model=linear and --task=",)),
    "loss-and-task": (("--loss=huber", f"--task={TASKS}:TwoTerms"), ("--loss=huber and --task=",)),
    "best-metric-unmeasured": (
        ("--loss=huber", "--model=linear", "--best_metric=validation/accuracy"),
        ("--best_metric=validation/accuracy", "validation/huber"),
    ),
}


@pytest.mark.slow  # Each starts TensorFlow in a process of its own.
@pytest.mark.parametrize(("flags", "words"), BAD_INPUTS.values(), ids=BAD_INPUTS)
def test_a_bad_task_loss_or_metric_is_one_line_and_writes_nothing(run_cli, tmp_path, flags, words):
    result = run_cli("--dataset=digits", "--epochs=1", "--jit_compile=false", *flags)
    assert_one_line_error(result, words)
    assert not (tmp_path / "logs").exists()


TARGETS_REFUSED = {
    # The sparse cross-entropy takes class indices alone: float targets are refused at load.
    "float-targets-for-sparse-cross-entropy": (
        "--loss=sparse_categorical_crossentropy",
        lambda arrays: arrays,
        ("y_train in", "float labels are targets"),
    ),
    # Targets of shape (N, 2, 3): the linear model outputs 6 values, which the loss cannot pair with them.
    "targets-of-a-shape-the-loss-cannot-take": (
        "--loss=mean_squared_error",
        lambda arrays: {**arrays, "y_train": np.repeat(arrays["y_train"], 6).reshape(-1, 2, 3)},
        ("--loss=mean_squared_error: targets of shape (N, 2, 3) cannot be paired", "outputs of shape (N, 6)"),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize(("loss", "change", "words"), TARGETS_REFUSED.values(), ids=TARGETS_REFUSED)
def test_targets_the_loss_cannot_take_are_one_line_and_write_nothing(run_cli, tmp_path, loss, change, words):
    path = tmp_path / "diabetes.npz"
    np.savez(path, **change(diabetes()))
    result = run_cli(f"--dataset={path}", "--model=linear", "--epochs=1", "--jit_compile=false", loss)
    assert_one_line_error(result, words)
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_a_regression_never_trains_as_a_classifier(run_cli, tmp_path):
    """Diabetes with --loss=huber: one output, no accuracy and no confusion matrix anywhere."""
    path = tmp_path / "diabetes.npz"
    np.savez(path, **diabetes())
    flags = (f"--dataset={path}", "--model=linear", "--epochs=2", "--jit_compile=false", "--run_name=r")
    result = run_cli(*flags, "--loss=huber", "--metrics=mean_absolute_error", "--best_metric=validation/huber")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "logs" / "r"
    finished = json.loads((run_dir / "result.json").read_text())
    assert "confusion_matrix" not in finished
    assert set(finished["train"]) == {"huber", "regularization", "total", "mean_absolute_error"}
    assert set(finished["validation"]) == set(finished["test"]) == {"huber", "mean_absolute_error"}
    assert keras.models.load_model(run_dir / "model.keras").output_shape == (None, 1)
    for writer in ("validation", "test"):
        assert set(events(str(run_dir), writer).Tags()["tensors"]) == {"loss/huber", "mean_absolute_error"}
    train_tags = set(events(str(run_dir), "train").Tags()["tensors"])
    assert {"loss/huber", "loss/regularization", "loss/total", "mean_absolute_error"} <= train_tags
    assert not {tag for tag in train_tags if "accuracy" in tag or "cross_entropy" in tag}


@pytest.mark.slow
def test_a_non_finite_term_is_a_divergence_that_names_it(run_cli):
    result = run_cli("--dataset=digits", "--epochs=1", "--jit_compile=false", f"--task={TASKS}:NonFiniteTerm")
    assert result.returncode == 3, result.stderr[-3000:]
    assert "training diverged: loss/blowup became -inf between steps 1 and 1" in result.stderr


@pytest.mark.slow
def test_an_autoencoder_task_trains_from_the_command_line(run_cli, tmp_path):
    result = run_cli(
        "--dataset=digits", "--epochs=1", "--jit_compile=false", f"--task={TASKS}:Autoencoder", "--run_name=r"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    finished = json.loads((tmp_path / "logs" / "r" / "result.json").read_text())
    assert set(finished["train"]) == {"reconstruction", "regularization", "total"}
    assert set(finished["test"]) == {"reconstruction"} and "confusion_matrix" not in finished


# 1 device = 2 replicas, on a regression and on a task of two terms.

EQUIVALENT = {
    "huber-regression": dict(model="linear", loss="huber", metrics="mean_absolute_error", l2=1e-3),
    "two-terms": dict(task=user_tasks.TwoTerms(), l2=1e-3, best_metric="validation/data_total"),
}


@pytest.mark.slow
@pytest.mark.parametrize("settings", EQUIVALENT.values(), ids=EQUIVALENT)
def test_two_replicas_train_what_one_device_trains(tmp_path, settings):
    data = diabetes() if settings.get("loss") else None
    common = dict(dataset="digits", logdir=str(tmp_path), epochs=1, steps_per_loop=7, jit_compile=False, **settings)
    one = train_loop.train(strategy="one_device", run_name="one", data=data, **common)
    two = train_loop.train(strategy="mirrored", cpu_replicas=2, run_name="two", data=data, **common)
    assert (one["replicas"], two["replicas"]) == (1, 2)
    for split in ("train", "validation", "test"):
        assert set(two[split]) == set(one[split]), split
        for name, value in one[split].items():
            assert two[split][name] == pytest.approx(value, rel=1e-5), (split, name)
    weights = [keras.models.load_model(Path(tmp_path) / name / "model.keras").get_weights() for name in ("one", "two")]
    for first, second in zip(*weights):
        np.testing.assert_allclose(second, first, rtol=1e-5, atol=1e-7)


# The examples, as CI runs them.

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def example_result(command: list[str], tmp_path: Path) -> dict:
    run_example(command)
    (result_file,) = tmp_path.glob("*/result.json")
    return json.loads(result_file.read_text())


@pytest.mark.slow
def test_the_diabetes_example_regresses_better_than_the_mean(tmp_path):
    result = example_result(["sh", "examples/diabetes.sh", str(tmp_path)], tmp_path)
    targets = np.load(tmp_path / "diabetes.npz")["y_test"]
    # The targets are standardized by the training split: predicting its mean (0) errs by |y| on average.
    assert result["test"]["mean_absolute_error"] < 0.85 * np.abs(targets).mean()
    assert "confusion_matrix" not in result and set(result["test"]) == {"huber", "mean_absolute_error"}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_vae_example_logs_reconstruction_and_kl_apart(tmp_path):
    command = [sys.executable, "-m", "train_loop", "--task=examples/vae.py:VAE", "--dataset=fashion_mnist"]
    result = example_result([*command, "--epochs=1", "--batch_size=128", f"--logdir={tmp_path}"], tmp_path)
    assert set(result["train"]) == {"reconstruction", "kl", "regularization", "total"}
    assert set(result["test"]) == {"reconstruction", "kl", "data_total"}
    # A decoder that has learnt nothing (logits 0) costs 784 ln 2 = 543 nats an image.
    assert result["test"]["reconstruction"] < 0.6 * 784 * np.log(2) and result["test"]["kl"] > 0
    (run_dir,) = tmp_path.glob("*/result.json")
    tags = set(events(str(run_dir.parent), "train").Tags()["tensors"])
    assert {"loss/reconstruction", "loss/kl", "loss/regularization", "loss/total"} <= tags
