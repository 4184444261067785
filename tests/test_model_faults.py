"""Faults of the model layer (issue 24): frozen layers in a user's model (fine-tuning), more
replicas than TensorFlow allows `get_next()` calls in one traced function, and user code that
asks to exit (`sys.exit`, a KeyboardInterrupt of its own) as against a real Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import fine_tuning_models
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO
from helpers import assert_one_line_error, events

from train_loop import Config, UsageError
from train_loop.data import sources
from train_loop.model import models, steps
from train_loop.model.state import build_state
from train_loop.outputs.events import scalar_series
from train_loop.training import distribute

FROZEN_MODEL = "tests/fine_tuning_models.py:frozen"


def frozen_state(strategy: tf.distribute.Strategy, **settings):
    config = Config(dataset="digits", model=FROZEN_MODEL, **settings)
    return build_state(config, strategy, (8, 8, 1), model_fn=fine_tuning_models.frozen)


def layer_weights(model: keras.Model, paths: tuple[str, ...]) -> dict[str, list[np.ndarray]]:
    layers = dict(models.named_layers(model))
    return {path: [np.array(weight) for weight in layers[path].get_weights()] for path in paths}


def assert_same_weights(actual: dict[str, list[np.ndarray]], expected: dict[str, list[np.ndarray]]) -> None:
    """Bit for bit, layer by layer."""
    assert list(actual) == list(expected)
    for path in expected:
        for got, want in zip(actual[path], expected[path], strict=True):
            np.testing.assert_array_equal(got, want, err_msg=path)


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_step_trains_decays_and_clips_only_the_trainable_weights(replicas):
    """Frozen layers keep their weights bit for bit under decay and clipping; the gradient, its
    norm and the regularization are the trainable weights' alone, as Keras counts them."""
    strategy = distribute.mirrored_strategy([f"/cpu:{index}" for index in range(replicas)])
    state = frozen_state(strategy, weight_decay=0.1, global_clipnorm=1e-3)
    model = state.model
    splits = sources.load_splits(Config(dataset="digits"))
    images, labels = splits.x_train[:32], splits.y_train[:32]
    frozen_before = layer_weights(model, fine_tuning_models.FROZEN)
    logits_before = layer_weights(model, ("logits",))["logits"]
    with tf.GradientTape() as tape:  # One device's gradient of the whole batch's total, by hand.
        logits = model(images, training=True)
        cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        total = tf.reduce_sum(cross_entropy) / 32 + tf.add_n(model.losses)
    expected_norm = float(tf.linalg.global_norm(tape.gradient(total, model.trainable_variables)))

    train_step = tf.function(
        steps.make_train_step(
            strategy, model, state.optimizer, steps.make_replica_gradients(model, 32), global_clipnorm=1e-3
        )
    )
    per_replica = len(images) // replicas
    batch = strategy.experimental_distribute_values_from_function(
        lambda context: tuple(
            tf.constant(part[context.replica_id_in_sync_group * per_replica :][:per_replica])
            for part in (images, labels)
        )
    )
    measured = train_step(batch, tf.constant(True), tf.constant(True))

    assert_same_weights(layer_weights(model, fine_tuning_models.FROZEN), frozen_before)
    assert not np.array_equal(layer_weights(model, ("logits",))["logits"][0], logits_before[0])
    assert {name for name in measured if name.startswith("gradient")} == {
        "gradient_norm",
        "gradient_norm/logits",
        "gradient/logits",
    }
    assert float(measured["gradient_norm"]) == pytest.approx(expected_norm, rel=1e-4)
    assert float(measured["clipped"]) == 1.0
    # Keras leaves the frozen kernel's L2 out of model.losses, though it is far from 0.
    features_kernel = frozen_before["features"][0].astype(np.float64)
    assert fine_tuning_models.FROZEN_KERNEL_L2 * np.square(features_kernel).sum() > 1e-3
    expected = fine_tuning_models.LOGITS_KERNEL_L2 * np.square(logits_before[0].astype(np.float64)).sum()
    assert float(measured["regularization"]) == pytest.approx(expected, rel=1e-5)


def test_frozen_layers_are_logged_and_checkpointed(tmp_path):
    state = frozen_state(tf.distribute.get_strategy())
    logged = state.layer_measurements()
    for path in fine_tuning_models.FROZEN:
        assert {f"weight_norm/{path}", f"sparsity/{path}"} <= set(logged)
        assert {f"kernel/{path}", f"bias/{path}"} <= set(state.weight_values())
    assert {tag for tag in logged if tag.startswith("regularization/")} == {"regularization/logits"}

    checkpoint = tf.train.Checkpoint(**state.trackables())
    saved = checkpoint.save(str(tmp_path / "ckpt"))
    frozen = layer_weights(state.model, fine_tuning_models.FROZEN)
    for path in fine_tuning_models.FROZEN:
        for weight in dict(models.named_layers(state.model))[path].weights:
            weight.assign(tf.zeros_like(weight))
    checkpoint.restore(saved).assert_consumed()
    assert_same_weights(layer_weights(state.model, fine_tuning_models.FROZEN), frozen)


def test_a_model_with_every_layer_frozen_is_refused():
    with pytest.raises(UsageError, match="every layer is frozen"):
        models.build_model(Config(model="notebook:all_frozen"), (8, 8, 1), model_fn=fine_tuning_models.all_frozen)


@pytest.mark.slow
def test_a_fine_tuning_run_keeps_its_frozen_weights_and_logs_them(run_cli, tmp_path, monkeypatch):
    """From the command line: the saved model's frozen layers are the initial ones; their kernels'
    histograms and norms are logged, flat, and no gradient of theirs is."""
    finished = run_cli(f"--model={FROZEN_MODEL}", "--dataset=digits", "--run_name=r", "--summary_every=10")
    assert finished.returncode == 0, finished.stderr
    run_dir = tmp_path / "logs" / "r"
    monkeypatch.chdir(REPO)  # The model's path is the one given on the command line.
    initial = models.build_model(Config(model=FROZEN_MODEL, dataset="digits"), (8, 8, 1))
    final = keras.models.load_model(run_dir / "model.keras")
    assert_same_weights(
        layer_weights(final, fine_tuning_models.FROZEN), layer_weights(initial, fine_tuning_models.FROZEN)
    )
    assert not np.array_equal(
        layer_weights(final, ("logits",))["logits"][0], layer_weights(initial, ("logits",))["logits"][0]
    )
    tags = events(str(run_dir), "train").Tags()["tensors"]
    assert {"kernel/features", "kernel/hidden", "gradient/logits"} <= set(tags)
    assert not {tag for tag in tags if tag.startswith("gradient") and tag.endswith(fine_tuning_models.FROZEN)}
    norms = list(scalar_series(str(run_dir), "train", "weight_norm/features").values())
    assert len(norms) > 1 and len(set(norms)) == 1


@pytest.mark.slow
def test_64_cpu_replicas_train_as_one_device_does(tmp_path):
    """Over 32 replicas, one traced function would call `get_next()` once per replica, which
    TensorFlow refuses without AutoGraph; a TPU slice has more. 64 replicas equal one device."""
    results = {}
    for name, flags in (("one", ()), ("many", ("--strategy=mirrored", "--cpu_replicas=64"))):
        finished = subprocess.run(
            [
                sys.executable,
                "-m",
                "train_loop",
                "--dataset=digits",
                "--batch_size=128",
                "--epochs=1",
                "--jit_compile=false",
                f"--logdir={tmp_path}",
                f"--run_name={name}",
                *flags,
            ],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=REPO,
        )
        assert finished.returncode == 0, finished.stderr[-3000:]
        results[name] = json.loads((tmp_path / name / "result.json").read_text())
    assert (results["one"]["replicas"], results["many"]["replicas"]) == (1, 64)
    for split in ("train", "validation", "test"):
        for metric, value in results["one"][split].items():
            assert results["many"][split][metric] == pytest.approx(value, rel=1e-4), (split, metric)


# Model files whose code asks to exit, at each moment train_loop runs user code.
BUILD = """
import keras

def build():
    inputs = keras.Input((8, 8, 1))
    return keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))
"""
EXITS_WHEN = {
    "imported": "import sys\nsys.exit(1)\n" + BUILD,
    "building": BUILD.replace("def build():\n", "def build():\n    import sys\n    sys.exit({code})\n"),
    "first-call": """
import keras

class Model(keras.Model):
    def call(self, inputs, training=False):
        raise KeyboardInterrupt

def build():
    return Model()
""",
    "training-call": """
import sys
import keras

class Model(keras.Model):
    def __init__(self):
        super().__init__()
        self.flatten, self.dense = keras.layers.Flatten(), keras.layers.Dense(10)

    def call(self, inputs, training=False):
        if training:
            sys.exit(0)
        return self.dense(self.flatten(inputs))

def build():
    return Model()
""",
}


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
@pytest.mark.parametrize(
    ("when", "code", "words"),
    [
        ("imported", None, ("x.py called sys.exit(1) when imported", '__name__ == "__main__"')),
        ("building", 0, ("x.py:build called sys.exit(0) while building the model", "must return a keras.Model")),
        # Not status 3, which says a run diverged.
        ("building", 3, ("x.py:build called sys.exit(3) while building the model",)),
        ("first-call", None, ("its model raised KeyboardInterrupt on its first call", "must return its logits")),
    ],
    ids=["exit-on-import", "exit-0-in-function", "exit-3-in-function", "keyboard-interrupt-in-call"],
)
def test_user_code_that_exits_is_one_line_and_status_2_with_nothing_written(run_cli, tmp_path, when, code, words):
    (tmp_path / "x.py").write_text(EXITS_WHEN[when].format(code=code))
    finished = run_cli(f"--model={tmp_path / 'x.py'}:build", "--dataset=digits")
    assert_one_line_error(finished, words)
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_a_model_that_exits_in_training_mode_is_one_line_and_status_2(run_cli, tmp_path):
    """Its first call in training mode is the step's trace (XLA's timing, or the first loop call)."""
    (tmp_path / "x.py").write_text(EXITS_WHEN["training-call"])
    finished = run_cli(f"--model={tmp_path / 'x.py'}:build", "--dataset=digits", "--run_name=r")
    assert finished.returncode == 2, finished.stderr[-3000:]
    assert finished.stderr.splitlines() == [
        "train_loop: error: Model.call called sys.exit(0) in training mode (the train step's trace): "
        "a model's call must return its logits, not end the process."
    ]
    assert not (tmp_path / "logs" / "r" / "checkpoints").exists()


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
def test_a_real_ctrl_c_while_building_the_model_still_stops_as_sigint(tmp_path):
    """SIGINT while the model function runs is a Ctrl-C, not the model's doing: today's line and 130."""
    started = tmp_path / "started"
    (tmp_path / "x.py").write_text(
        BUILD.replace(
            "def build():\n",
            f"def build():\n    import pathlib, time\n    pathlib.Path({str(started)!r}).touch()\n    time.sleep(60)\n",
        )
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "train_loop",
            f"--model={tmp_path / 'x.py'}:build",
            "--dataset=digits",
            f"--logdir={tmp_path / 'logs'}",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not started.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists(), "the model function never ran"
    os.kill(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert stderr.splitlines() == [
        "train_loop: stopped by SIGINT outside the training loop; the same command resumes (or starts) the run."
    ]


def test_python_api_gets_a_usage_error_from_a_model_function_that_exits(tmp_path):
    import train_loop

    def build() -> keras.Model:
        sys.exit(0)

    with pytest.raises(UsageError, match=r"called sys.exit\(0\) while building the model"):
        train_loop.train(model_fn=build, dataset="digits", logdir=str(tmp_path / "logs"))
    assert not (tmp_path / "logs").exists()
    # A KeyboardInterrupt raised by the code itself, with no SIGINT, is the code's too.
    with pytest.raises(UsageError, match="raised KeyboardInterrupt while building the model"):
        train_loop.train(
            model_fn=lambda: (_ for _ in ()).throw(KeyboardInterrupt), dataset="digits", logdir=str(tmp_path / "logs")
        )
    assert not (tmp_path / "logs").exists()
