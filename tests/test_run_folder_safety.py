"""What a run writes stays in its folder, and one process at a time writes it: a relative
`--logdir` through a checkpoint-index repair, a model function that changes the working folder,
a lock whose `.lock` is deleted, a symlink, a folder or unreadable, and metrics.jsonl after a
SIGKILL. Every process is real and bounded in time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # every test here trains a model

DIGITS_STEPS = 44  # digits' training examples at batch 32, with --validation_split=0.
DIGITS_VALIDATED_STEPS = 40  # With the default validation split.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}


def start(*flags: str, cwd: Path | str = REPO, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "train_loop", *flags],
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {what}: {process.communicate(timeout=30)[1][-3000:]}")
        time.sleep(0.005)


def saved_steps(run_dir: Path) -> list[int]:
    indexes = (run_dir / "checkpoints").glob("ckpt-*.index")
    return sorted(int(path.name[len("ckpt-") : -len(".index")]) for path in indexes)


def damage_index(kind: str, checkpoint_dir: Path) -> None:
    index = checkpoint_dir / "checkpoint"
    if kind == "missing":
        index.unlink()
    elif kind == "garbage":
        index.write_bytes(b"\x00\xffnot an index")
    else:  # Stale: names a checkpoint that is not there.
        index.write_text('model_checkpoint_path: "ckpt-1"\nall_model_checkpoint_paths: "ckpt-1"\n')


@pytest.mark.parametrize("kind", ["missing", "garbage", "stale"])
def test_a_relative_logdir_through_an_index_repair_rotates_the_run_and_nothing_else(tmp_path, kind):
    """A run stopped by SIGTERM, its index damaged, resumed from a working folder holding files
    named like its checkpoints: the repaired index names the run's own files, so the resumed run
    rotates them down to 3 and the working folder's are left alone."""
    flags = (
        "--dataset=digits",
        "--validation_split=0",
        "--epochs=10",
        "--checkpoint_every=20",
        "--steps_per_loop=10",
        "--summary_every=20",
        "--nojit_compile",
        "--logdir=logs",
        "--run_name=r",
    )
    decoys = {
        f"ckpt-{step}{suffix}": f"decoy {step}{suffix}"
        for step in range(20, 10 * DIGITS_STEPS + 1, 20)
        for suffix in (".index", ".data-00000-of-00001")
    }
    for name, content in decoys.items():
        (tmp_path / name).write_text(content)
    run_dir = tmp_path / "logs" / "r"
    stopped = start(*flags, cwd=tmp_path)
    wait_for(lambda: len(saved_steps(run_dir)) >= 3, stopped, "third checkpoint")
    stopped.send_signal(signal.SIGTERM)
    code, _, stderr = finish(stopped, timeout=120)
    assert code == 143, stderr
    before = saved_steps(run_dir)
    assert len(before) == 3 and before[-1] < 10 * DIGITS_STEPS
    damage_index(kind, run_dir / "checkpoints")

    code, stdout, stderr = finish(start(*flags, cwd=tmp_path))

    assert code == 0, stderr
    assert {name: (tmp_path / name).read_text() for name in decoys if (tmp_path / name).exists()} == decoys
    assert saved_steps(run_dir) == [400, 420, 440]
    assert ".." not in (run_dir / "checkpoints" / "checkpoint").read_text()
    assert f"resuming {run_dir} from step {before[-1]}" in stdout  # Said as the absolute folder it is.


CHANGES_FOLDER = '''
import os
import keras


def build():
    """A linear model for digits, built after moving to another working folder."""
    os.chdir({elsewhere!r})
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
'''


def test_a_model_function_that_changes_the_working_folder_keeps_the_run_in_one_folder(tmp_path):
    """Stopped by SIGTERM and resumed: every file of the run is in `<logdir>/<run_name>` under the
    folder the command started in, and nothing is written where the model function moved to."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "moving.py").write_text(CHANGES_FOLDER.format(elsewhere=str(elsewhere)))
    flags = (
        "--dataset=digits",
        "--model=moving.py:build",
        "--epochs=30",
        "--checkpoint_every=20",
        "--steps_per_loop=10",
        "--nojit_compile",
        "--logdir=logs",
        "--run_name=r",
    )
    run_dir = tmp_path / "logs" / "r"
    stopped = start(*flags, cwd=tmp_path)
    wait_for(lambda: saved_steps(run_dir), stopped, "checkpoint")
    stopped.send_signal(signal.SIGTERM)
    code, _, stderr = finish(stopped, timeout=120)
    assert code == 143, stderr
    step = saved_steps(run_dir)[-1]

    code, stdout, stderr = finish(start(*flags, cwd=tmp_path))

    assert code == 0, stderr
    assert f"resuming {run_dir} from step {step}" in stdout
    assert os.listdir(elsewhere) == []
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "logs", "moving.py"]
    assert {"result.json", "settings.json", "metrics.jsonl", "model.keras", "checkpoints", "train"} <= set(
        os.listdir(run_dir)
    )
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 31))


def test_a_study_whose_model_function_changes_the_working_folder_keeps_its_runs_in_its_folder(tmp_path):
    """Two experiments trained one after the other in the study's process, from a relative
    --logdir: the second run and study.md go where the first run went, not where the model moved."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "moving.py").write_text(CHANGES_FOLDER.format(elsewhere=str(elsewhere)))
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "train_loop.study",
            "--experiments=baseline,l2",
            "--study_name=s",
            "--logdir=logs",
            "--dataset=digits",
            f"--model={tmp_path / 'moving.py'}:build",
            "--nojit_compile",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=ENV,
    )

    assert finished.returncode == 0, finished.stderr
    assert os.listdir(elsewhere) == []
    study = tmp_path / "logs" / "s"
    assert (study / "study.md").exists()
    for name in ("baseline", "l2"):
        assert (study / name / "result.json").exists(), name


def test_deleting_lock_does_not_let_a_second_process_train_the_run(tmp_path):
    """The first process keeps the folder itself locked: the same command, started after `.lock`
    was deleted, is refused naming the first process (found in the kernel's lock table), which
    then finishes the run alone. The first is paused meanwhile, so that it cannot finish first."""
    flags = ("--dataset=digits", "--epochs=3", "--nojit_compile", f"--logdir={tmp_path}", "--run_name=r")
    first = start(*flags)
    wait_for(lambda: (tmp_path / "r" / "settings.json").exists(), first, "training")
    first.send_signal(signal.SIGSTOP)
    try:
        (tmp_path / "r" / ".lock").unlink()
        code, stdout, stderr = finish(start(*flags))
    finally:
        first.send_signal(signal.SIGCONT)

    assert (code, stdout) == (2, ""), stderr
    assert stderr == (
        f"train_loop: error: {tmp_path / 'r'} is in use by process {first.pid}: wait for it to end, "
        "or pass another --run_name (--study_name for a study).\n"
    )
    code, _, stderr = finish(first)
    assert code == 0, stderr
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]


def make_symlink(lock: Path, tmp_path: Path) -> None:
    (tmp_path / "target").write_text("not yours\n")
    lock.symlink_to(tmp_path / "target")


@pytest.mark.parametrize(
    ("make", "prefix"),
    [
        (make_symlink, ()),
        (lambda lock, _: lock.mkdir(), ()),
        # Root reads any file: without its capabilities, the permission bits hold.
        (
            lambda lock, _: (lock.write_text("1\n"), lock.chmod(0)),
            ("setpriv", "--inh-caps=-all", "--bounding-set=-all"),
        ),
    ],
    ids=["symlink", "folder", "unreadable"],
)
def test_a_lock_file_of_the_wrong_kind_is_left_alone_and_the_run_trains(tmp_path, make, prefix):
    """The folder's own lock is the lock: a `.lock` that is a symlink (its target never written),
    a folder or unreadable is left as it was, and the run trains."""
    (tmp_path / "r").mkdir()
    lock = tmp_path / "r" / ".lock"
    make(lock, tmp_path)
    before = lock.lstat()

    code, stdout, stderr = finish(
        start("--dataset=digits", "--nojit_compile", f"--logdir={tmp_path}", "--run_name=r", prefix=prefix)
    )

    assert code == 0, stderr
    assert f"training {tmp_path / 'r'} on " in stdout
    after = lock.lstat()
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (before.st_ino, before.st_mode, before.st_mtime_ns)
    if lock.is_symlink():
        assert (tmp_path / "target").read_text() == "not yours\n"


def epoch_lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl's lines, less what a kill changes: the time and the throughput."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        {key: value for key, value in line.items() if key not in ("wall_time", "examples_per_second")} for line in lines
    ]


def test_a_sigkill_after_an_epochs_line_and_before_its_checkpoint_leaves_each_epoch_once(tmp_path):
    """Killed with epoch 2's line written and the newest checkpoint at step 79 (epoch 2 ends at 80):
    the resumed run drops that line and writes it again, so every epoch appears once, with the
    values of an uninterrupted run."""
    flags = (
        "--dataset=digits",
        "--epochs=4",
        "--deterministic",
        "--checkpoint_every=79",
        "--steps_per_loop=2",
        "--summary_every=2",
        "--nojit_compile",
        f"--logdir={tmp_path}",
    )
    code, _, stderr = finish(start(*flags, "--run_name=whole"))
    assert code == 0, stderr

    run_dir = tmp_path / "killed"
    killed = start(*flags, "--run_name=killed")
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, killed, "second epoch's line")
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=30)
    steps = saved_steps(run_dir)
    assert steps == [79], f"the kill came after the checkpoint at {steps}: a run this fast cannot test the case"
    assert [line["step"] for line in epoch_lines(run_dir)] == [40, 80]

    code, stdout, stderr = finish(start(*flags, "--run_name=killed"))

    assert code == 0, stderr
    assert f"resuming {run_dir} from step 79" in stdout
    resumed, whole = epoch_lines(run_dir), epoch_lines(tmp_path / "whole")
    assert [line["epoch"] for line in resumed] == [1, 2, 3, 4]
    assert [sorted(line) for line in resumed] == [sorted(line) for line in whole]
    for line, uninterrupted in zip(resumed, whole):
        assert all(abs(line[key] - value) <= 1e-6 for key, value in uninterrupted.items()), (line, uninterrupted)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_special_file_as_settings_json_is_one_line_not_a_hang(run_cli, tmp_path, kind):
    """A FIFO in settings.json's place would block the resume forever; /dev/zero would fill memory."""
    run_dir = tmp_path / "logs" / "special"
    run_dir.mkdir(parents=True)
    settings = run_dir / "settings.json"
    if kind == "fifo":
        os.mkfifo(settings)
    else:
        settings.symlink_to("/dev/zero")
    finished = run_cli("--dataset=digits", "--run_name=special", timeout=120)
    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.strip().splitlines() == [
        f"train_loop: error: cannot read {settings} "
        f"({'a FIFO' if kind == 'fifo' else 'a character device'}, not a regular file): "
        "nothing was changed: pass a new --run_name."
    ]
