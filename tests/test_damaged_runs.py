"""An interrupted run folder damaged in every way a kill, a full disk, a bad copy or a second
process can damage it, then the real command run on it.

One digits run is trained once (checkpoints at steps 20 and 40 of 44, then the one at
completion, `result.json`, `model.keras` and `saved_model/` removed: a run killed after its
checkpoint at 40); each case copies it, damages the copy and runs `python -m train_loop` on it
(a few seconds each). A case either resumes from the newest checkpoint that restores, saying so
in one line, with the history up to that step kept byte for byte; or it is refused in one line,
exit 2, with every file left exactly as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO
from helpers import assert_one_line_error, snapshot
from tensorboard.compat.proto import event_pb2

from train_loop import Config, files
from train_loop.data import sources
from train_loop.outputs import locks, runs
from train_loop.outputs.events import read_records

# No validation split: 44 steps, so that the run goes on past its checkpoint at 40.
FLAGS = ("--dataset=digits", "--validation_split=0", "--checkpoint_every=20", "--steps_per_loop=10", "--run_name=r")
DIGITS_STEPS = 44


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A run killed after its checkpoint at step 40: checkpoints 20 and 40, events and the epoch's
    line in metrics.jsonl up to 44."""
    logdir = tmp_path_factory.mktemp("template")
    trained = subprocess.run(
        [sys.executable, "-m", "train_loop", f"--logdir={logdir}", *FLAGS],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert trained.returncode == 0, trained.stderr
    run_dir = logdir / "r"
    for path in (run_dir / "result.json", run_dir / "model.keras", *(run_dir / "checkpoints").glob("ckpt-44.*")):
        path.unlink()
    shutil.rmtree(run_dir / "saved_model")
    (run_dir / "checkpoints" / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-40"\nall_model_checkpoint_paths: "ckpt-20"\n'
        'all_model_checkpoint_paths: "ckpt-40"\n'
    )
    return run_dir


def checkpoint_file(run_dir: Path, step: int, kind: str) -> Path:
    return run_dir / "checkpoints" / (f"ckpt-{step}.index" if kind == "index" else f"ckpt-{step}.data-00000-of-00001")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def flip_bit(path: Path, at: float = 0.5) -> None:
    content = bytearray(path.read_bytes())
    content[int(len(content) * at)] ^= 0x10
    path.write_bytes(bytes(content))


def event_file(run_dir: Path, writer: str = "train") -> Path:
    return next((run_dir / writer).glob("events.out.tfevents.*"))


def damage_an_event_record(run_dir: Path) -> None:
    """Flips a bit inside the data of the third record of the train events (step 0's scalars)."""
    path = event_file(run_dir)
    content, offset = bytearray(path.read_bytes()), 0
    for _ in range(2):
        offset += 16 + int.from_bytes(content[offset : offset + 8], "little")
    content[offset + 14] ^= 0x01
    path.write_bytes(bytes(content))


def damage_the_metrics_file(run_dir: Path) -> None:
    """A garbage line before the epoch's, and a line a kill cut short after it."""
    path = run_dir / "metrics.jsonl"
    path.write_bytes(b"\x00\xffgarbage\n" + path.read_bytes() + b'{"step": 4')


def write(relative: str, content: bytes) -> Callable[[Path], None]:
    return lambda run_dir: (run_dir / relative).write_bytes(content)


def remove(relative: str) -> Callable[[Path], None]:
    return lambda run_dir: (run_dir / relative).unlink()


def replace_with_folder(relative: str) -> Callable[[Path], None]:
    def damage(run_dir: Path) -> None:
        (run_dir / relative).unlink()
        (run_dir / relative).mkdir()

    return damage


def replace_with_file(relative: str) -> Callable[[Path], None]:
    def damage(run_dir: Path) -> None:
        shutil.rmtree(run_dir / relative)
        (run_dir / relative).write_bytes(b"not a folder")

    return damage


def remove_checkpoint_files(run_dir: Path) -> None:
    for path in (run_dir / "checkpoints").glob("ckpt-*"):
        path.unlink()


def truncate_every_index(run_dir: Path) -> None:
    for step in (20, 40):
        truncate(checkpoint_file(run_dir, step, "index"))


def claim_another_model(run_dir: Path) -> None:
    """settings.json says linear, so flags of a linear model pass the settings check, but the
    checkpoints hold the convnet's variables."""
    settings = json.loads((run_dir / "settings.json").read_text())
    (run_dir / "settings.json").write_text(json.dumps({**settings, "model": "linear"}))


def leave_a_temporary(run_dir: Path) -> None:
    """What a kill during the save of step 44 leaves: its `_temp` folder, half written."""
    (run_dir / "checkpoints" / "ckpt-44_temp").mkdir()
    (run_dir / "checkpoints" / "ckpt-44_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"\x00" * 99)


# (id, damage, resumed step, words of the one warning line, or None for no warning)
RESUMED = [
    pytest.param(remove("checkpoints/checkpoint"), 40, ("missing or unreadable", "ckpt-40"), id="index-missing"),
    pytest.param(
        write("checkpoints/checkpoint", b"garbage {{\x00\xff"),
        40,
        ("missing or unreadable", "ckpt-40"),
        id="index-garbage",
    ),
    pytest.param(
        write("checkpoints/checkpoint", b'model_checkpoint_path: "ckpt-90"\n'),
        40,
        ("names ckpt-90", "ckpt-40"),
        id="index-names-a-deleted-checkpoint",
    ),
    pytest.param(
        lambda run_dir: truncate(checkpoint_file(run_dir, 40, "data")),
        20,
        ("ckpt-40: damaged", "ckpt-20"),
        id="newest-data-truncated",
    ),
    pytest.param(
        lambda run_dir: zero(checkpoint_file(run_dir, 40, "data")),
        20,
        ("ckpt-40: damaged", "ckpt-20"),
        id="newest-data-zeroed",
    ),
    pytest.param(
        lambda run_dir: flip_bit(checkpoint_file(run_dir, 40, "data")),
        20,
        ("ckpt-40: damaged", "ckpt-20"),
        id="newest-data-bit-flipped",
    ),
    pytest.param(
        lambda run_dir: truncate(checkpoint_file(run_dir, 40, "index")),
        20,
        ("ckpt-40: damaged", "ckpt-20"),
        id="newest-index-truncated",
    ),
    pytest.param(
        lambda run_dir: flip_bit(checkpoint_file(run_dir, 40, "index"), at=0.1),
        20,
        ("ckpt-40: damaged", "ckpt-20"),
        id="newest-index-bit-flipped",
    ),
    pytest.param(damage_an_event_record, 40, ("skipped 1 damaged event record",), id="event-record-damaged"),
    pytest.param(leave_a_temporary, 40, None, id="temporary-of-a-killed-save"),
    pytest.param(
        damage_the_metrics_file,
        40,
        ("metrics.jsonl", "dropped 2 damaged line(s)"),
        id="metrics-lines-garbage-and-cut-short",
    ),
]


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
@pytest.mark.parametrize(("damage", "step", "words"), RESUMED)
def test_a_damaged_run_resumes_from_its_newest_intact_checkpoint(run_cli, tmp_path, interrupted, damage, step, words):
    """The run resumes where its newest intact checkpoint stands and finishes; the warning (if
    any) is one line; every event up to that step is kept, byte for byte, in order; metrics.jsonl
    holds the one epoch once (its line from before the kill, past the checkpoint, dropped)."""
    run_dir = tmp_path / "logs" / "r"
    shutil.copytree(interrupted, run_dir)
    damage(run_dir)
    before = {path: read_records(str(path))[0] for path in (event_file(run_dir, "train"),)}

    finished = run_cli(*FLAGS)

    assert finished.returncode == 0, finished.stderr
    assert "Traceback" not in finished.stderr
    warnings = finished.stderr.splitlines()
    assert len(warnings) == (0 if words is None else 1), finished.stderr
    assert all(word in warnings[0] for word in words or ()), finished.stderr
    assert f"resuming {run_dir} from step {step}" in finished.stdout.splitlines()
    assert json.loads((run_dir / "result.json").read_text())["steps"] == DIGITS_STEPS
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [(json.loads(line)["epoch"], json.loads(line)["step"]) for line in lines] == [(1, DIGITS_STEPS)]
    for path, records in before.items():
        kept = [record for record in records if event_pb2.Event.FromString(record).step <= step]
        assert read_records(str(path)) == (kept, 0), path
    assert checkpoint_file(run_dir, 20, "data").read_bytes() == checkpoint_file(interrupted, 20, "data").read_bytes()
    assert not list((run_dir / "checkpoints").glob("*_temp"))


# (id, damage, extra flags, words the one error line must hold ({run} is the run folder))
REFUSED = [
    pytest.param(
        truncate_every_index,
        (),
        ("no checkpoint in {run}/checkpoints restores", "--run_name"),
        id="every-checkpoint-damaged",
    ),
    pytest.param(
        remove_checkpoint_files,
        (),
        ("no checkpoint in {run}/checkpoints restores", "--run_name"),
        id="index-naming-only-deleted-files",
    ),
    pytest.param(replace_with_file("checkpoints"), (), ("{run}/checkpoints is a file",), id="checkpoints-is-a-file"),
    pytest.param(remove("settings.json"), (), ("{run}", "no settings.json"), id="settings-missing"),
    pytest.param(write("settings.json", b'{"dataset": "dig'), (), ("{run}/settings.json",), id="settings-invalid-json"),
    pytest.param(write("settings.json", b"[1, 2]"), (), ("{run}/settings.json", "list"), id="settings-a-list"),
    pytest.param(
        write("settings.json", b'{"dataset": "\xff\xfe"}'),
        (),
        ("{run}/settings.json", "utf-8"),
        id="settings-not-utf-8",
    ),
    pytest.param(
        replace_with_folder("settings.json"),
        (),
        ("{run}/settings.json", "a folder, not a regular file"),
        id="settings-a-directory",
    ),
    pytest.param(
        claim_another_model,
        ("--model=linear",),
        ("{run}/checkpoints", "do not match the model"),
        id="checkpoint-of-another-model",
    ),
]


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
@pytest.mark.parametrize(("damage", "flags", "words"), REFUSED)
def test_a_run_that_cannot_be_resumed_is_refused_and_left_as_it_was(
    run_cli, tmp_path, interrupted, damage, flags, words
):
    run_dir = tmp_path / "logs" / "r"
    shutil.copytree(interrupted, run_dir)
    damage(run_dir)
    before = snapshot(tmp_path / "logs", folder_times=False)

    refused = run_cli(*FLAGS, *flags)

    assert_one_line_error(refused, tuple(word.format(run=run_dir) for word in words))
    assert snapshot(tmp_path / "logs", folder_times=False) == before


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
def test_a_run_folder_that_is_a_file_or_cannot_be_written_is_refused(run_cli, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "r").write_bytes(b"a file where the run folder goes")
    assert_one_line_error(run_cli(*FLAGS), (f"{logs / 'r'} is a file",))
    (logs / "r").unlink()
    (logs / "r").symlink_to("/proc/sys")  # Exists and is a folder, but nothing can be made in it.
    assert_one_line_error(run_cli(*FLAGS), (f"{logs / 'r'} cannot be written", "--run_name"))
    assert sorted(os.listdir(logs)) == ["r"] and (logs / "r").is_symlink()


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
def test_a_run_owned_by_another_process_is_refused_or_skipped_by_a_default_name(run_cli, tmp_path, interrupted):
    """The lock is a real flock held by this test's process: a second command naming the run is
    refused naming this PID; one whose name is the default takes the next free name."""
    run_dir = tmp_path / "logs" / "r"
    shutil.copytree(interrupted, run_dir)
    default_dir = tmp_path / "logs" / "convnet-dataset=digits-validation_split=0"
    shutil.copytree(interrupted, default_dir)
    held = [locks.acquire(str(run_dir)), locks.acquire(str(default_dir))]
    before = snapshot(tmp_path / "logs", folder_times=False)
    try:
        assert_one_line_error(run_cli(*FLAGS), (f"{run_dir} is in use by process {os.getpid()}",))
        assert snapshot(tmp_path / "logs", folder_times=False) == before

        moved = run_cli("--dataset=digits", "--validation_split=0")
        assert moved.returncode == 0, moved.stderr
        digits = sources.load_splits(Config(dataset="digits")).source
        assert f"training {default_dir}-2 on {digits}" in moved.stdout.splitlines()
    finally:
        for lock in held:
            lock.release()


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
def test_a_name_that_fits_alone_but_not_with_its_suffix_is_refused(run_cli, tmp_path, interrupted):
    """A finished run named with 254 bytes: its successor would be `-2`, 256 bytes, too long."""
    name = "n" * 254
    shutil.copytree(interrupted, tmp_path / "logs" / name)
    files.write_json(str(tmp_path / "logs" / name / "result.json"), {"train": {}, "test": {}})
    before = snapshot(tmp_path / "logs")
    refused = run_cli("--dataset=digits", "--checkpoint_every=20", f"--run_name={name}")
    assert_one_line_error(refused, (f"{name}-2", "256 bytes", "--run_name"))
    assert snapshot(tmp_path / "logs") == before


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
@pytest.mark.parametrize(
    "content",
    [b"", b'{"train": {"accur', b"[]", b'{"dataset": "digits"}'],
    ids=["empty", "cut-short", "a-list", "no-results"],
)
def test_compare_refuses_a_damaged_result_in_one_line(tmp_path, interrupted, content):
    shutil.copytree(interrupted, tmp_path / "r")
    (tmp_path / "r" / "result.json").write_bytes(content)
    compared = subprocess.run(
        [sys.executable, "-m", "train_loop.compare", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert_one_line_error(compared, (str(tmp_path / "r" / "result.json"),))


def study(logdir: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "train_loop.study",
            "--experiments=baseline",
            "--study_name=s",
            f"--logdir={logdir}",
            "--dataset=digits",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
def test_the_study_refuses_a_damaged_result_and_a_run_another_process_trains(tmp_path, interrupted):
    """A study reusing a damaged result.json, and a second study reaching the experiment a first
    one trains (its lock held here), each stop in one line and train nothing."""
    baseline = tmp_path / "s" / "baseline"
    shutil.copytree(interrupted, baseline)
    (baseline / "settings.json").unlink()  # The flags differ from the template's; no check to fail.
    (baseline / "result.json").write_bytes(b"{")
    damaged = study(tmp_path)
    assert "Traceback" not in damaged.stderr and damaged.returncode == 2, damaged.stderr
    assert damaged.stderr.splitlines()[-1].startswith(f"train_loop: error: cannot read {baseline / 'result.json'}")
    (baseline / "result.json").unlink()
    shutil.rmtree(baseline / "checkpoints")
    before = snapshot(baseline, folder_times=False)
    lock = locks.acquire(str(baseline))
    try:
        held = study(tmp_path)
    finally:
        lock.release()
    assert held.returncode == 2, held.stderr
    assert held.stderr.splitlines()[-1] == (
        f"train_loop: error: {baseline} is in use by process {os.getpid()}: wait for it to end, or pass another "
        "--run_name (--study_name for a study)."
    )
    assert snapshot(baseline, folder_times=False) == before


def test_a_default_run_name_is_one_folder_even_when_a_setting_holds_a_slash(tmp_path):
    """`--best_metric=validation/accuracy` used to name the run `convnet-best_metric=validation/accuracy`:
    a folder `accuracy` inside a folder `convnet-best_metric=validation`."""
    config = Config(dataset="digits", best_metric="validation/accuracy", logdir=str(tmp_path))
    run_dir = runs.choose_run_dir(config)
    assert os.path.dirname(run_dir) == str(tmp_path)
    assert os.path.basename(run_dir) == "convnet-dataset=digits-best_metric=validation.accuracy"
