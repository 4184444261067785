"""`sources` and `inputs`: finding and reading the data sets, their errors, and the `tf.data` pipelines.

Every file here is a real file written into pytest's `tmp_path` (npz with NumPy, IDX with `struct`
and `gzip` following the IDX layout); nothing is mocked. `KERAS_HOME` points at an empty folder of
the test's own, so a cache in the user's home never leaks in, and `TRAIN_LOOP_OFFLINE` (set by
conftest) keeps Keras' download out of reach.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from train_loop.configs import Config
from train_loop.data import idx, inputs, named_sets, sources
from train_loop.data.arrays import DataError, Splits, fingerprint, hold_out
from train_loop.errors import UsageError
from train_loop.settings import ARRAYS_PREFIX

IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = idx.IDX_FILES
KEYS = ("x_train", "y_train", "x_test", "y_test")


@pytest.fixture(autouse=True)
def keras_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty `KERAS_HOME` of the test's own; `datasets/` inside it is where Keras caches data."""
    home = tmp_path / "keras_home"
    home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


def make_arrays(seed: int = 0, n_train: int = 64, n_test: int = 16) -> dict[str, np.ndarray]:
    """Small MNIST-shaped uint8 splits, different for every seed."""
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }


def write_npz(folder: Path, arrays: dict[str, np.ndarray], name: str = "mnist.npz") -> Path:
    """A Keras-layout npz (the keys of `arrays`) in `folder`, made if need be."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    np.savez(path, **arrays)
    return path


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False, magic: int | None = None) -> Path:
    """One IDX file: big-endian uint32 magic, one big-endian uint32 per dimension, then the bytes."""
    if magic is None:
        magic = IMAGES_MAGIC if array.ndim == 3 else LABELS_MAGIC
    content = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    content += np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as stream:
            stream.write(content)
    else:
        path.write_bytes(content)
    return path


def write_idx_set(folder: Path, arrays: dict[str, np.ndarray], *, gz: bool = False) -> dict[str, Path]:
    """The four IDX files of `arrays` in `folder`; returns their paths by npz key."""
    folder.mkdir(parents=True, exist_ok=True)
    names = zip(KEYS, idx.IDX_FILES, strict=True)
    return {key: write_idx(folder / name, arrays[key], gz=gz) for key, name in names}


def assert_splits_hold(splits: Splits, arrays: dict[str, np.ndarray]) -> None:
    """Images as float32 uint8/255 with a channel axis, labels as int32, exactly as written."""
    for images_key, labels_key in (("x_train", "y_train"), ("x_test", "y_test")):
        images, labels = getattr(splits, images_key), getattr(splits, labels_key)
        written_images, written_labels = arrays[images_key], arrays[labels_key]
        assert images.shape == (len(written_images), 28, 28, 1)
        assert images.dtype == np.float32
        assert 0.0 <= images.min() and images.max() <= 1.0
        np.testing.assert_array_equal(images[..., 0], written_images.astype(np.float32) / np.float32(255))
        np.testing.assert_array_equal(np.rint(images[..., 0] * 255).astype(np.uint8), written_images)
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(labels, written_labels.astype(np.int32))


# Reading the formats.


def test_reads_keras_layout_npz(tmp_path: Path) -> None:
    """mnist.npz in --data_dir: shapes, dtypes, scaling, labels, and `source` naming the file."""
    arrays = make_arrays()
    path = write_npz(tmp_path / "data", arrays)

    splits = sources.load_splits(Config(dataset="mnist", data_dir=str(tmp_path / "data")))

    assert splits.x_train.shape == (64, 28, 28, 1) and splits.x_test.shape == (16, 28, 28, 1)
    assert_splits_hold(splits, arrays)
    assert splits.source == str(path)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_reads_four_idx_files(tmp_path: Path, gz: bool) -> None:
    """The four IDX files, plain or gzipped, come back as the arrays that were written."""
    arrays = make_arrays(seed=1)
    write_idx_set(tmp_path / "data", arrays, gz=gz)

    splits = sources.load_splits(Config(dataset="mnist", data_dir=str(tmp_path / "data")))

    assert_splits_hold(splits, arrays)
    assert splits.source == str(tmp_path / "data")


@pytest.fixture
def data_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A decoded-data cache folder of the test's own (not created: the first write makes it)."""
    folder = tmp_path / "data_cache"
    monkeypatch.setenv(idx.DATA_CACHE_ENV, str(folder))
    return folder


def read_mnist(folder: Path) -> Splits:
    return sources.load_splits(Config(dataset="mnist", data_dir=str(folder)))


def test_gzipped_idx_files_are_decoded_once_into_the_cache(tmp_path: Path, data_cache: Path) -> None:
    """The first read leaves the decoded arrays in the cache; the second reads them from there and
    gives the same splits. Plain IDX files, which read as fast, are not cached."""
    arrays = make_arrays(seed=3)
    write_idx_set(tmp_path / "gz", arrays, gz=True)

    first = read_mnist(tmp_path / "gz")
    [cached] = data_cache.iterdir()
    with np.load(cached) as archive:
        for key in KEYS:
            np.testing.assert_array_equal(archive[key], arrays[key])
    again = read_mnist(tmp_path / "gz")

    assert_splits_hold(first, arrays)
    assert_splits_hold(again, arrays)
    assert again.source == str(tmp_path / "gz")
    write_idx_set(tmp_path / "plain", make_arrays(seed=4))
    read_mnist(tmp_path / "plain")
    assert list(data_cache.iterdir()) == [cached]


def test_a_changed_idx_file_is_decoded_again(tmp_path: Path, data_cache: Path) -> None:
    """The cache is keyed by the files' bytes: new data in the same place is never an old entry."""
    write_idx_set(tmp_path / "data", make_arrays(seed=5), gz=True)
    read_mnist(tmp_path / "data")
    changed = make_arrays(seed=6)
    write_idx_set(tmp_path / "data", changed, gz=True)

    assert_splits_hold(read_mnist(tmp_path / "data"), changed)
    assert len(list(data_cache.iterdir())) == 2


def _flip_a_pixel(content: bytes) -> bytes:
    middle = len(content) // 2
    return content[:middle] + bytes([content[middle] ^ 0xFF]) + content[middle + 1 :]


def _labels_out_of_range(content: bytes) -> bytes:
    stream = io.BytesIO()
    np.savez(stream, **{**make_arrays(seed=7), "y_train": np.full(64, 42, np.uint8)})
    return stream.getvalue()


@pytest.mark.parametrize(
    "damage",
    [
        lambda content: content[: len(content) // 2],
        lambda content: b"not an npz at all",
        lambda content: b"",
        _flip_a_pixel,
        _labels_out_of_range,
    ],
    ids=["truncated", "garbage", "empty", "flipped_byte", "labels_out_of_range"],
)
def test_a_damaged_data_cache_is_decoded_again_and_rewritten(
    tmp_path: Path, data_cache: Path, damage: Callable[[bytes], bytes]
) -> None:
    """Whatever happened to the cached file, the run reads the real data, and the cache heals."""
    arrays = make_arrays(seed=8)
    write_idx_set(tmp_path / "data", arrays, gz=True)
    read_mnist(tmp_path / "data")
    [cached] = data_cache.iterdir()
    healthy = cached.read_bytes()
    cached.write_bytes(damage(healthy))

    assert_splits_hold(read_mnist(tmp_path / "data"), arrays)
    assert cached.read_bytes() == healthy


def test_an_unwritable_or_disabled_data_cache_still_reads_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache folder that cannot be made (a file is in the way), or one turned off: the data is
    read all the same, and nothing is written."""
    arrays = make_arrays(seed=9)
    write_idx_set(tmp_path / "data", arrays, gz=True)
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    before = sorted(tmp_path.rglob("*"))

    for setting in (str(blocker / "cache"), "off"):
        monkeypatch.setenv(idx.DATA_CACHE_ENV, setting)
        assert_splits_hold(read_mnist(tmp_path / "data"), arrays)
        assert sorted(tmp_path.rglob("*")) == before


def test_a_folder_with_some_idx_files_names_the_missing_ones(tmp_path: Path) -> None:
    """Two of the four IDX files: a DataError naming the folder and the two missing, no download."""
    written = write_idx_set(tmp_path / "data", make_arrays(seed=2))
    for key in ("y_train", "x_test"):  # TRAIN_LABELS and TEST_IMAGES
        written[key].unlink()

    with pytest.raises(DataError) as caught:
        sources.load_splits(Config(dataset="mnist", data_dir=str(tmp_path / "data")))
    message = str(caught.value)
    assert str(tmp_path / "data") in message and TRAIN_LABELS in message and TEST_IMAGES in message
    assert TRAIN_IMAGES not in message and TEST_LABELS not in message


# Where the data is looked for.


def test_data_dir_wins_over_keras_home(tmp_path: Path, keras_home: Path) -> None:
    """--data_dir is read before KERAS_HOME/datasets when both hold the data set."""
    mine, cached = make_arrays(seed=1), make_arrays(seed=2)
    path = write_npz(tmp_path / "data", mine)
    write_npz(keras_home / "datasets", cached)

    splits = sources.load_splits(Config(dataset="mnist", data_dir=str(tmp_path / "data")))

    assert_splits_hold(splits, mine)
    assert splits.source == str(path)


def test_keras_home_used_without_data_dir(keras_home: Path) -> None:
    """With --data_dir empty, KERAS_HOME/datasets/mnist.npz (Keras' own cache) is read."""
    cached = make_arrays(seed=2)
    path = write_npz(keras_home / "datasets", cached)

    splits = sources.load_splits(Config(dataset="mnist"))

    assert_splits_hold(splits, cached)
    assert splits.source == str(path)


def test_fashion_mnist_from_keras_cache_folder(keras_home: Path) -> None:
    """Keras caches Fashion-MNIST as gzipped IDX files in datasets/fashion-mnist/: they are read."""
    cached = make_arrays(seed=3)
    folder = keras_home / "datasets" / "fashion-mnist"
    write_idx_set(folder, cached, gz=True)

    splits = sources.load_splits(Config(dataset="fashion_mnist"))

    assert_splits_hold(splits, cached)
    assert splits.source == str(folder)


@pytest.mark.skipif(
    not os.path.isdir(named_sets.DEBIAN_FASHION_MNIST),
    reason=f"{named_sets.DEBIAN_FASHION_MNIST} missing (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_from_debian_folder() -> None:
    """With an empty KERAS_HOME, Debian's dataset-fashion-mnist folder is found and read whole."""
    splits = sources.load_splits(Config(dataset="fashion_mnist"))

    assert splits.source == named_sets.DEBIAN_FASHION_MNIST
    assert splits.x_train.shape == (60_000, 28, 28, 1) and splits.x_test.shape == (10_000, 28, 28, 1)
    assert splits.y_train.shape == (60_000,) and splits.y_test.shape == (10_000,)
    assert splits.x_train.dtype == np.float32 and splits.y_train.dtype == np.int32
    assert 0.0 <= splits.x_train.min() and splits.x_train.max() <= 1.0
    assert set(np.unique(splits.y_train)) == set(range(10))


def test_nothing_found_offline_points_to_digits(tmp_path: Path) -> None:
    """No data anywhere and downloading off: one DataError that suggests --dataset=digits."""
    assert os.environ.get(named_sets.OFFLINE_ENV)  # conftest's promise that nothing downloads
    empty = tmp_path / "empty"
    empty.mkdir()

    with pytest.raises(DataError, match="--dataset=digits"):
        sources.load_splits(Config(dataset="mnist", data_dir=str(empty)))


def test_nothing_found_names_the_keras_home_searched(tmp_path: Path, keras_home: Path) -> None:
    """The 'not found' message names the cache folder actually searched, $KERAS_HOME/datasets."""
    empty = tmp_path / "empty"
    empty.mkdir()

    with pytest.raises(DataError) as caught:
        sources.load_splits(Config(dataset="mnist", data_dir=str(empty)))
    assert str(keras_home / "datasets") in str(caught.value)


def test_missing_data_dir_is_named(tmp_path: Path) -> None:
    """A --data_dir that does not exist is a DataError naming it, not a silent fall-through."""
    missing = tmp_path / "no-such-folder"

    with pytest.raises(DataError, match="--data_dir") as caught:
        sources.load_splits(Config(dataset="mnist", data_dir=str(missing)))
    assert str(missing) in str(caught.value)


# Corrupt inputs: each writes a broken data set into `folder` and returns the file to be named.


def _bad_magic(folder: Path) -> tuple[Path, str]:
    paths = write_idx_set(folder, make_arrays())
    write_idx(paths["x_test"], make_arrays()["x_test"], magic=0x00000802)
    return paths["x_test"], "magic"


def _counts_disagree(folder: Path) -> tuple[Path, str]:
    arrays = make_arrays()
    arrays["y_train"] = arrays["y_train"][:-1]
    paths = write_idx_set(folder, arrays)
    return paths["y_train"], "labels of shape (63,) for 64 examples"


def _truncated_gzip(folder: Path) -> tuple[Path, str]:
    paths = write_idx_set(folder, make_arrays(), gz=True)
    content = paths["x_train"].read_bytes()
    paths["x_train"].write_bytes(content[: len(content) // 2])
    return paths["x_train"], ""


def _truncated_plain_idx(folder: Path) -> tuple[Path, str]:
    paths = write_idx_set(folder, make_arrays())
    content = paths["x_test"].read_bytes()
    paths["x_test"].write_bytes(content[:-100])
    return paths["x_test"], "truncated"


def _npz_missing_key(folder: Path) -> tuple[Path, str]:
    arrays = make_arrays()
    del arrays["y_test"]
    return write_npz(folder, arrays), "y_test"


def _idx_label_out_of_range(folder: Path) -> tuple[Path, str]:
    arrays = make_arrays()
    arrays["y_train"][5] = 10
    paths = write_idx_set(folder, arrays)
    return paths["y_train"], "0..9"


def _npz_negative_label(folder: Path) -> tuple[Path, str]:
    arrays = make_arrays()
    arrays["y_test"] = arrays["y_test"].astype(np.int64)
    arrays["y_test"][0] = -1
    return write_npz(folder, arrays), "0..9"


def _idx_wrong_image_shape(folder: Path) -> tuple[Path, str]:
    arrays = make_arrays()
    arrays["x_train"] = arrays["x_train"][:, :, :27]
    paths = write_idx_set(folder, arrays)
    return paths["x_train"], "(64, 28, 27)"


def _npz_flat_images(folder: Path) -> tuple[Path, str]:
    arrays = make_arrays()
    arrays["x_test"] = arrays["x_test"].reshape(16, 784)
    return write_npz(folder, arrays), "(16, 784)"


def _npz_empty_test_split(folder: Path) -> tuple[Path, str]:
    arrays = make_arrays(n_test=0)
    return write_npz(folder, arrays), "x_test"


def _npz_non_finite_images(folder: Path) -> tuple[Path, str]:
    arrays = make_arrays()
    arrays["x_train"] = arrays["x_train"] / np.float32(255)
    arrays["x_train"][3, 4, 5] = np.inf
    return write_npz(folder, arrays), "1 non-finite values (inf), the first at index (3, 4, 5)"


@pytest.mark.parametrize(
    "corrupt",
    [
        _bad_magic,
        _counts_disagree,
        _truncated_gzip,
        _truncated_plain_idx,
        _npz_missing_key,
        _idx_label_out_of_range,
        _npz_negative_label,
        _idx_wrong_image_shape,
        _npz_flat_images,
        _npz_empty_test_split,
        _npz_non_finite_images,
    ],
    ids=lambda corrupt: corrupt.__name__.lstrip("_"),
)
def test_corrupt_input_is_a_data_error_naming_the_file(
    tmp_path: Path, corrupt: Callable[[Path], tuple[Path, str]]
) -> None:
    """Every broken file raises DataError (one line for the CLI) whose message names its path."""
    folder = tmp_path / "data"
    folder.mkdir()
    offending, detail = corrupt(folder)

    with pytest.raises(DataError) as caught:
        sources.load_splits(Config(dataset="mnist", data_dir=str(folder)))
    message = str(caught.value)
    assert str(offending) in message
    assert detail in message
    assert "\n" not in message


def test_truncated_npz_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    """An npz cut in half (an interrupted download) is a DataError naming it, like the IDX cases."""
    path = write_npz(tmp_path / "data", make_arrays())
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])

    with pytest.raises(DataError) as caught:
        sources.load_splits(Config(dataset="mnist", data_dir=str(tmp_path / "data")))
    assert str(path) in str(caught.value)


# A user's data: an npz path or arrays, any input shape, labels 0..K-1.


def user_arrays(seed: int = 0, n_train: int = 40, n_test: int = 8) -> dict[str, np.ndarray]:
    """Tabular float inputs of 13 features and 3 classes: nothing like MNIST."""
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.normal(size=(n_train, 13)).astype(np.float32),
        "y_train": rng.permutation(np.arange(n_train) % 3),
        "x_test": rng.normal(size=(n_test, 13)).astype(np.float32),
        "y_test": rng.integers(0, 3, size=n_test),
    }


def test_npz_of_any_shape_and_classes_is_read_as_it_is(tmp_path: Path) -> None:
    """Float inputs keep their shape and values; the classes are counted from the labels."""
    arrays = user_arrays()
    path = write_npz(tmp_path, arrays, name="wine.npz")

    splits = sources.load_splits(Config(dataset=str(path), model="linear"))

    for key in KEYS:
        np.testing.assert_array_equal(getattr(splits, key), arrays[key])
    assert (splits.x_train.dtype, splits.y_train.dtype, splits.num_classes) == (np.float32, np.int32, 3)
    assert splits.source == str(path)


def test_uint8_images_of_any_size_are_scaled_and_given_a_channel(tmp_path: Path) -> None:
    arrays = {key: value[:, :12, :20] if key.startswith("x") else value % 4 for key, value in make_arrays().items()}
    splits = sources.load_splits(Config(dataset=str(write_npz(tmp_path, arrays, name="small.npz"))))
    assert splits.x_train.shape == (64, 12, 20, 1) and splits.num_classes == 4
    np.testing.assert_array_equal(splits.x_test[..., 0], arrays["x_test"] / np.float32(255))


def test_arrays_are_checked_against_their_fingerprint() -> None:
    """`arrays:<fingerprint>` is what train(data=...) records: other arrays do not resume that run."""
    arrays = user_arrays()
    config = Config(dataset=ARRAYS_PREFIX + fingerprint(arrays), model="linear")
    assert sources.load_splits(config, arrays).num_classes == 3
    with pytest.raises(DataError, match="give the same arrays again"):
        sources.load_splits(config, user_arrays(seed=1))
    with pytest.raises(DataError, match="give the same arrays again"):
        sources.load_splits(config)


def _set(key: str, value: Callable[[dict], np.ndarray]) -> Callable[[dict], dict]:
    return lambda arrays: {**arrays, key: value(arrays)}


def _with_nan(arrays: dict) -> np.ndarray:
    images = arrays["x_train"].copy()
    images[5, 2], images[9, 0] = np.nan, -np.inf
    return images


BAD_USER_DATA = {
    "missing-array": (lambda arrays: {k: v for k, v in arrays.items() if k != "y_test"}, "y_test"),
    "empty-test-split": (_set("x_test", lambda a: a["x_test"][:0]), "x_test", "no examples"),
    "empty-train-split": (_set("x_train", lambda a: a["x_train"][:0]), "x_train", "no examples"),
    "non-finite-inputs": (_set("x_train", _with_nan), "x_train", "2 non-finite values (-inf, nan)", "(5, 2)"),
    "non-finite-labels": (
        _set("y_test", lambda a: np.where(np.arange(8) == 3, np.nan, a["y_test"])),
        "y_test",
        "labels of type float64: float labels are targets",
    ),
    "string-labels": (
        _set("y_train", lambda a: np.array(["red", "white", "rose"])[a["y_train"]]),
        "y_train",
        "<U5 (e.g. '",
        "np.unique",
    ),
    "one-hot-labels": (_set("y_train", lambda a: np.eye(3)[a["y_train"]]), "y_train", "(40, 3)", "argmax"),
    "fractional-labels": (_set("y_test", lambda a: a["y_test"] + 0.5), "y_test", "float64", "labels.astype(int)"),
    "negative-labels": (_set("y_test", lambda a: a["y_test"] - 1), "y_test", "-1..1", "0..K-1"),
    "counts-disagree": (_set("y_train", lambda a: a["y_train"][:30]), "y_train", "(30,) for 40 examples"),
    "shapes-disagree": (_set("x_test", lambda a: a["x_test"][:, :12]), "x_test", "(12,)", "(13,)"),
    "integer-inputs": (_set("x_train", lambda a: a["x_train"].astype(np.int64)), "x_train", "int64"),
    "one-value-per-example": (_set("x_train", lambda a: a["x_train"][:, 0]), "x_train", "(40,)"),
}


@pytest.mark.parametrize("break_data", BAD_USER_DATA.values(), ids=BAD_USER_DATA.keys())
@pytest.mark.parametrize("given_as", ["npz", "arrays"])
def test_bad_user_data_is_one_line_naming_the_file_or_array(tmp_path: Path, break_data: tuple, given_as: str) -> None:
    """Checked at load, before any model sees it: each is a DataError naming the array and the file."""
    change, key, *details = break_data
    arrays = change(user_arrays())
    if given_as == "npz":
        where = str(write_npz(tmp_path, arrays, name="user.npz"))
        config, given = Config(dataset=where, model="linear"), None
    else:
        where, given = "data[", arrays
        config = Config(dataset=ARRAYS_PREFIX + fingerprint(arrays), model="linear")

    with pytest.raises(DataError) as caught:
        sources.load_splits(config, given)
    message = str(caught.value)
    for detail in (where, key, *details):
        assert detail in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "labels", [np.eye(10)[np.arange(64) % 10], np.array(list("0123456789") * 7)[:64]], ids=["one-hot", "strings"]
)
def test_mnist_npz_with_one_hot_or_string_labels_says_what_they_are(tmp_path: Path, labels) -> None:
    """Named data sets share the checks: no more 'N labels for N images: the counts must agree'."""
    path = write_npz(tmp_path / "data", {**make_arrays(), "y_train": labels})
    with pytest.raises(DataError, match="argmax|np.unique") as caught:
        sources.load_splits(Config(dataset="mnist", data_dir=str(tmp_path / "data")))
    assert f"y_train in {path}" in str(caught.value)


# The bundled and generated data sets.


def test_digits_split_is_whole_and_fixed() -> None:
    """digits: all 1,797 8x8 images, split 1,437/360, scaled to [0, 1], the same split every call."""
    first = sources.load_splits(Config(dataset="digits"))
    second = sources.load_splits(Config(dataset="digits", seed=7))  # the split does not follow --seed

    assert len(first.x_train) + len(first.x_test) == 1797
    assert (len(first.x_train), len(first.x_test)) == (1437, 360)
    for images, labels in ((first.x_train, first.y_train), (first.x_test, first.y_test)):
        assert images.shape[1:] == (8, 8, 1) and images.dtype == np.float32
        assert images.min() == 0.0 and images.max() == 1.0
        assert labels.dtype == np.int32 and labels.shape == (len(images),)
        assert set(np.unique(labels)) == set(range(10))
    for name in KEYS:
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))


def test_bundled_digits_are_scikit_learns_split() -> None:
    """The shipped file holds exactly the split `_digits` once computed with scikit-learn (which
    the `test` extra installs for this comparison only), scaled the same way."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    bundled = sources.load_splits(Config(dataset="digits"))

    np.testing.assert_array_equal(bundled.x_train, (x_train.astype(np.float32) / 16.0)[..., np.newaxis])
    np.testing.assert_array_equal(bundled.x_test, (x_test.astype(np.float32) / 16.0)[..., np.newaxis])
    np.testing.assert_array_equal(bundled.y_train, y_train)
    np.testing.assert_array_equal(bundled.y_test, y_test)


@pytest.mark.slow  # It makes 70,000 images three times.
def test_synthetic_is_mnist_shaped_and_seeded() -> None:
    """synthetic: 60,000/10,000 MNIST-shaped examples, identical for one seed, different for another."""
    first = sources.load_splits(Config(dataset="synthetic", seed=3))
    again = sources.load_splits(Config(dataset="synthetic", seed=3))
    other = sources.load_splits(Config(dataset="synthetic", seed=4))

    assert first.x_train.shape == (60_000, 28, 28, 1) and first.x_test.shape == (10_000, 28, 28, 1)
    assert first.x_train.dtype == np.float32 and first.y_train.dtype == np.int32
    assert 0.0 <= first.x_train.min() and first.x_train.max() <= 1.0
    assert 0 <= first.y_train.min() and first.y_train.max() <= 9
    for name in KEYS:
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.x_train, other.x_train)
    assert not np.array_equal(first.y_test, other.y_test)


# Steps and pipelines, on tiny splits whose labels are the examples' indices.


def index_splits(n_train: int, n_test: int) -> Splits:
    """Example i has label i and every pixel i: a batch shows which examples it holds."""

    def split(count: int) -> tuple[np.ndarray, np.ndarray]:
        indices = np.arange(count, dtype=np.int32)
        images = np.broadcast_to(indices.astype(np.float32)[:, None, None, None], (count, 2, 2, 1))
        return images.copy(), indices

    (x_train, y_train), (x_test, y_test) = split(n_train), split(n_test)
    return Splits(x_train, y_train, x_test, y_test, "indices")


def test_steps_per_epoch_drops_the_remainder_and_rejects_huge_batches() -> None:
    """Whole batches only; a batch larger than the training split is a UsageError naming the flag."""
    splits = index_splits(10, 4)

    assert inputs.steps_per_epoch(splits, 3) == 3
    assert inputs.steps_per_epoch(splits, 10) == 1
    with pytest.raises(UsageError, match="--batch_size=11"):
        inputs.steps_per_epoch(splits, 11)


def train_stream(
    splits: Splits,
    *,
    batch: int,
    seed: int = 0,
    epochs: int = 3,
    start_step: int = 0,
    context: tf.distribute.InputContext | None = None,
) -> list[np.ndarray]:
    """The training pipeline's batches as arrays of example indices, checking images match labels."""
    dataset_fn = inputs.train_dataset_fn(
        splits, global_batch_size=batch, seed=seed, num_epochs=epochs, start_step=start_step
    )
    batches = []
    for images, labels in dataset_fn(context or tf.distribute.InputContext()):
        labels = labels.numpy()
        np.testing.assert_array_equal(images.numpy()[:, 0, 0, 0], labels.astype(np.float32))
        batches.append(labels)
    return batches


@pytest.mark.parametrize("n_train", [24, 22], ids=["whole", "remainder"])
def test_each_epoch_visits_its_examples_once(n_train: int) -> None:
    """Every epoch is steps*batch distinct examples (all of them when the batch divides the split)."""
    splits, batch = index_splits(n_train, 4), 4
    steps = inputs.steps_per_epoch(splits, batch)

    stream = train_stream(splits, batch=batch, epochs=3)

    assert len(stream) == 3 * steps
    assert all(labels.shape == (batch,) for labels in stream)
    epochs = [np.concatenate(stream[epoch * steps : (epoch + 1) * steps]) for epoch in range(3)]
    for order in epochs:
        assert len(set(order.tolist())) == steps * batch
        assert 0 <= order.min() and order.max() < n_train
        if n_train % batch == 0:
            assert sorted(order.tolist()) == list(range(n_train))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    assert not np.array_equal(epochs[0], epochs[2])


def test_shuffle_follows_the_seed() -> None:
    """The same seed gives the same stream of batches; another seed another one."""
    splits = index_splits(24, 4)

    first = train_stream(splits, batch=4, seed=5)
    again = train_stream(splits, batch=4, seed=5)
    other = train_stream(splits, batch=4, seed=6)

    assert len(first) == len(again) and all(map(np.array_equal, first, again))
    assert not all(map(np.array_equal, first, other))


def test_resuming_at_any_step_yields_the_tail_of_the_stream() -> None:
    """start_step=k gives exactly the batches an uninterrupted run sees from step k on."""
    splits, batch = index_splits(22, 4), 4  # 5 steps per epoch, 2 examples dropped each epoch
    full = train_stream(splits, batch=batch, seed=1, epochs=3)

    for start_step in range(len(full) + 1):  # mid-epoch, epoch boundaries and the very end
        resumed = train_stream(splits, batch=batch, seed=1, epochs=3, start_step=start_step)
        assert len(resumed) == len(full) - start_step, start_step
        assert all(map(np.array_equal, resumed, full[start_step:])), start_step


def test_replica_batches_make_up_the_global_batch() -> None:
    """With two replicas on one pipeline, consecutive per-replica batches join into the global ones."""
    splits = index_splits(24, 4)
    global_batches = train_stream(splits, batch=4, seed=2)

    per_replica = train_stream(splits, batch=4, seed=2, context=tf.distribute.InputContext(num_replicas_in_sync=2))

    assert all(labels.shape == (2,) for labels in per_replica)
    joined = [np.concatenate(per_replica[i : i + 2]) for i in range(0, len(per_replica), 2)]
    assert len(joined) == len(global_batches) and all(map(np.array_equal, joined, global_batches))


@pytest.mark.parametrize("start_step", [0, 7])
def test_two_workers_batches_are_the_global_batch_sharded_element_by_element(start_step: int) -> None:
    """Worker i of two gets the elements i, i+2, ... of each global batch (a stream sharded before
    batching), from any resumed step on; together they hold the global batch."""
    splits = index_splits(22, 4)
    global_batches = train_stream(splits, batch=4, seed=3, start_step=start_step)

    workers = [
        train_stream(
            splits,
            batch=4,
            seed=3,
            start_step=start_step,
            context=tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker, num_replicas_in_sync=2),
        )
        for worker in (0, 1)
    ]

    for worker, batches in enumerate(workers):
        assert len(batches) == len(global_batches)
        assert all(map(np.array_equal, batches, [labels[worker::2] for labels in global_batches]))


@pytest.mark.parametrize("n_test", [10, 8], ids=["padded", "whole"])
def test_eval_covers_the_test_split_once_and_pads_with_zero_weight(n_test: int) -> None:
    """Every test example once with weight 1; padding up to whole batches has weight 0."""
    splits, batch = index_splits(8, n_test), 4
    dataset_fn, num_batches = inputs.eval_dataset_fn(splits.x_test, splits.y_test, batch)

    # Each element is the train batch's structure and the weights: ((images, labels), weights).
    batches = [
        tuple(part.numpy() for part in tf.nest.flatten(parts)) for parts in dataset_fn(tf.distribute.InputContext())
    ]

    assert num_batches == -(-n_test // batch) and len(batches) == num_batches
    images = np.concatenate([images for images, _, _ in batches])
    labels = np.concatenate([labels for _, labels, _ in batches])
    weights = np.concatenate([weights for _, _, weights in batches])
    assert all(parts[0].shape == (batch, 2, 2, 1) for parts in batches)
    np.testing.assert_array_equal(images[:, 0, 0, 0], labels.astype(np.float32))
    assert set(weights.tolist()) <= {0.0, 1.0}
    assert sorted(labels[weights == 1].tolist()) == list(range(n_test))
    assert int((weights == 0).sum()) == num_batches * batch - n_test


def test_hold_out_moves_a_seeded_share_of_the_training_split() -> None:
    """The validation examples are drawn by the seed alone, apart from the rest, and the test
    split is untouched; a share of 0 holds nothing out. (Each call is given new splits: it
    reorders the training arrays it is given.)"""
    splits = index_splits(50, 7)
    held = hold_out(splits, 0.2, seed=3)
    assert (len(held.x_validation), len(held.x_train)) == (10, 40)
    assert sorted([*held.y_train, *held.y_validation]) == list(range(50))
    assert list(held.y_train) == sorted(held.y_train), "the rest keep their order"
    np.testing.assert_array_equal(held.x_validation[:, 0, 0, 0], held.y_validation.astype(np.float32))
    np.testing.assert_array_equal(held.x_train[:, 0, 0, 0], held.y_train.astype(np.float32))
    assert held.y_test is splits.y_test
    np.testing.assert_array_equal(hold_out(index_splits(50, 7), 0.2, seed=3).y_validation, held.y_validation)
    assert set(hold_out(index_splits(50, 7), 0.2, seed=4).y_validation) != set(held.y_validation)
    assert hold_out(splits, 0.0, seed=3) is splits
    with pytest.raises(UsageError, match=r"--validation_split=0.001 of 50 training examples holds out none"):
        hold_out(splits, 0.001, seed=3)


@pytest.mark.parametrize(
    "array",
    [
        np.random.default_rng(0).random((300, 28, 28, 1), dtype=np.float32)[:, 1:],  # a strided view
        np.arange(-7, 1000, dtype=np.int64)[1:],  # a misaligned start
        np.arange(12, dtype=np.uint8).reshape(3, 4),
        np.array([True, False, True]),
        np.zeros((0, 5), np.float64),
        np.arange(6, dtype=">f4").reshape(2, 3),  # big-endian, as an npz may hold it
    ],
)
def test_host_tensor_holds_a_private_copy_of_the_array(array: np.ndarray) -> None:
    """The split in TensorFlow without `tf.constant`'s copy: equal to the array, on the host, and
    unaffected when the caller changes or drops the array afterwards."""
    expected = array.copy()
    tensor = inputs.host_tensor(array)
    if array.size:
        array[...] = np.logical_not(array) if array.dtype == bool else array + 1  # The caller's change.
    del array
    filler = [np.full(10**6, 7.0) for _ in range(8)]  # Reuses freed memory, if the tensor had let go.

    assert tensor.dtype.as_numpy_dtype == expected.dtype.newbyteorder("=") and "CPU" in tensor.device
    np.testing.assert_array_equal(tensor.numpy(), expected)
    np.testing.assert_array_equal(tf.gather(tensor, tf.range(len(expected))).numpy(), expected)  # A kernel reads it.
    assert len(filler) == 8


def test_pipelines_run_without_the_autotuning_thread() -> None:
    """Neither pipeline autotunes: its model thread made destroying an iterator wait seconds."""
    splits = index_splits(24, 4)
    train_fn = inputs.train_dataset_fn(splits, global_batch_size=4, seed=0, num_epochs=1, start_step=0)
    eval_fn, _ = inputs.eval_dataset_fn(splits.x_test, splits.y_test, 4)

    for dataset_fn in (train_fn, eval_fn):
        dataset = dataset_fn(tf.distribute.InputContext())
        assert dataset.options().autotune.enabled is False
        assert len(list(dataset)) > 0
