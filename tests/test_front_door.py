"""What a newcomer meets first: the Custom Scalars layout TensorBoard opens on, the confusion
matrix's numbered axes, `train()` naming its run folder, `load()` giving the trained model back,
and `compare` reporting every run it can read."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata

import train_loop
from train_loop import Config, UsageError
from train_loop.data import sources
from train_loop.model.measurements import CLASSIFIER
from train_loop.outputs import summaries
from train_loop.outputs.custom_scalars import scalars_layout


def test_custom_scalars_layout_reads_back_through_tensorboard(tmp_path):
    """The layout a run writes with its settings is the one TensorBoard's loader reads from the
    run's folder, loss terms first."""
    writer = summaries.Summaries(str(tmp_path))
    writer.write_settings("r", {"l2": 0.001})
    writer.close()

    settings = event_accumulator.EventAccumulator(summaries.writer_dir(str(tmp_path), "settings")).Reload()
    (event,) = settings.Tensors(custom_scalar_metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(tf.make_ndarray(event.tensor_proto).item())
    assert layout == scalars_layout(CLASSIFIER)
    first = layout.category[0].chart[0].multiline.tag
    assert list(first) == ["^loss/cross_entropy$", "^loss/regularization$", "^loss/total$"]
    assert [chart.multiline.tag[0] for chart in layout.category[1].chart] == ["^regularization/"]
    assert [chart.multiline.tag[0] for chart in layout.category[2].chart] == [
        "^weight_norm/",
        "^gradient_norm/",
        "^gradient_norm$",
    ]


def test_confusion_image_numbers_its_rows_and_columns():
    """Twelve classes: the cells sit one cell right and down, each shaded by its row share; the
    margin holds each label's digits in the 3x5 font, twice the size, centred in its cell."""
    cell, counts = summaries.CELL_PIXELS, np.diag(np.arange(1, 13)) + 1
    (image,) = summaries.confusion_image(counts)
    assert image.shape == (13 * cell, 13 * cell, 3)
    shares = counts / counts.sum(axis=1, keepdims=True)
    empty, full = np.array(summaries._EMPTY), np.array(summaries._FULL)
    centres = image[cell + cell // 2 :: cell, cell + cell // 2 :: cell] / 255.0
    np.testing.assert_allclose(centres, empty + shares[..., None] * (full - empty), atol=1 / 255)
    assert (image[:cell, :cell] == 255).all()  # The corner is blank.
    ink = np.round(np.array(summaries._INK) * 255)
    for label in (3, 11):
        digits = [np.repeat(np.repeat(summaries._DIGITS[int(d)], 2, axis=0), 2, axis=1) for d in str(label)]
        glyph = np.concatenate([part for d in digits for part in (d, np.zeros((10, 2), bool))][:-1], axis=1)
        offset = cell * (label + 1)
        for margin in (image[:cell, offset : offset + cell], image[offset : offset + cell, :cell]):
            inked = (margin == ink).all(axis=-1)
            rows, columns = np.nonzero(inked)
            assert (rows.min(), columns.min()) == ((cell - glyph.shape[0]) // 2, (cell - glyph.shape[1]) // 2)
            box = inked[rows.min() : rows.min() + glyph.shape[0], columns.min() : columns.min() + glyph.shape[1]]
            np.testing.assert_array_equal(box, glyph)
            assert inked.sum() == glyph.sum()


def small_model() -> keras.Model:
    """A user's model for the arrays run: six features, three classes."""
    inputs = keras.Input((6,))
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(keras.layers.Dense(8, name="hidden")(inputs)))


def small_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    y = np.argmax(x[:, :3], axis=1).astype(np.int64)
    return {"x_train": x[:96], "y_train": y[:96], "x_test": x[96:], "y_test": y[96:]}


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> tuple[str, list[dict]]:
    """Two digits runs under one name (the second takes `r-2`), the first keeping its moving
    average; and a run of arrays given in Python."""
    logdir = str(tmp_path_factory.mktemp("front-door") / "logs")
    results = [
        train_loop.train(dataset="digits", logdir=logdir, run_name="r", ema=0.9),
        train_loop.train(dataset="digits", logdir=logdir, run_name="r", l2=0.001),
        train_loop.train(data=small_arrays(), model_fn=small_model, logdir=logdir, run_name="arrays", batch_size=16),
    ]
    return logdir, results


@pytest.mark.slow
def test_train_returns_the_run_folder_it_took(logdir):
    """The result names the folder actually taken, absolute; result.json, inside it, does not."""
    folder, results = logdir
    assert [result["run_dir"] for result in results] == [
        os.path.join(os.path.abspath(folder), name) for name in ("r", "r-2", "arrays")
    ]
    for result in results:
        with open(os.path.join(result["run_dir"], "result.json")) as stream:
            saved = json.load(stream)
        assert "run_dir" not in saved
        assert {key: value for key, value in result.items() if key != "run_dir"} == saved


@pytest.mark.slow
def test_load_gives_the_kept_model(logdir):
    """load(run) predicts what model.keras predicts, and scores result.json's test accuracy."""
    _, results = logdir
    splits = sources.load_splits(Config(dataset="digits"))
    for result in results[:2]:
        model = train_loop.load(result["run_dir"])
        saved = keras.models.load_model(os.path.join(result["run_dir"], "model.keras"))
        logits = model.predict(splits.x_test, verbose=0)
        np.testing.assert_array_equal(logits, saved.predict(splits.x_test, verbose=0))
        accuracy = np.mean(np.argmax(logits, axis=-1) == splits.y_test)
        assert accuracy == pytest.approx(result["test"]["accuracy"], abs=1e-6)


@pytest.mark.slow
def test_load_refuses_a_folder_that_is_not_a_finished_run(logdir, tmp_path):
    folder, results = logdir
    unfinished = tmp_path / "unfinished"
    shutil.copytree(results[0]["run_dir"], unfinished)
    os.remove(unfinished / "result.json")
    for path in (str(unfinished), folder, str(tmp_path / "missing")):
        with pytest.raises(UsageError, match=r"is not a finished run \(no result.json and model.keras in it\)"):
            train_loop.load(path)


@pytest.mark.slow
def test_compare_reports_every_run_it_can_read(logdir, tmp_path):
    """Two digits runs and an arrays run are all reported; a copy whose model.keras is damaged is
    left out with one line naming it and why, and the exit status is still 0."""
    folder, results = logdir
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    shutil.copytree(mixed / "r", mixed / "damaged")
    (mixed / "damaged" / "model.keras").write_bytes(b"not a zip file")

    done = subprocess.run(
        [sys.executable, "-m", "train_loop.compare", str(mixed)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=dict(os.environ),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split(" | ")[0].removeprefix("| ") for line in done.stdout.splitlines()[2:]]
    assert rows == ["arrays", "r", "r-2"]
    for result, line in zip(sorted(results, key=lambda result: result["run_dir"]), done.stdout.splitlines()[2:]):
        assert f" {result['test']['accuracy']:.4f} " in line
    (left_out,) = [line for line in done.stderr.splitlines() if "left out" in line]
    assert left_out.startswith(
        f"train_loop: warning: left out run damaged: cannot load {mixed / 'damaged' / 'model.keras'} ("
    )
