"""Streamed data (`--dataset=tfrecord:FOLDER`, `--input=PATH.py:NAME`): real TFRecord shards of the
bundled digits written into the test's folder, real pipelines, real processes killed by SIGKILL."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO
from helpers import (
    assert_one_line_error,
    kill_at_first_checkpoint,
    peak_rss,
    run_example,
    sigkill_at_a_seeded_moment,
    snapshot,
)

from train_loop import Config
from train_loop.data import streams, tfrecords
from train_loop.errors import UsageError

DIGITS = np.load(os.path.join(REPO, "train_loop", "data", "digits.npz"))
# A resumable stream's run: a shuffle buffer larger than a checkpoint interval's examples (its
# content is part of the position), checkpoints every 10 steps, deterministic. Batch 32 over the
# digits' 1,294 training records (less the validation split): 40 steps an epoch.
RESUMABLE = (
    "--model=linear",
    "--batch_size=32",
    "--shuffle_buffer=500",
    "--deterministic",
    "--jit_compile=false",
    "--checkpoint_every=10",
    "--steps_per_loop=5",
    "--summary_every=10",
)


def write_digits(folder: Path, *, train_shards: int = 4, repeat: int = 1) -> Path:
    """The bundled digits (scaled to 0..255) as TFRecord shards in `folder`, the training split `repeat` times."""
    for split, shards in (("train", train_shards), ("test", 1)):
        images = (DIGITS[f"x_{split}"].astype(np.uint16) * 255 // 16).astype(np.uint8)
        labels = DIGITS[f"y_{split}"]
        if split == "train":
            images, labels = np.concatenate([images] * repeat), np.concatenate([labels] * repeat)
        tfrecords.write_shards(str(folder), split, images, labels, num_shards=shards)
    return folder


def write_numbered(folder: Path, count: int, *, num_shards: int) -> Path:
    """`count` training examples whose 8x8 image carries its id (pixels 0 and 1: id // 256, id % 256)."""
    images = np.zeros((count, 8, 8), np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.arange(count) // 256, np.arange(count) % 256
    tfrecords.write_shards(str(folder), "train", images, np.arange(count) % 10, num_shards=num_shards)
    tfrecords.write_shards(str(folder), "test", images[:10], np.arange(10), num_shards=1)
    return folder


def ids(images: tf.Tensor) -> list[int]:
    pixels = np.rint(images.numpy()[:, 0, :2, 0] * 255).astype(int)
    return (pixels[:, 0] * 256 + pixels[:, 1]).tolist()


def pipeline_ids(stream: streams.Stream, *, pipelines: int, batch: int, steps: int) -> list[list[int]]:
    """Each input pipeline's example ids over `steps` global batches of `batch`."""
    dataset_fn = streams.train_dataset_fn(stream, global_batch_size=batch, seed=3, shuffle_buffer=64)
    found = []
    for pipeline in range(pipelines):
        context = tf.distribute.InputContext(pipelines, pipeline, num_replicas_in_sync=pipelines)
        found.append([ids(images) for images, _ in dataset_fn(context).take(steps)])
    return found


@pytest.mark.parametrize("deterministic", [False, True], ids=["by-file", "by-example"])
def test_sharding_loses_or_doubles_no_example_within_an_epoch(tmp_path, deterministic):
    """400 numbered examples in 4 files, 2 input pipelines: one epoch holds every id once."""
    stream = tfrecords.open_folder(
        str(write_numbered(tmp_path, 400, num_shards=4)), validation_split=0.0, deterministic=deterministic
    )
    assert stream.shards_by_file is not deterministic
    steps = streams.steps_per_epoch(stream, 40, 0)
    assert steps == 10
    per_pipeline = pipeline_ids(stream, pipelines=2, batch=40, steps=steps)
    seen = [example for batches in per_pipeline for batch in batches for example in batch]
    assert sorted(seen) == list(range(400))
    if deterministic:
        # By example, the two pipelines' batches together are the global batches of one device.
        [whole] = pipeline_ids(stream, pipelines=1, batch=40, steps=steps)
        for step, global_batch in enumerate(whole):
            assert sorted(global_batch) == sorted(per_pipeline[0][step] + per_pipeline[1][step])
    else:
        # By file, each pipeline reads its own files: pipeline 0 files 0 and 2, which hold ids 0, 2, 4, ...
        assert {example % 4 for batch in per_pipeline[0] for example in batch} == {0, 2}


def test_the_validation_split_is_held_out_of_the_training_records_evenly(tmp_path):
    stream = tfrecords.open_folder(
        str(write_numbered(tmp_path, 200, num_shards=3)), validation_split=0.1, deterministic=True
    )
    assert (stream.counts["train"], stream.counts["validation"]) == (180, 20)
    context = tf.distribute.InputContext()
    train = [i for images, _ in stream.examples("train", context).batch(500) for i in ids(images)]
    validation = [i for images, _ in stream.examples("validation", context).batch(500) for i in ids(images)]
    assert sorted(train + validation) == list(range(200))
    # Records are counted file by file; write_shards dealt the ids to the 3 files in turn.
    in_files = [example for shard in range(3) for example in range(shard, 200, 3)]
    assert sorted(validation) == sorted(in_files[9::10])


def test_sharding_by_file_needs_a_file_for_each_worker(tmp_path):
    stream = tfrecords.open_folder(
        str(write_numbered(tmp_path, 40, num_shards=2)), validation_split=0.0, deterministic=False
    )
    dataset_fn = streams.train_dataset_fn(stream, global_batch_size=6, seed=0, shuffle_buffer=4)
    with pytest.raises(UsageError, match="2 training files for 3 workers.*--deterministic"):
        dataset_fn(tf.distribute.InputContext(3, 0, num_replicas_in_sync=3))


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"input": "x.py:f", "strategy": "tpu"}, "--strategy=tpu: streamed data runs"),
        ({"steps_per_epoch": 10}, "--steps_per_epoch=10 applies to streamed data"),
        ({"shuffle_buffer": 5}, "--shuffle_buffer=5 applies to streamed data"),
        ({"input": "x.py:f", "dataset": "digits"}, "and so does --dataset=digits"),
        ({"input": "x.py"}, "--input=x.py is not an input function"),
    ],
)
def test_stream_settings_that_contradict_are_one_line(settings, words):
    with pytest.raises(UsageError, match=re.escape(words)):
        Config(**settings)


def damage(path: Path, record: int) -> None:
    """Flips a byte in the data of record `record` of a TFRecord file (8 bytes of length, 4 of its
    checksum, the data, 4 of the data's checksum)."""
    data = bytearray(path.read_bytes())
    offset = 0
    for _ in range(record):
        offset += 16 + int.from_bytes(data[offset : offset + 8], "little")
    data[offset + 12 + 5] ^= 0xFF
    path.write_bytes(bytes(data))


def write_without_label(folder: Path) -> None:
    write_digits(folder, train_shards=2)
    with tf.io.TFRecordWriter(str(folder / "train-0001-of-0002.tfrecord")) as writer:
        feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"png"]))}
        feature["class"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[3]))
        writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


BAD_INPUTS = {
    "no-file": (lambda folder: folder.mkdir(), (), ("no file matches", "train*.tfrecord*")),
    "damaged": (
        lambda folder: damage(write_digits(folder) / "train-0002-of-0004.tfrecord", 7),
        (),
        ("train-0002-of-0004.tfrecord is damaged at record 7",),
    ),
    "missing-feature": (
        write_without_label,
        (),
        ("train-0001-of-0002.tfrecord", "no int64_list feature 'label'", "class"),
    ),
    "batched": (None, ("--input=tests/stream_inputs.py:batched",), ("already batched", "drop its .batch()")),
    "raises": (None, ("--input=tests/stream_inputs.py:raises",), ("split 'train' raised FileNotFoundError",)),
    "endless": (None, ("--input=tests/stream_inputs.py:endless",), ("unknown or infinite", "--steps_per_epoch=N")),
    "float-labels": (
        None,
        ("--input=tests/stream_inputs.py:values",),
        ("labels of type float32", "not classes", "--loss=mean_squared_error", "tf.cast(label, tf.int32)"),
    ),
}


@pytest.mark.slow  # Starts TensorFlow in a process of its own.
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_stream_input_is_one_line_status_2_and_writes_nothing(run_cli, tmp_path, case):
    make, flags, words = BAD_INPUTS[case]
    folder = tmp_path / "shards"
    if make:
        make(folder)
        flags = (f"--dataset=tfrecord:{folder}",)
    result = run_cli(*flags, "--epochs=1", "--jit_compile=false")
    assert_one_line_error(result, words)
    assert not (tmp_path / "logs").exists()


# Met while training, as the training split is not read whole first: the input function, its flags,
# and the words of the line that stops the run.
MET_WHILE_TRAINING = {
    "changed-shape": ("changes_shape", (), ("an example of the 'train' split changed shape;", "had (8, 8, 1), ()")),
    "changed-shape-after-checkpoints": (
        "changes_shape_late",
        ("--shuffle_buffer=0", "--checkpoint_every=20", "--steps_per_loop=20"),
        ("an example of the 'train' split changed shape;",),
    ),
    # The classes are counted on the test split: a training 9 is past the 9 classes 0..8 it makes.
    "label-outside-the-classes": (
        "no_nines_in_test",
        ("--model=linear",),
        ("a training label is outside 0..8, the 9 classes", "give the test split an example of every class"),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", MET_WHILE_TRAINING)
def test_bad_input_met_while_training_is_one_line_status_2_and_leaves_nothing(run_cli, tmp_path, case):
    """One line of ours (TensorFlow's own line about the failed call dropped), and the run folder
    made for the run is gone, with any checkpoints and summaries written before."""
    function, flags, words = MET_WHILE_TRAINING[case]
    source = f"--input=tests/stream_inputs.py:{function}"
    result = run_cli(source, "--jit_compile=false", "--batch_size=16", *flags)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = result.stderr.splitlines()
    assert line.startswith(f"train_loop: error: {source}: "), line
    for word in words:
        assert word in line, line
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_a_classifier_stream_has_the_classes_of_its_labels(run_cli, tmp_path):
    result = run_cli("--input=tests/stream_inputs.py:digits", "--model=linear", "--jit_compile=false", "--run_name=r")
    assert result.returncode == 0, result.stderr[-3000:]
    model = keras.models.load_model(tmp_path / "logs" / "r" / "model.keras")
    assert model.output_shape == (None, 10)
    assert {"accuracy", "cross_entropy"} <= set(read_result(tmp_path / "logs" / "r")["test"])


@pytest.mark.slow
def test_float_targets_with_a_loss_of_values_train_a_regression(run_cli, tmp_path):
    """No classes taken from the targets (9 * 1.5 + 0.25 would make 14): one output, no accuracy,
    and the test loss is the mean squared error of the saved model's predictions."""
    flags = ("--input=tests/stream_inputs.py:values", "--loss=mean_squared_error", "--model=linear")
    result = run_cli(*flags, "--jit_compile=false", "--run_name=r")
    assert result.returncode == 0, result.stderr[-3000:]
    model = keras.models.load_model(tmp_path / "logs" / "r" / "model.keras")
    assert model.output_shape == (None, 1)
    images = (DIGITS["x_test"][..., None] / 16.0).astype(np.float32)
    targets = DIGITS["y_test"] * 1.5 + 0.25
    expected = np.mean((model.predict(images, verbose=0)[:, 0] - targets) ** 2)
    test = read_result(tmp_path / "logs" / "r")["test"]
    assert set(test) == {"mean_squared_error"}
    assert test["mean_squared_error"] == pytest.approx(expected, rel=1e-5)


def start(*flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "train_loop", *flags],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def read_result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "replicas"),
    [
        ("tfrecord", ()),
        ("tfrecord", ("--cpu_replicas=2",)),
        # An endless stream of a user's function: epochs of --steps_per_epoch steps across its passes.
        ("endless", ()),
    ],
    ids=["one-device", "two-replicas", "input-function"],
)
def test_sigkill_at_a_random_moment_then_resume_gives_the_uninterrupted_numbers(tmp_path, source, replicas):
    """A shuffle buffer larger than a checkpoint interval's examples: its content is part of the
    position. The uninterrupted run is on one device, so two replicas are checked against it too."""
    if source == "tfrecord":
        data = (f"--dataset=tfrecord:{write_digits(tmp_path / 'shards')}",)
    else:
        data = ("--input=tests/stream_inputs.py:endless", "--steps_per_epoch=30")
    flags = (*data, *RESUMABLE, "--epochs=3", f"--logdir={tmp_path}")
    finish(start(*flags, "--run_name=whole"))
    delay = sigkill_at_a_seeded_moment(
        start(*flags, *replicas, "--run_name=killed"),
        tmp_path / "killed",
        training_seconds=read_result(tmp_path / "whole")["seconds"]["training"],
        seed=repr((source, replicas)),
    )
    assert finish(start(*flags, *replicas, "--run_name=killed")).startswith(f"resuming {tmp_path / 'killed'}")
    whole, resumed = read_result(tmp_path / "whole"), read_result(tmp_path / "killed")
    for split in ("train", "validation", "test"):
        assert (resumed[split] is None) == (whole[split] is None), split  # The function has no validation split.
        for name, value in (whole[split] or {}).items():
            assert abs(resumed[split][name] - value) <= 1e-6, (split, name, delay)
    weights = [keras.models.load_model(tmp_path / name / "model.keras").get_weights() for name in ("whole", "killed")]
    for expected, got in zip(*weights):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("change", ["file-added", "file-touched", "function-edited"])
def test_a_resume_against_a_changed_source_is_refused(run_cli, tmp_path, change):
    folder, function_file = write_digits(tmp_path / "shards"), tmp_path / "my_input.py"
    function_file.write_text((Path(REPO) / "tests" / "stream_inputs.py").read_text())
    source = f"--input={function_file}:digits" if change == "function-edited" else f"--dataset=tfrecord:{folder}"
    flags = (source, "--model=linear", "--epochs=20", "--jit_compile=false", "--run_name=r")
    flags += ("--checkpoint_every=5", "--steps_per_loop=5")
    kill_at_first_checkpoint(
        [sys.executable, "-m", "train_loop", f"--logdir={tmp_path / 'logs'}", *flags], tmp_path / "logs" / "r"
    )
    if change == "file-added":
        (folder / "train-extra.tfrecord").write_bytes((folder / "train-0000-of-0004.tfrecord").read_bytes())
    elif change == "file-touched":
        os.utime(folder / "test-0000-of-0001.tfrecord", ns=(0, 0))
    else:
        function_file.write_text(function_file.read_text() + "# edited\n")
    before = snapshot(tmp_path / "logs", folder_times=False)
    assert_one_line_error(run_cli(*flags), (f"holds a run of {source}", "changed since", "--run_name"))
    assert snapshot(tmp_path / "logs", folder_times=False) == before


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_data(tmp_path):
    """One pass over 1,437 and over 14,370 streamed examples: under 100 MB apart."""
    flags = ("--model=linear", "--epochs=1", "--batch_size=128", "--jit_compile=false", f"--logdir={tmp_path}")
    small_data, large_data = write_digits(tmp_path / "small"), write_digits(tmp_path / "large", repeat=10)
    small = peak_rss(tmp_path / "small.log", f"--dataset=tfrecord:{small_data}", *flags, "--run_name=small")
    large = peak_rss(tmp_path / "large.log", f"--dataset=tfrecord:{large_data}", *flags, "--run_name=large")
    assert read_result(tmp_path / "large")["steps"] >= 10 * read_result(tmp_path / "small")["steps"] - 10
    assert abs(large - small) < 100 << 20, (small >> 20, large >> 20)


@pytest.mark.slow
def test_an_input_function_trains_one_pass_an_epoch(run_cli, tmp_path):
    result = run_cli(
        "--input=tests/stream_inputs.py:digits", "--model=linear", "--jit_compile=false", "--batch_size=64"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1,437 training, 0 validation and 360 test examples" in result.stdout
    [run_dir] = (tmp_path / "logs").iterdir()
    assert read_result(run_dir)["steps"] == 1437 // 64


@pytest.mark.slow
def test_the_tfrecord_example_is_killed_mid_epoch_and_resumes(tmp_path):
    # Its shard writer is a plain TensorFlow script, and the shell reports the kill: not quiet.
    finished = run_example(["sh", "examples/tfrecord_resume.sh", str(tmp_path)], quiet=False)
    assert f"resuming {tmp_path / 'fashion-streamed'} from step 40" in finished.stdout
    result = read_result(tmp_path / "fashion-streamed")
    assert result["steps"] == 2 * (5400 // 64) and result["test"]["accuracy"] > 0.5
