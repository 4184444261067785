"""`--jit_compile=auto`: measured once per CPU and step, recorded in the run, reused on resume and
from the cache, overridable, and never failed by a cache it cannot read or write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from helpers import kill_at_first_checkpoint

pytestmark = pytest.mark.slow  # every test here trains a model

FLAGS = ("--dataset=digits", "--steps_per_loop=5")


def run(logdir: Path, cache: str, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "train_loop", f"--logdir={logdir}", *FLAGS, *flags]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "TRAIN_LOOP_CACHE": cache}
    )


def decided(run_dir: Path) -> tuple[dict, dict]:
    """What settings.json and result.json record of the choice."""
    settings = json.loads((run_dir / "settings.json").read_text())
    result = json.loads((run_dir / "result.json").read_text())
    return settings["decided"], result["decided"]


def flip_cache(cache: Path) -> bool:
    """Turns every cached choice around; returns what the choice was."""
    entries = json.loads(cache.read_text())
    [choice] = {entry["jit_compile"] for entry in entries.values()}
    cache.write_text(json.dumps({key: {**entry, "jit_compile": not choice} for key, entry in entries.items()}))
    return choice


def test_auto_measures_records_and_caches_its_choice(tmp_path):
    cache = tmp_path / "speed.json"
    first = run(tmp_path, str(cache), "--run_name=first")
    assert first.returncode == 0, first.stderr
    in_settings, in_result = decided(tmp_path / "first")
    assert in_settings == in_result and in_result["by"] == "measured"
    speeds = in_result["examples_per_second"]
    assert set(speeds) == {"xla", "no_xla"} and min(speeds.values()) > 0
    assert in_result["jit_compile"] == (speeds["xla"] > speeds["no_xla"])
    assert f"XLA {'on' if in_result['jit_compile'] else 'off'}, measured on this CPU" in first.stdout
    assert json.loads((tmp_path / "first" / "settings.json").read_text())["jit_compile"] == "auto"

    choice = flip_cache(cache)  # The next run must take the cache's word, whatever it says.
    second = run(tmp_path, str(cache), "--run_name=second")
    assert second.returncode == 0, second.stderr
    assert decided(tmp_path / "second")[1] == {"jit_compile": not choice, "by": "cached", "examples_per_second": speeds}
    assert "(cached)" in second.stdout


@pytest.mark.parametrize(("flag", "choice"), [("--jit_compile", True), ("--nojit_compile", False)])
def test_the_flag_forces_the_choice_without_measuring(tmp_path, flag, choice):
    cache = tmp_path / "speed.json"
    finished = run(tmp_path, str(cache), flag, "--run_name=r")
    assert finished.returncode == 0, finished.stderr
    assert decided(tmp_path / "r")[1] == {"jit_compile": choice, "by": "flag"}
    assert not cache.exists()


def test_a_resumed_run_keeps_the_choice_it_started_with(tmp_path):
    cache = tmp_path / "speed.json"
    command = [
        sys.executable,
        "-m",
        "train_loop",
        f"--logdir={tmp_path}",
        *FLAGS,
        "--epochs=20",
        "--checkpoint_every=10",
        "--run_name=r",
    ]
    environment = {**os.environ, "TRAIN_LOOP_CACHE": str(cache)}
    kill_at_first_checkpoint(command, tmp_path / "r", env=environment)
    started_with = json.loads((tmp_path / "r" / "settings.json").read_text())["decided"]
    assert started_with["by"] == "measured"

    flip_cache(cache)  # A fresh run would now pick the other way; the resumed one must not.
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert resumed.returncode == 0, resumed.stderr
    assert "as the run started" in resumed.stdout
    assert decided(tmp_path / "r")[1] == {"jit_compile": started_with["jit_compile"], "by": "resumed"}


@pytest.mark.parametrize("damage", ["garbage", "list", "directory", "unwritable"])
def test_a_cache_that_cannot_be_read_or_written_never_fails_the_run(tmp_path, damage):
    cache = tmp_path / "speed.json"
    if damage == "garbage":
        cache.write_bytes(b"\x00{not json")
    elif damage == "list":
        cache.write_text("[1, 2]")
    elif damage == "directory":
        cache.mkdir()
    else:
        cache = Path("/proc/train_loop-cache/speed.json")  # Not even root can create it.
    finished = run(tmp_path, str(cache), "--run_name=r")
    assert finished.returncode == 0, finished.stderr
    assert decided(tmp_path / "r")[1]["by"] == "measured"
    if damage in ("garbage", "list"):  # Replaced by a readable cache holding the new measurement.
        assert [entry["jit_compile"] for entry in json.loads(cache.read_text()).values()] == [
            decided(tmp_path / "r")[1]["jit_compile"]
        ]


def test_a_bad_jit_compile_value_is_one_line(run_cli):
    finished = run_cli("--dataset=digits", "--jit_compile=maybe")
    assert finished.returncode == 2
    assert finished.stderr.count("\n") == 1 and "--jit_compile=maybe" in finished.stderr
    assert "auto, true or false" in finished.stderr
