"""Faults of the data (issue 24): splits of different types, files that are not npz archives,
and data larger than the memory the process may have."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train_loop
from tests.conftest import REPO
from tests.helpers import assert_one_line_error
from train_loop.configs import Config
from train_loop.data import sources
from train_loop.data.arrays import DataError, fingerprint

# Mixed types across splits: uint8 is scaled to [0, 1], floats are not.


def mixed_arrays(train_type: type, test_type: type) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(48, 6, 6), dtype=np.uint8)
    labels = rng.integers(0, 3, size=48, dtype=np.int64)
    return {
        "x_train": images[:40].astype(train_type),
        "y_train": labels[:40],
        "x_test": images[40:].astype(test_type),
        "y_test": labels[40:],
    }


@pytest.mark.parametrize("types", [(np.uint8, np.float32), (np.float64, np.uint8)], ids=["uint8-float", "float-uint8"])
def test_splits_of_different_types_are_refused_in_an_npz_and_in_given_arrays(tmp_path: Path, types: tuple) -> None:
    """One line naming both arrays, their types and the fix; nothing written for given arrays."""
    arrays = mixed_arrays(*types)
    npz = tmp_path / "mixed.npz"
    np.savez(npz, **arrays)
    with pytest.raises(DataError) as from_file:
        sources.load_splits(Config(dataset=str(npz)))
    with pytest.raises(DataError) as given:
        train_loop.train(data=arrays, logdir=str(tmp_path / "logs"), epochs=1)

    train_name, test_name = np.dtype(types[0]).name, np.dtype(types[1]).name
    assert str(from_file.value) == (
        f"x_train in {npz} is {train_name} but x_test in {npz} is {test_name}: uint8 images are scaled to "
        "[0, 1] and floats used as they are, so the two splits would be on different scales; give both as "
        "uint8, or both as float32 (scaled alike)."
    )
    assert f"data['x_train'] is {train_name} but data['x_test'] is {test_name}" in str(given.value)
    assert not (tmp_path / "logs").exists()


def test_floats_of_different_widths_are_one_scale_and_read() -> None:
    """float64 beside float32 means the same values: both are used as float32."""
    arrays = mixed_arrays(np.float64, np.float32)
    config = Config(dataset="arrays:" + fingerprint(arrays))
    splits = sources.load_splits(config, arrays)
    assert splits.x_train.dtype == splits.x_test.dtype == np.float32
    np.testing.assert_array_equal(splits.x_test, arrays["x_test"])


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
def test_mixed_types_exit_2_from_the_command_line(tmp_path: Path, run_cli) -> None:
    """The issue's case: uint8 training images, float test images: exit 2, one line, no run."""
    npz = tmp_path / "mixed.npz"
    np.savez(npz, **mixed_arrays(np.uint8, np.float32))
    result = run_cli(f"--dataset={npz}", "--epochs=1")
    assert_one_line_error(result, ("x_train", "uint8", "x_test", "float32", "give both as uint8, or both as float32"))
    assert not (tmp_path / "logs").exists()


# Files that are not npz archives.


def _npy_named_npz(path: Path) -> None:
    np.save(path.with_suffix(".npy"), np.zeros(3))
    path.with_suffix(".npy").rename(path)


@pytest.mark.parametrize(
    "write",
    [
        lambda path: path.write_bytes(np.random.default_rng(0).bytes(4096)),
        lambda path: path.write_text("x_train,y_train\n1,2\n"),
        _npy_named_npz,
        lambda path: path.write_bytes(b""),
    ],
    ids=["random-bytes", "text", "npy", "empty"],
)
def test_a_file_that_is_not_an_npz_archive_says_so_and_never_suggests_pickle(tmp_path: Path, write) -> None:
    """NumPy takes anything but a zip for a pickle, and advises loading it unsafely: not here."""
    path = tmp_path / "data.npz"
    write(path)
    with pytest.raises(DataError) as caught:
        sources.load_splits(Config(dataset=str(path)))
    assert str(caught.value) == f"{path}: not an npz archive (a zip of .npy files); write it again with np.savez."


def test_an_object_array_in_an_npz_is_refused_without_unpickling_advice(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    arrays = mixed_arrays(np.uint8, np.uint8)
    np.savez(path, **{**arrays, "y_train": np.array([{"label": 1}] * 40, dtype=object)})
    with pytest.raises(DataError) as caught:
        sources.load_splits(Config(dataset=str(path)))
    message = str(caught.value)
    assert message.startswith(f"y_train in {path}: not an array of numbers (Python objects, which are never unpickled")
    assert "allow_pickle" not in message and "pickle.load" not in message


@pytest.mark.parametrize("kind", ["a FIFO", "a character device", "a folder"])
def test_a_dataset_path_that_is_not_a_regular_file_says_what_it_is_without_blocking(tmp_path: Path, kind: str) -> None:
    """A FIFO would block the open until a writer came; it is named instead, in a bounded time
    (a child process without TensorFlow, killed by the timeout if it blocked)."""
    path = tmp_path / "data.npz"
    if kind == "a FIFO":
        os.mkfifo(path)
    elif kind == "a character device":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    code = (
        "import sys\nfrom train_loop.configs import Config\nfrom train_loop.data import sources\n"
        "try:\n    sources.load_splits(Config(dataset=sys.argv[1]))\n"
        "except sources.DataError as error:\n    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60, cwd=REPO, check=True
    )
    assert result.stdout == f"--dataset={path}: cannot be read ({kind}, not a regular file); give an .npz file.\n"


# Memory: one float32 copy of the inputs, plus the uint8 images while they are read.


def _limited_data(megabytes: int):
    limit = megabytes * 2**20
    return lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


@pytest.fixture(scope="module")
def big_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 MB of uint8 images: 0.75 GiB as float32."""
    path = tmp_path_factory.mktemp("big") / "big.npz"
    images = np.zeros((25_000, 80, 100), np.uint8)
    np.savez(
        path, x_train=images, y_train=np.zeros(25_000, np.uint8), x_test=images[:10], y_test=np.zeros(10, np.uint8)
    )
    return path


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
def test_data_over_the_memory_limit_is_one_line_saying_how_much_it_needs(tmp_path: Path, big_npz: Path) -> None:
    """A real limit on the process's data memory (RLIMIT_DATA: TensorFlow's import reserves far
    more address space than RLIMIT_AS could leave room for). 1100 MiB holds TensorFlow (about
    450 MiB) and the uint8 images, not their float32 copy; it was a MemoryError traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "train_loop", f"--dataset={big_npz}", f"--logdir={tmp_path / 'logs'}", "--epochs=1"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        preexec_fn=_limited_data(1100),
    )
    assert_one_line_error(
        result, (f"x_train in {big_npz} needs 0.75 GiB as float32 and this process could not get it",)
    )
    assert not (tmp_path / "logs").exists()


def test_reading_an_npz_over_the_memory_limit_says_how_much_the_array_needs(big_npz: Path) -> None:
    """The reading step, before TensorFlow (NumPy alone fits in 150 MiB; the uint8 images do not)."""
    code = (
        "import sys\nfrom train_loop.configs import Config\nfrom train_loop.data import sources\n"
        "try:\n    sources.load_splits(Config(dataset=sys.argv[1]))\n"
        "except sources.DataError as error:\n    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(big_npz)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        preexec_fn=_limited_data(150),
        check=True,
    )
    assert result.stdout.startswith(f"x_train in {big_npz} needs 0.19 GiB and this process could not get it")


_PIPELINES = """
import resource, sys
import tensorflow as tf
from train_loop.configs import Config
from train_loop.data import inputs, sources
from train_loop.data.arrays import hold_out

tf.constant(1.0) + 1  # TensorFlow's runtime up before the limit is set
data_pages = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmData"))
limit = data_pages * 1024 + int(sys.argv[2]) * 2**20
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
splits = hold_out(sources.load_splits(Config(dataset=sys.argv[1])), 0.1, seed=0)
train_fn = inputs.train_dataset_fn(splits, global_batch_size=64, seed=0, num_epochs=1, start_step=0)
held_out = ((splits.x_validation, splits.y_validation), (splits.x_test, splits.y_test))
functions = [train_fn] + [inputs.eval_dataset_fn(x, y, 64)[0] for x, y in held_out]
for dataset_fn in functions:
    next(iter(dataset_fn(tf.distribute.InputContext())))
print("fits")
"""


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
def test_loading_and_the_pipelines_fit_in_five_times_the_uint8_images(tmp_path: Path) -> None:
    """Read, held out and fed to the pipelines, 100 MB of uint8 images fit in 650 MiB more than
    TensorFlow holds: their float32 copy and themselves (500 MB), and room for the pipelines'
    threads. Each copy removed was one more (held-out, TensorFlow's, the graph rewrites'): it
    took about 11x before."""
    path = tmp_path / "hundred.npz"
    images = np.random.default_rng(0).integers(0, 256, size=(16_000, 80, 80), dtype=np.uint8)  # 102 MB
    np.savez(
        path,
        x_train=images[:14_000],
        y_train=np.zeros(14_000, np.uint8),
        x_test=images[14_000:],
        y_test=np.zeros(2_000, np.uint8),
    )
    del images
    result = subprocess.run(
        [sys.executable, "-c", _PIPELINES, str(path), "650"], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert result.returncode == 0 and result.stdout == "fits\n", result.stderr[-3000:]
