"""Dropout's masks are keyed by (seed, step, the example's place in the global batch): one device,
two replicas and two workers draw the same ones, and a resumed run the uninterrupted run's."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import events
from test_faults import finish, read_result, start

import train_loop
from train_loop.data import inputs
from train_loop.model.dropout import ExampleDropout, use_step

RATE = 0.3
# SGD: RMSprop's first steps divide by the root of near-zero squared gradients, which turns the
# replicas' other summation order (1e-7) into 1e-3 of the loss within 20 steps under XLA.
SETTINGS = dict(
    dataset="digits",
    dropout=RATE,
    optimizer="sgd",
    learning_rate=0.05,
    batch_size=64,
    jit_compile=False,
    deterministic=True,
    steps_per_loop=4,
    summary_every=5,
)


def dropped(layer: ExampleDropout, batch: np.ndarray) -> np.ndarray:
    return layer(tf.constant(batch), training=True).numpy()


def test_an_examples_mask_is_the_same_in_any_batch_and_on_any_replica():
    examples = np.ones([8, 5, 3], np.float32)
    step = tf.Variable(4, dtype=tf.int64)
    layer = ExampleDropout(RATE, seed=11)
    use_step(keras.Sequential([keras.Input(shape=(5, 3)), layer]), lambda: step)
    whole = dropped(layer, examples)
    assert set(np.unique(whole)) == {0.0, np.float32(1 / (1 - RATE))}
    assert 0.15 < np.mean(whole == 0) < 0.45
    # Each example's own mask: rows of one batch differ.
    assert len({row.tobytes() for row in whole}) == len(whole)

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    halves = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(examples[context.replica_id_in_sync_group * 4 :][:4])
    )
    per_replica = strategy.run(tf.function(lambda batch: layer(batch, training=True)), args=(halves,))
    np.testing.assert_array_equal(np.concatenate([value.numpy() for value in per_replica.values]), whole)

    # The same example, another batch: the first example alone draws the first row's mask.
    np.testing.assert_array_equal(dropped(layer, examples[:1]), whole[:1])
    step.assign(5)
    assert not np.array_equal(dropped(layer, examples), whole)
    np.testing.assert_array_equal(layer(tf.constant(examples), training=False).numpy(), examples)


@pytest.mark.parametrize("num_replicas, num_pipelines", [(1, 1), (2, 1), (2, 2), (4, 2), (6, 3)])
def test_global_positions_invert_how_the_pipelines_deal_the_global_batch(num_replicas, num_pipelines):
    rows, steps = 3, 2
    global_batch = rows * num_replicas
    order = tf.range(steps * global_batch)
    for pipeline in range(num_pipelines):
        context = tf.distribute.InputContext(num_pipelines, pipeline, num_replicas)
        batches = inputs._pipeline_batches(order, context, global_batch).numpy()
        per_step = num_replicas // num_pipelines
        for index, batch in enumerate(batches):
            step, local = divmod(index, per_step)
            replica = pipeline * per_step + local
            positions = inputs.global_positions(rows, tf.constant(replica), num_replicas, num_pipelines)
            np.testing.assert_array_equal(batch - step * global_batch, positions.numpy())


# What differs between any two runs: the clock's readings.
TIMING = ("examples_per_second", "seconds", "wall_time")


def logged(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every number the run logged, by writer/tag, and metrics.jsonl's lines, less their timing."""
    series = {}
    for writer in ("train", "validation", "test"):
        accumulator = events(str(run_dir), writer)
        for tag in (tag for tag in accumulator.Tags()["tensors"] if not any(word in tag for word in TIMING)):
            values = {event.step: tf.make_ndarray(event.tensor_proto) for event in accumulator.Tensors(tag)}
            if all(value.shape == () and value.dtype.kind in "fiu" for value in values.values()):
                series[f"{writer}/{tag}"] = {step: float(value) for step, value in values.items()}
    for index, line in enumerate((run_dir / "metrics.jsonl").read_text().splitlines()):
        for key, value in json.loads(line).items():
            if key not in TIMING and isinstance(value, (int, float)):
                series.setdefault(f"metrics.jsonl/{key}", {})[index] = float(value)
    return series


def assert_same_run(run: Path, reference: Path, rel: float = 1e-5) -> None:
    result, expected = read_result(run), read_result(reference)
    for split in ("train", "validation", "test"):
        for name, value in expected[split].items():
            assert result[split][name] == pytest.approx(value, rel=rel, abs=1e-7), (split, name)
    assert (result["steps"], result["best_step"], result["confusion_matrix"]) == (
        expected["steps"],
        expected["best_step"],
        expected["confusion_matrix"],
    )
    series, expected_series = logged(run), logged(reference)
    assert sorted(series) == sorted(expected_series) and "train/loss/cross_entropy" in series
    for tag, values in expected_series.items():
        assert list(series[tag]) == list(values), tag
        np.testing.assert_allclose(list(series[tag].values()), list(values.values()), rtol=rel, atol=1e-7, err_msg=tag)


@pytest.mark.slow
@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_two_replicas_draw_one_devices_masks(tmp_path, jit_compile):
    settings = dict(SETTINGS, logdir=str(tmp_path), jit_compile=jit_compile)
    train_loop.train(strategy="one_device", run_name="one", **settings)
    two = train_loop.train(strategy="mirrored", cpu_replicas=2, run_name="two", **settings)
    assert two["replicas"] == 2
    assert_same_run(tmp_path / "two", tmp_path / "one")


@pytest.mark.slow
def test_two_workers_draw_one_devices_masks(tmp_path):
    flags = [f"--{name}={str(value).lower()}" for name, value in SETTINGS.items()]
    launched = start("--workers=2", "--", *flags, f"--logdir={tmp_path}", "--run_name=two", module="train_loop.launch")
    status, stdout, stderr = finish(launched)
    assert status == 0, stdout[-3000:] + stderr[-3000:]
    assert (read_result(tmp_path / "two")["strategy"], read_result(tmp_path / "two")["replicas"]) == ("multi_worker", 2)
    train_loop.train(strategy="one_device", run_name="one", logdir=str(tmp_path), **SETTINGS)
    assert_same_run(tmp_path / "two", tmp_path / "one")
