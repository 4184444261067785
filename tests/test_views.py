"""What TensorBoard shows beyond the losses: confusion matrix, weight and gradient norms, profile."""

from __future__ import annotations

import glob
import importlib.util
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import events

from train_loop import Config, train
from train_loop.data import sources
from train_loop.model import models
from train_loop.model.state import build_state
from train_loop.outputs import summaries
from train_loop.outputs.events import scalar_series

pytestmark = pytest.mark.slow  # every test here trains a model

LEARNING_RATE = 0.1


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory):
    """One digits epoch with plain SGD, a summary and a checkpoint after every step.

    With SGD and no momentum, w_k = w_(k-1) - lr * g_k: the gradient of step k is readable
    from two consecutive checkpoints, which makes the logged gradient norms checkable.
    """
    config = Config(
        dataset="digits",
        optimizer="sgd",
        learning_rate=LEARNING_RATE,
        l2=0.001,
        summary_every=1,
        checkpoint_every=1,
        steps_per_loop=1,
        logdir=str(tmp_path_factory.mktemp("views")),
        run_name="sgd",
    )
    result = train(config)
    return config, f"{config.logdir}/sgd", result


def checkpoint_weights(config: Config, path: str) -> dict[str, list[np.ndarray]]:
    """Each weighted layer's [kernel, bias] in checkpoint `path`, restored into a fresh model."""
    state = build_state(config, tf.distribute.get_strategy(), sources.input_spec(config)[0])
    tf.train.Checkpoint(**state.trackables()).restore(path).expect_partial()
    return {
        path: [np.asarray(w, np.float64) for w in layer.get_weights()]
        for path, layer in models.weighted_layers(state.model)
    }


def test_confusion_matrix_counts_match_the_saved_models_predictions(sgd_run):
    config, run_dir, result = sgd_run
    counts = np.array(result["confusion_matrix"])
    splits = sources.load_splits(config)
    assert counts.sum() == len(splits.y_test) == 360
    model = keras.models.load_model(f"{run_dir}/model.keras")
    predicted = np.argmax(model.predict(splits.x_test, verbose=0), axis=-1)
    expected = np.zeros((10, 10), np.int64)
    np.add.at(expected, (splits.y_test, predicted), 1)
    np.testing.assert_array_equal(counts, expected)
    assert np.trace(counts) / counts.sum() == pytest.approx(result["test"]["accuracy"], abs=1e-6)


def test_confusion_matrix_image_shades_each_cell_by_its_row_share(sgd_run):
    _, run_dir, result = sgd_run
    images = events(run_dir, "test").Tensors("confusion_matrix")
    assert [event.step for event in images] == [result["steps"]]
    width, height, png = tf.make_ndarray(images[0].tensor_proto)
    pixels = tf.io.decode_png(png).numpy()
    cell = summaries.CELL_PIXELS
    # A row and a column of cells more: the labels' indices along the top and the left.
    assert (int(width), int(height), pixels.shape) == (11 * cell, 11 * cell, (11 * cell, 11 * cell, 3))
    counts = np.array(result["confusion_matrix"], np.float64)
    shares = counts / counts.sum(axis=1, keepdims=True)
    centres = pixels[cell + cell // 2 :: cell, cell + cell // 2 :: cell].astype(np.float64) / 255.0
    empty, full = np.array(summaries._EMPTY), np.array(summaries._FULL)
    np.testing.assert_allclose(centres, empty + shares[..., None] * (full - empty), atol=1 / 255)


def test_confusion_matrix_of_a_named_data_set_carries_its_class_names(tmp_path):
    """Fashion-MNIST's labels name the counts table's rows and columns and the image's order."""
    names = sources.class_names("fashion_mnist")
    counts = np.arange(100).reshape(10, 10)
    writer = summaries.Summaries(str(tmp_path), class_names=names)
    writer.write_evaluation("validation", 7, {"loss/cross_entropy": 0.5, "accuracy": 0.9}, counts)
    writer.close()

    (table,) = events(str(tmp_path), "validation").Tensors("confusion_matrix_counts")
    lines = tf.make_ndarray(table.tensor_proto).item().decode().splitlines()
    assert lines[0] == f"| true \\ predicted | {' | '.join(names)} |"
    for name, row, line in zip(names, counts, lines[2:], strict=True):
        assert line == f"| {name} | {' | '.join(map(str, row))} |"
    image = events(str(tmp_path), "validation").SummaryMetadata("confusion_matrix")
    assert "0 T-shirt/top, 1 Trouser" in image.summary_description and names[-1] == "Ankle boot"


def test_weight_norms_match_the_checkpoint(sgd_run):
    config, run_dir, result = sgd_run
    last = result["steps"]
    weights = checkpoint_weights(config, f"{run_dir}/checkpoints/ckpt-{last}")
    for layer, (kernel, _) in weights.items():
        logged = scalar_series(run_dir, "train", f"weight_norm/{layer}")
        assert logged[last] == pytest.approx(np.linalg.norm(kernel), rel=1e-5), layer


def test_gradient_norms_match_the_step_between_two_checkpoints(sgd_run):
    config, run_dir, result = sgd_run
    last = result["steps"]
    before = checkpoint_weights(config, f"{run_dir}/checkpoints/ckpt-{last - 1}")
    after = checkpoint_weights(config, f"{run_dir}/checkpoints/ckpt-{last}")
    squares = 0.0
    for layer in before:
        gradients = [(old - new) / LEARNING_RATE for old, new in zip(before[layer], after[layer])]
        logged = scalar_series(run_dir, "train", f"gradient_norm/{layer}")
        assert logged[last] == pytest.approx(np.linalg.norm(gradients[0]), rel=1e-3), layer
        squares += sum(np.sum(g**2) for g in gradients)
    logged = scalar_series(run_dir, "train", "gradient_norm")
    assert logged[last] == pytest.approx(np.sqrt(squares), rel=1e-3)


def traced_loop_calls(path: str) -> list[tuple[int, int]]:
    """The loop calls a profiler trace holds, as (first step, number of steps), from the "train"
    events the controller marks them with, read from the XSpace protobuf the profiler writes."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace.FromString(Path(path).read_bytes())
    calls = []
    for plane in space.planes:
        names = {key: metadata.name for key, metadata in plane.stat_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                if plane.event_metadata[event.metadata_id].name == "train":
                    stats = {names[stat.metadata_id]: stat.int64_value or stat.uint64_value for stat in event.stats}
                    calls.append((stats["step_num"], stats["num_steps"]))
    return sorted(calls)


def test_profile_steps_write_a_trace_of_those_steps(run_cli, tmp_path):
    finished = run_cli("--dataset=digits", "--profile_steps=3,6", "--run_name=profiled")
    assert finished.returncode == 0, finished.stderr
    traces = glob.glob(str(tmp_path / "logs/profiled/train/plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and Path(traces[0]).stat().st_size > 0, traces
    # One loop call, from step 3 to step 6 (both boundaries): steps 4, 5 and 6, and nothing else.
    assert traced_loop_calls(traces[0]) == [(4, 3)]
    result = json.loads((tmp_path / "logs/profiled/result.json").read_text())
    assert result["steps"] == (1437 - 144) // 32  # digits less its validation split, at batch 32
    plugin_missing = importlib.util.find_spec("tensorboard_plugin_profile") is None
    assert ("pip install 'train_loop[profile]'" in finished.stderr) == plugin_missing, finished.stderr


def test_gradient_histograms_at_histogram_steps_are_equal_on_one_device_and_two_replicas(tmp_path):
    """`gradient/<layer>` at each `--histogram_every` step (and no other), over every element of the
    kernel; the summed gradient's, so 2 replicas log one device's histograms."""
    settings = dict(
        dataset="digits",
        logdir=str(tmp_path),
        histogram_every=10,
        steps_per_loop=7,
        validation_split=0.0,
        jit_compile=False,
    )
    train(Config(strategy="one_device", run_name="one", **settings))
    train(Config(strategy="mirrored", cpu_replicas=2, run_name="two", **settings))
    layers = models.weighted_layers(models.build_model(Config(), (8, 8, 1)))
    histograms = {}
    for name in ("one", "two"):
        accumulator = events(str(tmp_path / name), "train")
        assert {tag for tag in accumulator.Tags()["tensors"] if tag.startswith("gradient/")} == {
            f"gradient/{path}" for path, _ in layers
        }
        histograms[name] = {
            path: {event.step: tf.make_ndarray(event.tensor_proto) for event in accumulator.Tensors(f"gradient/{path}")}
            for path, _ in layers
        }
    for path, layer in layers:
        one, two = histograms["one"][path], histograms["two"][path]
        assert list(one) == list(two) == [10, 20, 30, 40], path
        for step, buckets in one.items():
            assert buckets[:, 2].sum() == np.prod(layer.kernel.shape), (path, step)
            np.testing.assert_allclose(two[step], buckets, rtol=1e-4, atol=1e-7, err_msg=f"{path} at {step}")
