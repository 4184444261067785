"""Faults of what a run writes and prints: its own outputs of the wrong kind or read-only in a run
folder being resumed, names that are not UTF-8, and a standard output closed while it trains.
Every process is real and bounded in time; the read-only cases drop root's capabilities, which
would ignore the permission bits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from helpers import assert_one_line_error, snapshot

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
# Every output a run can write: validation and its best model, and the export.
FLAGS = (
    "--dataset=digits",
    "--epochs=1",
    "--nojit_compile",
    "--best_metric=validation/accuracy",
    "--export=saved_model",
)
WITHOUT_CAPABILITIES = ("setpriv", "--inh-caps=-all", "--bounding-set=-all")


def run(*arguments: str | bytes, module: str = "train_loop", prefix: tuple[str, ...] = ()):
    return subprocess.run(
        [*prefix, sys.executable, "-m", module, *arguments],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=ENV,
        timeout=600,
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("finished")
    result = run(*FLAGS, f"--logdir={logdir}", "--run_name=r")
    assert result.returncode == 0, result.stderr
    return logdir / "r"


@pytest.fixture
def resumable(finished_run, tmp_path) -> Path:
    """A copy of a finished run with every output, less its result.json: the same command resumes it."""
    run_dir = tmp_path / "r"
    shutil.copytree(finished_run, run_dir, symlinks=True)
    (run_dir / "result.json").unlink()
    return run_dir


def replace_with_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "kept").write_text("a user's file\n")


def replace_with_file(path: Path) -> None:
    shutil.rmtree(path)
    path.write_text("a user's file\n")


def replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "replace", "kind"),
    [
        ("metrics.jsonl", replace_with_folder, "is a folder, not a file"),
        ("metrics.jsonl", replace_with_fifo, "is not a regular file"),
        ("model.keras", replace_with_folder, "is a folder, not a file"),
        ("best/model.keras", replace_with_folder, "is a folder, not a file"),
        ("best", replace_with_file, "is a file, not a folder"),
        ("saved_model", replace_with_file, "is a file, not a folder"),
        ("validation", replace_with_file, "is a file, not a folder"),
    ],
    ids=["metrics-folder", "metrics-fifo", "model-folder", "best-model-folder", "best-file", "export-file", "events"],
)
def test_an_output_of_the_wrong_kind_is_refused_before_training(resumable, name, replace, kind):
    """One line naming the path and the fix, exit 2, before anything is written (the export's
    included, which the run writes only after the whole training)."""
    replace(resumable / name)
    before = snapshot(resumable)

    result = run(*FLAGS, f"--logdir={resumable.parent}", "--run_name=r")

    assert_one_line_error(result, (f"{resumable / name} {kind}: move it away, or pass another --run_name.",))
    assert snapshot(resumable) == before


@pytest.mark.slow
@pytest.mark.parametrize("name", ["checkpoints", "train", "validation", "test", "best", "saved_model"])
def test_a_read_only_output_folder_is_refused_before_training(resumable, name):
    """Without root's capabilities, as any user: the folder the run would write into is refused in
    one line, and the run is left as it was (but for its folder's time: a probe made and removed)."""
    (resumable / name).chmod(0o555)
    before = snapshot(resumable, folder_times=False)

    result = run(*FLAGS, f"--logdir={resumable.parent}", "--run_name=r", prefix=WITHOUT_CAPABILITIES)

    assert_one_line_error(
        result,
        (
            f"the run's {name}/ folder cannot be written ({resumable / name}: Permission denied): "
            "make it writable, or pass another --run_name.",
        ),
    )
    assert snapshot(resumable, folder_times=False) == before


@pytest.mark.slow
def test_a_read_only_metrics_file_is_refused_before_training(resumable):
    (resumable / "metrics.jsonl").chmod(0o444)
    before = snapshot(resumable, folder_times=False)

    result = run(*FLAGS, f"--logdir={resumable.parent}", "--run_name=r", prefix=WITHOUT_CAPABILITIES)

    assert_one_line_error(
        result,
        (
            f"{resumable / 'metrics.jsonl'} cannot be written (Permission denied): make it writable, "
            "or pass another --run_name.",
        ),
    )
    assert snapshot(resumable, folder_times=False) == before


@pytest.mark.parametrize(
    ("module", "flag"),
    [("train_loop", "run_name"), ("train_loop", "logdir"), ("train_loop.study", "study_name")],
)
def test_a_name_that_is_not_utf8_is_refused_when_flags_are_parsed(tmp_path, module, flag):
    """Raw bytes in argv, as a shell passes them: one line naming the flag, nothing written."""
    value = os.fsencode(tmp_path / "logs") + b"/\xff" if flag == "logdir" else b"r\xff"
    logdir = () if flag == "logdir" else (f"--logdir={tmp_path / 'logs'}",)

    result = run("--dataset=digits", "--epochs=1", *logdir, b"--" + flag.encode() + b"=" + value, module=module)

    assert_one_line_error(
        result,
        (f"flag --{flag}=", "it holds bytes that are not UTF-8", "use a UTF-8 name"),
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_closed_stdout_ends_the_printing_and_the_run_trains_to_its_end(tmp_path):
    """`train-loop ... | head -1`: the reader takes the first line and closes the pipe; the run
    trains on, writes every file and exits 0, with nothing on stderr about the pipe."""
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "train_loop", *FLAGS, "--epochs=2", f"--logdir={tmp_path}", "--run_name=r"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=REPO,
            env=ENV,
        )
        first = process.stdout.readline()
        process.stdout.close()
        try:
            code = process.wait(timeout=600)
        finally:
            process.kill()
    errors = stderr_path.read_text()

    assert first.startswith(b"training "), errors
    assert code == 0, errors
    assert "Traceback" not in errors and "BrokenPipe" not in errors, errors
    run_dir = tmp_path / "r"
    assert json.loads((run_dir / "result.json").read_text())["test"]
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    for name in ("model.keras", "best/model.keras", "saved_model/saved_model.pb"):
        assert (run_dir / name).is_file(), name
