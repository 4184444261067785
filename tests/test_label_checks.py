"""Data a classifier cannot train on, refused at load (issue 20): float labels (targets, not
classes), labels with most classes under 2 examples, and shapes: float (N, H, W) images get a
channel axis as uint8 ones do, and no shape refusal names as required the shape it refuses.

The regression data is scikit-learn's diabetes (442 patients, targets 25..346), which ships with
the package: nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import REPO
from helpers import assert_one_line_error
from sklearn.datasets import load_diabetes

from train_loop import Config, UsageError
from train_loop.data import sources
from train_loop.data.arrays import DataError, fingerprint
from train_loop.model import models
from train_loop.settings import ARRAYS_PREFIX

FLOAT_LABELS = (
    "labels of type {dtype}: float labels are targets (values to predict), not classes, and the default "
    "classifier takes integer class indices 0..K-1; for values pass a loss that takes them "
    "(--loss=mean_squared_error, --loss=huber), or if these are classes give them as integers (labels.astype(int))."
)
# Diabetes' first 400 patients train: 227 of the classes 0..346 have fewer than 2 of them.
DIABETES_CLASSES = (
    "347 classes (labels 0..346) for 400 examples, and 227 classes have fewer than 2 examples each: these look "
    "like regression targets or ids, not classes; a classifier needs several examples of most classes."
)


def diabetes(label_type: type) -> dict[str, np.ndarray]:
    """Scikit-learn's diabetes as a Keras-layout split: 400 patients to train on, 42 to test."""
    features, targets = load_diabetes(return_X_y=True)
    features, targets = features.astype(np.float32), targets.astype(label_type)
    return {"x_train": features[:400], "y_train": targets[:400], "x_test": features[400:], "y_test": targets[400:]}


def load(arrays: dict[str, np.ndarray], tmp_path: Path, given_as: str) -> sources.Splits:
    """The arrays read as the command line reads an .npz, or as train(data=...) takes them."""
    if given_as == "npz":
        path = tmp_path / "data.npz"
        np.savez(path, **arrays)
        return sources.load_splits(Config(dataset=str(path), model="linear"))
    return sources.load_splits(Config(dataset=ARRAYS_PREFIX + fingerprint(arrays), model="linear"), arrays)


def where(tmp_path: Path, given_as: str, key: str) -> str:
    return f"{key} in {tmp_path / 'data.npz'}" if given_as == "npz" else f"data[{key!r}]"


# Float labels: targets, not classes.


@pytest.mark.parametrize("given_as", ["npz", "arrays"])
@pytest.mark.parametrize("label_type", [np.float16, np.float32, np.float64])
def test_float_labels_are_refused_even_as_whole_numbers(tmp_path: Path, label_type: type, given_as: str) -> None:
    """Diabetes' targets are whole numbers 25..346: as floats they once trained a 347-class classifier."""
    arrays = diabetes(label_type)
    assert np.array_equal(arrays["y_train"], np.round(arrays["y_train"]))
    with pytest.raises(DataError) as caught:
        load(arrays, tmp_path, given_as)
    dtype = np.dtype(label_type).name
    assert str(caught.value) == f"{where(tmp_path, given_as, 'y_train')}: " + FLOAT_LABELS.format(dtype=dtype)


def test_float_test_labels_are_refused_by_their_name(tmp_path: Path) -> None:
    arrays = {**diabetes(np.int64), "y_test": np.zeros(42, np.float32)}
    with pytest.raises(DataError) as caught:
        load(arrays, tmp_path, "npz")
    assert str(caught.value) == f"{where(tmp_path, 'npz', 'y_test')}: " + FLOAT_LABELS.format(dtype="float32")


def test_float_labels_of_a_named_set_say_the_named_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An mnist.npz with float labels: the same refusal, with the classes 0..9 MNIST has."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(60, 28, 28), dtype=np.uint8)
    labels = (np.arange(60) % 10).astype(np.float64)
    np.savez(tmp_path / "mnist.npz", x_train=images[:50], y_train=labels[:50], x_test=images[50:], y_test=labels[50:])
    with pytest.raises(DataError, match=r"takes integer class indices 0\.\.9;") as caught:
        sources.load_splits(Config(dataset="mnist", data_dir=str(tmp_path)))
    assert str(caught.value).startswith(f"y_train in {tmp_path / 'mnist.npz'}: labels of type float64: ")


# Labels with more classes than the examples support.


@pytest.mark.parametrize("given_as", ["npz", "arrays"])
def test_diabetes_as_integers_is_refused_as_too_many_classes(tmp_path: Path, given_as: str) -> None:
    """`.astype(int)` passes the float check, and then 347 classes on 400 examples is refused."""
    with pytest.raises(DataError) as caught:
        load(diabetes(np.int64), tmp_path, given_as)
    assert str(caught.value) == f"{where(tmp_path, given_as, 'y_train')}: {DIABETES_CLASSES}"


@pytest.mark.parametrize(("labels", "refused"), [([0, 0, 1, 1, 2], False), ([0, 0, 0, 0, 1, 2], True)])
def test_classes_are_refused_when_more_than_half_have_under_2_examples(
    tmp_path: Path, labels: list[int], refused: bool
) -> None:
    """Four classes, the last seen only in the test split (no training example counts as under 2):
    two classes under 2 examples pass (half is not most), three are refused."""
    arrays = {
        "x_train": np.ones((len(labels), 3), np.float32),
        "y_train": np.array(labels),
        "x_test": np.ones((1, 3), np.float32),
        "y_test": np.array([3]),
    }
    if not refused:
        assert load(arrays, tmp_path, "arrays").num_classes == 4
        return
    with pytest.raises(DataError) as caught:
        load(arrays, tmp_path, "arrays")
    assert str(caught.value) == (
        "data['y_train']: 4 classes (labels 0..3) for 6 examples, and 3 classes have fewer than 2 examples each: "
        "these look like regression targets or ids, not classes; a classifier needs several examples of most "
        "classes."
    )


def test_the_bundled_example_data_pass(tmp_path: Path) -> None:
    """examples/wine.py's npz (3 cultivars) and examples/own_model.py's digits arrays are classes."""
    wine, own_model = (_example(name) for name in ("wine", "own_model"))
    wine.write_npz(str(tmp_path / "wine.npz"))
    assert sources.load_splits(Config(dataset=str(tmp_path / "wine.npz"), model="linear")).num_classes == 3
    assert load(own_model.digits_arrays(), tmp_path, "arrays").num_classes == 10


def _example(name: str) -> object:
    spec = importlib.util.spec_from_file_location(f"example_{name}", Path(REPO, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Float inputs of shape (N, H, W): images or sequences, kept as they are; the convnet adds the axis.


@pytest.mark.parametrize("given_as", ["npz", "arrays"])
def test_float_inputs_of_three_axes_keep_their_shape_and_values(tmp_path: Path, given_as: str) -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(48, 6, 5)).astype(np.float64)
    labels = np.arange(48) % 3
    arrays = {"x_train": images[:40], "y_train": labels[:40], "x_test": images[40:], "y_test": labels[40:]}
    splits = load(arrays, tmp_path, given_as)
    np.testing.assert_array_equal(splits.x_train, images[:40].astype(np.float32))
    np.testing.assert_array_equal(splits.x_test, images[40:].astype(np.float32))


def test_the_convnet_takes_float_images_without_a_channel_axis_and_refuses_features_by_their_shape() -> None:
    """(N, H, W) float images were refused by a message saying the convnet takes (N, H, W)."""
    images = np.random.default_rng(0).normal(size=(4, 6, 5)).astype(np.float32)
    model = models.build_model(Config(model="convnet", dataset="images.npz"), (6, 5), num_classes=3)
    with_axis = models.build_model(Config(model="convnet", dataset="images.npz"), (6, 5, 1), num_classes=3)
    assert model.input_shape == (None, 6, 5) and model.output_shape == (None, 3)
    # The same seeded weights: the axis it adds is all that differs from a convnet given it.
    np.testing.assert_allclose(model(images), with_axis(images[..., np.newaxis]), rtol=1e-6)
    with pytest.raises(UsageError) as caught:
        models.build_model(Config(model="convnet", dataset="wine.npz"), (13,), num_classes=3)
    assert str(caught.value) == (
        "--model=convnet takes images of shape (N, H, W) or (N, H, W, C); --dataset=wine.npz holds inputs of "
        "shape (N, 13): use --model=linear or a model function."
    )


def test_a_user_model_takes_float_sequences_as_they_are() -> None:
    """An LSTM built on its first call takes (N, T, F) floats: no axis is added to them."""

    def recurrent() -> keras.Model:
        return keras.Sequential([keras.layers.LSTM(4), keras.layers.Dense(3)])

    built = models.build_model(Config(model="notebook:recurrent"), (6, 5), num_classes=3, model_fn=recurrent)
    assert built(np.zeros((2, 6, 5), np.float32)).shape == (2, 3)


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        (
            np.ones(40, np.float32),
            "inputs of shape (40,), one number per example; expected one example per row with at least one "
            "feature, (N, F) or (N, H, W): inputs.reshape(-1, 1) gives one feature each.",
        ),
        (
            np.ones((40, 13), np.int64),
            "inputs of type int64; expected uint8 images (scaled to [0, 1]) or floats (used as they are): convert "
            "them with inputs.astype(np.float32), scaled as the model needs.",
        ),
    ],
    ids=["one-number-per-example", "integer-inputs"],
)
def test_bad_inputs_name_only_what_is_wrong_with_them(tmp_path: Path, inputs: np.ndarray, expected: str) -> None:
    """(40, 13) int64 inputs were told 'expected one example per row, (N, ...)': the shape they have."""
    arrays = {"x_train": inputs, "y_train": np.arange(40) % 3, "x_test": inputs[:8], "y_test": np.arange(8) % 3}
    with pytest.raises(DataError) as caught:
        load(arrays, tmp_path, "arrays")
    assert str(caught.value) == f"data['x_train']: {expected}"


@pytest.mark.parametrize("given_as", ["npz", "arrays"])
def test_a_column_of_labels_is_told_how_to_flatten(tmp_path: Path, given_as: str) -> None:
    """Labels of shape (N, 1), as pandas and scikit-learn often give, were told only the shape expected."""
    inputs = np.ones((40, 13), np.float32)
    column = (np.arange(40) % 3).reshape(-1, 1)
    arrays = {"x_train": inputs, "y_train": column, "x_test": inputs[:8], "y_test": np.arange(8) % 3}
    with pytest.raises(DataError) as caught:
        load(arrays, tmp_path, given_as)
    assert str(caught.value) == (
        f"{where(tmp_path, given_as, 'y_train')}: labels of shape (40, 1), a column; expected class indices of "
        "shape (40,): labels.reshape(-1) gives them."
    )


# From the command line: exit 2, the one line, nothing written.


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
@pytest.mark.parametrize(
    ("label_type", "expected"),
    [(np.float32, FLOAT_LABELS.format(dtype="float32")), (np.int64, DIABETES_CLASSES)],
    ids=["float-targets", "integer-targets"],
)
def test_diabetes_from_the_command_line_exits_2_and_writes_nothing(
    tmp_path: Path, run_cli, label_type: type, expected: str
) -> None:
    path = tmp_path / "diabetes.npz"
    np.savez(path, **diabetes(label_type))
    result = run_cli(f"--dataset={path}", "--model=linear", "--epochs=1")
    assert_one_line_error(result, ())
    assert result.stderr.strip() == f"train_loop: error: y_train in {path}: {expected}"
    assert not (tmp_path / "logs").exists()
