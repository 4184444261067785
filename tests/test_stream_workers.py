"""Streamed data on several workers (`launch --workers=2`, MultiWorkerMirroredStrategy over
127.0.0.1): each worker's own pipeline and its position beside the run's checkpoint. Real
TFRecord shards, real worker processes, real SIGKILLs. Also a task's own input_fn as the stream,
and the XLA timing on a stream of dicts."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import REPO
from helpers import sigkill_after_first_checkpoint, snapshot
from test_faults import consecutive_free_ports, finish, read_result, start, worker_pids
from test_streams import RESUMABLE, ids, write_digits, write_numbered

from train_loop import Config
from train_loop.errors import UsageError
from train_loop.launch import free_ports
from train_loop.training.run_data import RunData


def launch(*flags: str) -> subprocess.Popen:
    return start("--workers=2", "--", *flags, module="train_loop.launch")


def assert_same_results(got: Path, expected: Path) -> None:
    """The two runs' results within 1e-6, and their saved weights."""
    whole, other = read_result(expected), read_result(got)
    for split in ("train", "validation", "test"):
        assert (other[split] is None) == (whole[split] is None), split
        for name, value in (whole[split] or {}).items():
            assert abs(other[split][name] - value) <= 1e-6, (split, name, other[split][name], value)
    weights = [keras.models.load_model(run / "model.keras").get_weights() for run in (expected, got)]
    for first, second in zip(*weights):
        np.testing.assert_allclose(second, first, rtol=0, atol=1e-6)


@dataclasses.dataclass(frozen=True)
class Runs:
    """The same stream trained by one process and by two workers, for the tests to compare with or
    copy and resume: training them once for the whole file keeps CI short."""

    flags: tuple[str, ...]  # Every flag but --logdir and --run_name.
    whole: Path  # One process, uninterrupted.
    two: Path  # Two workers (launch --workers=2).


def trained(flags: tuple[str, ...], root: Path) -> Runs:
    status, _, stderr = finish(start(*flags, f"--logdir={root}", "--run_name=whole"))
    assert status == 0, stderr[-3000:]
    status, stdout, stderr = finish(launch(*flags, f"--logdir={root}", "--run_name=two"))
    assert status == 0, stdout[-3000:] + stderr[-3000:]
    return Runs(flags, root / "whole", root / "two")


@pytest.fixture(scope="module")
def tfrecord_runs(tmp_path_factory) -> Runs:
    """Two epochs of digits from TFRecord shards: 80 steps, checkpoints every 10."""
    root = tmp_path_factory.mktemp("tfrecord")
    return trained((f"--dataset=tfrecord:{write_digits(root / 'shards')}", "--epochs=2", *RESUMABLE), root)


def killed_copy(run: Path, tmp_path: Path) -> Path:
    """A copy of a finished run less its result.json: as if killed after its last checkpoint, and
    the same command (with --logdir={tmp_path}) resumes it."""
    copy = tmp_path / run.name
    shutil.copytree(run, copy, symlinks=True)
    (copy / "result.json").unlink()
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("source", ["tfrecord", "input-function"])
def test_two_workers_train_one_devices_global_batches(request, tmp_path, source):
    """With --deterministic both shard by example: the two workers' batches make up one device's."""
    if source == "tfrecord":
        runs = request.getfixturevalue("tfrecord_runs")
    else:
        runs = trained(("--input=tests/stream_inputs.py:digits", "--epochs=2", *RESUMABLE), tmp_path)
    two = read_result(runs.two)
    assert (two["strategy"], two["replicas"]) == ("multi_worker", 2)
    assert two["steps"] == read_result(runs.whole)["steps"] > 0
    assert_same_results(runs.two, runs.whole)
    # Each worker saved its own position beside the chief's checkpoints, at the same steps.
    positions = runs.two / "checkpoints" / "positions"
    assert sorted(os.listdir(positions)) == ["worker-0-of-2", "worker-1-of-2"]
    main_steps = {path.name for path in (runs.two / "checkpoints").glob("ckpt-*.index")}
    for worker in ("worker-0-of-2", "worker-1-of-2"):
        assert main_steps <= {path.name for path in (positions / worker).glob("ckpt-*.index")}


@pytest.mark.slow
def test_sigkill_of_the_workers_at_a_random_moment_then_resume_gives_the_uninterrupted_numbers(tfrecord_runs, tmp_path):
    """A shuffle buffer larger than a checkpoint interval's examples, sharded by example: each
    worker's buffer is part of its position."""
    flags = (*tfrecord_runs.flags, f"--logdir={tmp_path}", "--run_name=killed")
    share = random.Random(zlib.crc32(b"two workers")).uniform(0.0, 0.5)
    delay = share * read_result(tfrecord_runs.whole)["seconds"]["training"]
    killed = launch(*flags)
    sigkill_after_first_checkpoint(killed, tmp_path / "killed", delay, pids=lambda: worker_pids(killed).values())
    assert not (tmp_path / "killed" / "result.json").exists(), f"the run ended before the kill, {delay:.2f} s in"
    status, stdout, stderr = finish(launch(*flags))
    assert status == 0, stdout[-3000:] + stderr[-3000:]
    for worker in (0, 1):
        assert f"[worker {worker}] resuming {tmp_path / 'killed'} from step " in stdout
    assert_same_results(tmp_path / "killed", tfrecord_runs.whole)


@pytest.mark.slow
def test_a_position_one_worker_did_not_save_is_skipped_for_the_step_all_saved(tfrecord_runs, tmp_path):
    """A kill between a worker's position and the chief's checkpoint of a step (here: the newest
    step's position of worker 1 removed): the resume takes the step before, and still ends where
    an uninterrupted run ends."""
    run_dir = killed_copy(tfrecord_runs.two, tmp_path)
    for path in (run_dir / "checkpoints" / "positions" / "worker-1-of-2").glob("ckpt-80.*"):
        path.unlink()
    status, stdout, stderr = finish(launch(*tfrecord_runs.flags, f"--logdir={tmp_path}", "--run_name=two"))
    assert status == 0, stdout[-3000:] + stderr[-3000:]
    assert f"[worker 1] resuming {run_dir} from step 70" in stdout
    assert "ckpt-80: not every worker's data position was saved with it; resuming from ckpt-70." in stdout + stderr
    assert_same_results(run_dir, tfrecord_runs.whole)


@pytest.mark.slow
def test_a_damaged_position_of_one_worker_stops_every_worker_started_by_hand(tfrecord_runs, tmp_path):
    """Worker 1's position at the restored step is damaged, and the workers are started by hand with
    their TF_CONFIG (no launcher to stop the rest): each ends with status 2 and one line, none waits."""
    run_dir = killed_copy(tfrecord_runs.two, tmp_path)
    (data_file,) = (run_dir / "checkpoints" / "positions" / "worker-1-of-2").glob("ckpt-80.data-*")
    data_file.write_bytes(b"damaged" * 100)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    flags = (*tfrecord_runs.flags, f"--logdir={tmp_path}", "--run_name=two")
    workers = [
        start(*flags, env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})})
        for index in range(2)
    ]
    ended = [finish(worker, timeout=300) for worker in workers]
    assert [status for status, _, _ in ended] == [2, 2], [stderr[-2000:] for _, _, stderr in ended]
    lines = [[line for line in stderr.splitlines() if line.startswith("train_loop:")] for _, _, stderr in ended]
    assert len(lines[0]) == len(lines[1]) == 1, lines
    assert "another worker's data position at step 80 does not restore" in lines[0][0]
    assert f"{data_file.parent / 'ckpt-80'}: worker 1's data position at step 80 does not restore" in lines[1][0]


@pytest.mark.slow
def test_a_resume_on_another_number_of_workers_is_refused_and_changes_nothing(tfrecord_runs, tmp_path):
    killed_copy(tfrecord_runs.two, tmp_path)
    before = snapshot(tmp_path, folder_times=False)
    status, stdout, stderr = finish(start(*tfrecord_runs.flags, f"--logdir={tmp_path}", "--run_name=two"))
    assert (status, stdout) == (2, ""), stderr[-3000:]
    assert stderr.count("\n") == 1 and "data position was saved by 2 workers, and this run has one machine's" in stderr
    assert snapshot(tmp_path, folder_times=False) == before


def read_one_epoch(folder: str, deterministic: bool, out: str) -> None:
    """Run in each worker process: the example ids this worker's replica gets over one epoch,
    through the run's own input (`ReplicaInput`, checkpointable), written to `out`. (On CPUs the
    strategy gives each worker one replica, whatever its logical devices.)"""
    import tensorflow as tf

    from train_loop.data import inputs, streams, tfrecords

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    assert strategy.num_replicas_in_sync == 2
    stream = tfrecords.open_folder(folder, validation_split=0.0, deterministic=deterministic)
    dataset_fn = streams.train_dataset_fn(stream, global_batch_size=40, seed=3, shuffle_buffer=64)
    replica_input = inputs.ReplicaInput(strategy, dataset_fn, checkpointable=True)
    iterator = replica_input.iterator()
    batches = []
    for _ in range(streams.steps_per_epoch(stream, 40, 0)):
        images, _ = replica_input.next_batch(iterator)
        batches.append(ids(images))
    Path(out).write_text(json.dumps(batches))


@pytest.mark.slow
@pytest.mark.parametrize("deterministic", [False, True], ids=["by-file", "by-example"])
def test_two_workers_lose_or_double_no_example_within_an_epoch(tmp_path, deterministic):
    """400 numbered examples in 4 files, 2 worker processes under one MultiWorkerMirroredStrategy."""
    folder = write_numbered(tmp_path / "shards", 400, num_shards=4)
    port = consecutive_free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]}
    workers = []
    for index in range(2):
        code = (
            "import sys; sys.path.insert(0, 'tests'); from test_stream_workers import read_one_epoch; "
            f"read_one_epoch({str(folder)!r}, {deterministic}, {str(tmp_path / f'ids-{index}.json')!r})"
        )
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        workers.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                cwd=REPO,
                env={**os.environ, "TF_CONFIG": tf_config},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        for worker in workers:
            _, stderr = worker.communicate(timeout=180)
            assert worker.returncode == 0, stderr[-3000:]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    per_worker = [json.loads((tmp_path / f"ids-{index}.json").read_text()) for index in range(2)]
    assert all(len(batches) == 10 and {len(batch) for batch in batches} == {20} for batches in per_worker)
    seen = [example for batches in per_worker for batch in batches for example in batch]
    assert sorted(seen) == list(range(400))
    if not deterministic:
        # By file: worker 0 reads files 0 and 2, which hold ids 0, 2, 4, ... (write_shards deals them in turn).
        assert {example % 4 for batch in per_worker[0] for example in batch} == {0, 2}


@pytest.mark.slow
def test_fewer_training_files_than_workers_is_one_line_per_worker_and_writes_nothing(tmp_path):
    folder = write_digits(tmp_path / "shards", train_shards=1)
    status, stdout, stderr = finish(
        launch(f"--dataset=tfrecord:{folder}", "--model=linear", f"--logdir={tmp_path / 'logs'}"), timeout=300
    )
    assert status == 2, stdout[-3000:] + stderr[-3000:]
    lines = [line for line in stdout.splitlines() + stderr.splitlines() if "error" in line]
    assert lines and all("1 training files for 2 workers" in line for line in lines), stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_a_tasks_input_fn_is_the_stream_without_input(run_cli, tmp_path):
    """Not the default --dataset: the task's own function, dict examples and all."""
    result = run_cli("--task=tests/stream_inputs.py:DictDigitsWithData", "--jit_compile=false", "--batch_size=64")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on --task=tests/stream_inputs.py:DictDigitsWithData's input_fn" in result.stdout
    assert "1,437 training, 0 validation and 360 test examples" in result.stdout
    [run_dir] = (tmp_path / "logs").iterdir()
    assert read_result(run_dir)["steps"] == 1437 // 64


@pytest.mark.slow
def test_the_xla_timing_runs_on_a_streams_own_batch_structure(run_cli, tmp_path):
    """A stream of dicts: --jit_compile=auto times the step on such batches (a cache of the test's
    own, so that it measures)."""
    result = run_cli(
        "--input=tests/stream_inputs.py:digits_dicts",
        "--task=tests/stream_inputs.py:DictDigits",
        "--jit_compile=auto",
        "--batch_size=64",
        "--epochs=1",
        env={"TRAIN_LOOP_CACHE": str(tmp_path / "speed.json")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [run_dir] = (tmp_path / "logs").iterdir()
    decided = read_result(run_dir)["decided"]
    assert decided["by"] == "measured" and set(decided["examples_per_second"]) == {"xla", "no_xla"}


def test_stream_settings_beside_a_task_without_input_fn_are_one_line():
    """Such a task may stream (its input_fn), which is known once it is loaded: then it is refused."""
    config = Config(task="tests/user_tasks.py:TwoTerms", dataset="digits", shuffle_buffer=5)
    with pytest.raises(UsageError, match=re.escape("--shuffle_buffer=5 applies to streamed data")):
        RunData.read(config)
