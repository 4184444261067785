"""A user's model and data: the examples run, and a model with kernel, bias and activity
regularizers, an `add_loss` term and a nested sub-model (tests/user_models.py) keeps every
guarantee: its regularization equals NumPy's on 1 and 2 replicas, 2 replicas equal one device,
and its per-layer tags equal NumPy's recomputation from the saved model."""

from __future__ import annotations

import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import user_models
from conftest import REPO
from helpers import events, run_example

import train_loop
from train_loop import Config, UsageError
from train_loop.data import sources
from train_loop.model import models, steps
from train_loop.model.state import build_state
from train_loop.outputs.events import scalar_series
from train_loop.study import report
from train_loop.training import distribute

USER_MODEL = "tests/user_models.py:build"
USER_LAYERS = ("encoder/hidden", "logits")  # The user model's layers with weights, by path.


def numpy_weight_term(regularizer: keras.regularizers.Regularizer | None, weights: np.ndarray) -> float:
    """l1 * sum(|w|) + l2 * sum(w**2), with the factors read from the regularizer's config."""
    if regularizer is None:
        return 0.0
    factors = regularizer.get_config()
    weights = np.asarray(weights, np.float64)
    return factors.get("l1", 0.0) * np.abs(weights).sum() + factors.get("l2", 0.0) * np.square(weights).sum()


def numpy_layer_terms(model: keras.Model) -> dict[str, float]:
    """Each layer's kernel and bias terms, by path, from the model's weights and regularizers."""
    layers = dict(models.weighted_layers(model))
    return {
        path: numpy_weight_term(layers[path].kernel_regularizer, layers[path].kernel.numpy())
        + numpy_weight_term(layers[path].bias_regularizer, layers[path].bias.numpy())
        for path in USER_LAYERS
    }


def numpy_batch_terms(model: keras.Model, images: np.ndarray) -> float:
    """The activity regularizer (a mean over the batch, as Keras defines it) and the add_loss term."""
    hidden = dict(models.weighted_layers(model))["encoder/hidden"]
    flat = images.reshape(len(images), -1).astype(np.float64)
    activations = np.maximum(flat @ hidden.kernel.numpy() + hidden.bias.numpy(), 0.0)
    activity = user_models.HIDDEN_ACTIVITY * np.square(activations).sum() / len(images)
    return activity + user_models.PENALTY * np.square(activations).mean()


@pytest.mark.parametrize("replicas", [1, 2])
def test_step_regularization_of_every_kind_of_term_equals_numpy(replicas):
    """Weight terms computed whole on each replica and batch terms on its slice sum to NumPy's
    value on the whole batch: the scaling that makes N replicas equal one device."""
    strategy = distribute.mirrored_strategy([f"/cpu:{index}" for index in range(replicas)])
    config = Config(dataset="digits", model=USER_MODEL)
    splits = sources.load_splits(config)
    state = build_state(config, strategy, (8, 8, 1), model_fn=user_models.build)
    model, optimizer = state.model, state.optimizer
    for _, layer in models.weighted_layers(model):  # Biases start at 0: give the bias term a value.
        layer.bias.assign(np.random.default_rng(1).normal(size=layer.bias.shape).astype(np.float32))
    images, labels = splits.x_train[:32], splits.y_train[:32]
    expected = sum(numpy_layer_terms(model).values()) + numpy_batch_terms(model, images)

    train_step = tf.function(steps.make_train_step(strategy, model, optimizer, steps.make_replica_gradients(model, 32)))
    measured = train_step((images, labels), tf.constant(False), tf.constant(False))

    assert float(measured["regularization"]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_layer_tags_by_path_equal_numpy_from_the_saved_model(run_cli, tmp_path, monkeypatch):
    """At step 0 from the rebuilt initial model, at the end from model.keras; histograms by path."""
    finished = run_cli(f"--model={USER_MODEL}", "--dataset=digits", "--run_name=r")
    assert finished.returncode == 0, finished.stderr
    run_dir = str(tmp_path / "logs" / "r")
    final_step = json.loads((tmp_path / "logs" / "r" / "result.json").read_text())["steps"]
    tags = events(run_dir, "train").Tags()
    assert {tag for tag in tags["tensors"] if tag.startswith("regularization/")} == {
        f"regularization/{path}" for path in USER_LAYERS
    }
    assert {f"{kind}/{path}" for kind in ("kernel", "bias") for path in USER_LAYERS} <= set(tags["tensors"])

    monkeypatch.chdir(REPO)  # The model's path is the one given on the command line.
    initial = models.build_model(Config(model=USER_MODEL, dataset="digits"), (8, 8, 1))
    final = keras.models.load_model(os.path.join(run_dir, "model.keras"))
    for step, model in ((0, initial), (final_step, final)):
        for path, expected in numpy_layer_terms(model).items():
            assert expected > 0
            logged = scalar_series(run_dir, "train", f"regularization/{path}")[step]
            assert logged == pytest.approx(expected, rel=1e-5), (step, path)
    _, kernel = report.first_kernel(run_dir)  # The study's report rebuilds a user's model too.
    np.testing.assert_array_equal(kernel, dict(models.weighted_layers(final))["encoder/hidden"].kernel.numpy())


def test_flags_regularize_a_user_model_without_its_own_regularizers():
    """--l2 and --bias_l1 go on every Dense kernel and bias, nested ones included."""

    def plain() -> keras.Model:
        encoder = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(4, name="hidden")], name="encoder")
        inputs = keras.Input((8, 8, 1))
        return keras.Model(inputs, keras.layers.Dense(10, name="logits")(encoder(inputs)))

    config = Config(model="notebook:plain", l2=0.01, bias_l1=0.02)
    model = models.build_model(config, (8, 8, 1), model_fn=plain)
    layers = models.weighted_layers(model)
    assert [path for path, _ in layers] == list(USER_LAYERS)
    expected = sum(config.l2 * np.square(layer.kernel.numpy()).sum() for _, layer in layers)
    assert float(tf.add_n(model.losses)) == pytest.approx(expected, rel=1e-6)


def test_python_api_refuses_a_bad_model_function_and_writes_nothing(tmp_path):
    with pytest.raises(UsageError, match="returned int, not a keras.Model"):
        train_loop.train(model_fn=lambda: 3, dataset="digits", logdir=str(tmp_path / "logs"))
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "examples/own_model.py", "{logdir}"],
        ["sh", "examples/wine.sh", "{logdir}"],
    ],
    ids=["python-api", "command-line"],
)
def test_examples_run_and_learn(tmp_path, command):
    """Both examples train from the repository root and end far above chance on their test split."""
    run_example([part.format(logdir=tmp_path) for part in command])
    (result_file,) = tmp_path.glob("*/result.json")
    result = json.loads(result_file.read_text())
    chance = 1 / len(result["confusion_matrix"])
    assert result["test"]["accuracy"] > 2 * chance
    settings = json.loads((result_file.parent / "settings.json").read_text())
    if command[0] == "sh":
        assert (settings["model"], settings["dataset"]) == ("examples/wine.py:build", str(tmp_path / "wine.npz"))
    else:  # What train(model_fn=..., data=...) records, for a resume to be checked against.
        assert settings["model"] == "__main__:build" and settings["dataset"].startswith("arrays:")
