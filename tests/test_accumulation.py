"""Gradient accumulation (`--accumulation_steps`): K micro-batches train what the whole batch trains."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO
from helpers import assert_one_line_error, peak_rss, run_example

import train_loop
from train_loop import Config
from train_loop.data import sources
from train_loop.model import models, steps
from train_loop.model.state import build_state
from train_loop.outputs.events import scalar_series

# Every optimizer feature that must act once an update, and a weight term that must count once.
ONCE_AN_UPDATE = dict(
    l2=0.001, global_clipnorm=0.5, weight_decay=0.01, ema=0.9, lr_schedule="cosine", lr_decay_steps=30, warmup_steps=5
)
TAGS = ("loss/cross_entropy", "loss/regularization", "loss/total", "accuracy", "gradient_norm", "learning_rate")


def small_model() -> keras.Model:
    """A weight term and an activity term: the first must count once an update, the second average."""
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Dense(
        12,
        activation="relu",
        kernel_regularizer=keras.regularizers.L2(0.01),
        activity_regularizer=keras.regularizers.L1(0.001),
    )(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, keras.layers.Dense(10)(hidden))


@pytest.mark.parametrize("accumulation_steps", [2, 4])
def test_micro_batches_sum_to_the_whole_batchs_measurements_and_gradients(accumulation_steps):
    """Of any nested batch (here a dict, as a task's may be), with weight and activity terms."""
    keras.utils.set_random_seed(0)
    model = small_model()
    splits = sources.load_splits(Config(dataset="digits"))
    batch = {"images": tf.constant(splits.x_train[:16]), "labels": tf.constant(splits.y_train[:16])}
    whole = steps.make_replica_gradients(model, 16)
    micro = steps.make_replica_gradients(model, 16, regularization_share=1 / accumulation_steps)
    accumulated = steps.accumulate(lambda part: micro((part["images"], part["labels"])), accumulation_steps)

    expected, expected_gradients = whole((batch["images"], batch["labels"]))
    measured, gradients = tf.function(accumulated, autograph=False)(batch)

    assert set(measured) == set(expected)
    assert float(expected["regularization"]) > 0
    for name, value in expected.items():
        assert float(measured[name]) == pytest.approx(float(value), rel=1e-6, abs=1e-7), name
    for got, want in zip(gradients, expected_gradients, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_micro_batches_run_one_at_a_time_in_a_loop():
    """One traced step of the model in a while loop of one iteration at a time, not K unrolled
    copies a graph may run at once (then every micro-batch's activations are alive together).

    Without the wait the second micro-batch ran beside the first (see `steps.accumulate`)."""
    model = small_model()
    accumulated = steps.accumulate(steps.make_replica_gradients(model, 16, regularization_share=0.25), 4)
    graph = (
        tf.function(accumulated, autograph=False)
        .get_concrete_function((tf.TensorSpec([16, 8, 8, 1]), tf.TensorSpec([16], tf.int64)))
        .graph
    )
    [loop] = [op for op in graph.get_operations() if op.type in ("While", "StatelessWhile")]
    assert loop.get_attr("parallel_iterations") == 1
    # Its index (after the counter and the bound) waits for the first micro-batch, run before it.
    start = loop.inputs[2].op
    assert any(op.control_inputs for op in (start, *(tensor.op for tensor in start.inputs)))
    # The first micro-batch runs before the loop, the others in its body.
    body = next(f for f in graph.as_graph_def().library.function if f.signature.name == loop.get_attr("body").name)
    assert any(node.op == "MatMul" for node in body.node_def)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("accumulation_steps", "settings"),
    [(2, {}), (4, {}), (4, dict(jit_compile=True)), (2, dict(dropout=0.2)), (4, dict(dropout=0.2, jit_compile=True))],
    ids=["2", "4", "4-xla", "2-dropout", "4-dropout-xla"],
)
def test_accumulation_trains_what_the_whole_batch_trains(tmp_path, accumulation_steps, settings):
    """L2, clipping, weight decay, EMA and a schedule on: the same logged terms step by step, the
    same results and weights. With dropout, each example keeps its mask (keyed by its place in
    the whole batch, not in its micro-batch)."""
    common = dict(dataset="digits", logdir=str(tmp_path), steps_per_loop=7, summary_every=5, jit_compile=False)
    common.update(settings)
    whole = train_loop.train(run_name="whole", **common, **ONCE_AN_UPDATE)
    micro = train_loop.train(run_name="micro", accumulation_steps=accumulation_steps, **common, **ONCE_AN_UPDATE)
    assert micro["steps"] == whole["steps"] == 40
    assert_same_runs(tmp_path / "whole", tmp_path / "micro", tags=(*TAGS, "clipped_share"), rtol=1e-5)
    assert max(scalar_series(str(tmp_path / "whole"), "train", "clipped_share").values()) > 0, "clipping acted"


@pytest.mark.slow
@pytest.mark.parametrize("accumulation_steps", [2, 4])
def test_float16_loss_scale_moves_once_an_update(tmp_path, accumulation_steps):
    """The loss scale holds over the micro-batches: its good steps count updates, not micro-batches,
    and it is the same at every summary. The results agree to float16's rounding (a micro-batch's
    products round apart from the whole batch's, as 2 replicas' halves do: see test_training)."""
    common = dict(dataset="digits", logdir=str(tmp_path), precision="mixed_float16", summary_every=5, jit_compile=False)
    results = {
        k: train_loop.train(run_name=f"k{k}", accumulation_steps=k, **common, **ONCE_AN_UPDATE)
        for k in (1, accumulation_steps)
    }
    for k, result in results.items():
        assert loss_scale_good_steps(Config(**common, **ONCE_AN_UPDATE), tmp_path / f"k{k}", result["steps"]) == 40
    assert_same_runs(tmp_path / "k1", tmp_path / f"k{accumulation_steps}", tags=("loss_scale",), rtol=0, weights=False)
    whole, micro = results.values()
    for split in ("train", "validation", "test"):
        for name, value in whole[split].items():
            expected = pytest.approx(value, abs=0.015) if name == "accuracy" else pytest.approx(value, rel=3e-3)
            assert micro[split][name] == expected, (split, name)


def loss_scale_good_steps(config: Config, run_dir: Path, step: int) -> int:
    """The float16 loss scale's count of finite steps in a row, from the run's checkpoint of `step`."""
    state = build_state(config, tf.distribute.get_strategy(), (8, 8, 1), num_classes=10)
    checkpoint = tf.train.Checkpoint(**state.trackables())
    checkpoint.restore(str(run_dir / "checkpoints" / f"ckpt-{step}")).expect_partial()
    return int(state.loss_scale.good_steps.numpy())


@pytest.mark.slow
def test_two_replicas_accumulating_train_what_one_device_trains(tmp_path):
    common = dict(
        dataset="digits", logdir=str(tmp_path), steps_per_loop=7, summary_every=5, jit_compile=False, dropout=0.2
    )
    common.update(ONCE_AN_UPDATE)
    train_loop.train(run_name="one", strategy="one_device", **common)
    two = train_loop.train(run_name="two", strategy="mirrored", cpu_replicas=2, accumulation_steps=2, **common)
    assert two["replicas"] == 2
    assert_same_runs(tmp_path / "one", tmp_path / "two", tags=TAGS, rtol=1e-5)


@pytest.mark.slow
def test_two_workers_accumulating_train_what_one_process_trains(tmp_path):
    """`launch`: 2 workers with K=2 against one device with K=1 (SGD: see test_faults' Slurm test)."""
    settings = dict(dataset="digits", epochs=2, l2=0.001, jit_compile=False, optimizer="sgd", learning_rate=0.05)
    flags = [f"--{name}={value}" for name, value in settings.items()]
    launch = [sys.executable, "-m", "train_loop.launch", "--workers=2", f"--logdir={tmp_path}", "--", *flags]
    launched = subprocess.run(
        [*launch, "--accumulation_steps=2", "--run_name=two"], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    one = train_loop.train(logdir=str(tmp_path), run_name="one", **settings)
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert (two["strategy"], two["replicas"], two["steps"]) == ("multi_worker", 2, one["steps"])
    for split in ("train", "validation", "test"):
        for name, value in one[split].items():
            assert two[split][name] == pytest.approx(value, rel=1e-5), (split, name)


def assert_same_runs(first: Path, second: Path, *, tags: tuple[str, ...], rtol: float, weights: bool = True) -> None:
    """The two runs logged the same values of `tags` at the same steps, and saved the same weights."""
    for tag in tags:
        one, two = (scalar_series(str(run), "train", tag) for run in (first, second))
        assert list(two) == list(one) and len(one) > 1, tag
        np.testing.assert_allclose(list(two.values()), list(one.values()), rtol=rtol, atol=1e-7, err_msg=tag)
    saved = [keras.models.load_model(run / "model.keras").get_weights() for run in (first, second)] if weights else []
    for one, two in zip(*saved, strict=True):
        np.testing.assert_allclose(two, one, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (("--accumulation_steps=0",), ("--accumulation_steps=0", "1 or more")),
        pytest.param(
            ("--accumulation_steps=3", "--batch_size=32"),
            ("--accumulation_steps=3", "does not divide --batch_size=32:", "1, 2, 4, 8, 16, 32"),
            marks=pytest.mark.slow,  # Checked once the strategy is made: TensorFlow starts.
        ),
        pytest.param(
            # 8 divides the global batch, not a replica's.
            ("--accumulation_steps=8", "--batch_size=24", "--strategy=mirrored", "--cpu_replicas=2"),
            ("--accumulation_steps=8", "batch of 12 (--batch_size=24 over 2 replicas)", "1, 2, 3, 4, 6, 12"),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["zero", "not-dividing", "not-dividing-a-replicas-batch"],
)
def test_bad_accumulation_is_one_line_and_writes_nothing(run_cli, tmp_path, flags, names):
    result = run_cli("--dataset=digits", *flags, timeout=180)
    assert_one_line_error(result, names)
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_four_micro_batches_hold_a_quarter_of_the_activations(tmp_path):
    """Peak RSS of one update of the convnet at batch 4096, where activations dominate: at K=4 it is
    below K=1's by at least the three quarters of the batch's layer outputs that K=1 holds at once
    and K=4 does not (each layer's output stays alive until the backward pass has used it)."""
    batch = 4096
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch + 256, 28, 28), np.uint8)
    np.savez(
        tmp_path / "data.npz",
        **{"x_train": images[:batch], "y_train": np.arange(batch) % 10},
        **{"x_test": images[batch:], "y_test": np.arange(256) % 10},
    )
    model = models.build_model(Config(), (28, 28, 1))
    outputs = sum(math.prod(layer.output.shape[1:]) * 4 for _, layer in models.weighted_layers(model))
    flags = (f"--dataset={tmp_path / 'data.npz'}", f"--batch_size={batch}", "--validation_split=0")
    flags += ("--jit_compile=false", f"--logdir={tmp_path}")
    peaks = {
        count: peak_rss(tmp_path / f"{count}.log", *flags, f"--accumulation_steps={count}", f"--run_name=k{count}")
        for count in (1, 4)
    }
    print(f"peak RSS at batch {batch}: K=1 {peaks[1] / 2**20:.0f} MiB, K=4 {peaks[4] / 2**20:.0f} MiB")
    assert peaks[1] - peaks[4] >= (1 - 1 / 4) * batch * outputs


@pytest.mark.slow
def test_the_accumulation_example_trains_the_whole_batchs_model(tmp_path):
    """examples/accumulation.sh, as CI runs it (for one epoch of its four: 10 updates): the convnet
    at K=4 ends where K=1 ends, and compare shows the two runs side by side."""
    finished = run_example(["sh", "examples/accumulation.sh", str(tmp_path), "--epochs=1"])
    whole, accumulated = (
        json.loads((tmp_path / f"accumulation_steps={k}" / "result.json").read_text()) for k in (1, 4)
    )
    for split in ("train", "validation", "test"):
        assert set(accumulated[split]) == set(whole[split]), split
        for name, value in whole[split].items():
            assert accumulated[split][name] == pytest.approx(value, rel=1e-5), (split, name)
    rows = [line for line in finished.stdout.splitlines() if line.startswith("| accumulation_steps=")]
    assert [row.split("|")[1].strip() for row in rows] == ["accumulation_steps=1", "accumulation_steps=4"]
