"""The console scripts: each one's usage line, the flags its --helpshort lists, and --version.

Each script of `pyproject.toml`'s `[project.scripts]` is written into the test's folder the way
pip writes it (import the function, call it), so the test runs what an installed script runs
and follows the table if it changes; `.ci/run` runs the real ones from an installed wheel.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO

import train_loop
from train_loop.configs import Config

SCRIPTS = tomllib.loads(Path(REPO, "pyproject.toml").read_text())["project"]["scripts"]
TRAINING_FLAGS = set(Config.__dataclass_fields__)
# What each tool takes besides --version: study and launch pass the training flags on.
EXPECTED_FLAGS = {
    "train-loop": TRAINING_FLAGS,
    "train-loop-study": TRAINING_FLAGS | {"experiments", "extra_flags", "study_name", "flags_dir", "seeds", "sweep",
                                          "jobs"},
    "train-loop-launch": TRAINING_FLAGS | {"workers"},
    "train-loop-compare": set(),
    "train-loop-bench": {"dataset", "batch_size", "precision", "steps", "quick", "whole_run"},
}


def run_script(tmp_path: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    module, function = SCRIPTS[name].split(":")
    script = tmp_path / name
    script.write_text(f"import sys\nfrom {module} import {function}\nsys.exit({function}())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env)


def listed_flags(helpshort: str) -> set[str]:
    return set(re.findall(r"^  --(?:\[no\])?(\w+):", helpshort, flags=re.MULTILINE))


def test_every_tool_has_a_script():
    assert set(SCRIPTS) == set(EXPECTED_FLAGS)


@pytest.mark.parametrize("name", sorted(EXPECTED_FLAGS))
def test_helpshort_lists_the_flags_the_tool_takes_under_a_usage_line(tmp_path, name):
    shown = run_script(tmp_path, name, "--helpshort")

    assert shown.returncode == 1, shown.stderr  # absl's status after printing help
    assert shown.stdout.startswith(f"Usage: {name} ")
    assert listed_flags(shown.stdout) == EXPECTED_FLAGS[name] | {"version"}


def test_python_m_lists_the_same_flags_as_the_script(tmp_path):
    module = SCRIPTS["train-loop-study"].split(":")[0]
    shown = subprocess.run([sys.executable, "-m", module, "--helpshort"], capture_output=True, text=True,
                           timeout=120, cwd=REPO)
    assert listed_flags(shown.stdout) == EXPECTED_FLAGS["train-loop-study"] | {"version"}


@pytest.mark.parametrize("name", ["train-loop", "train-loop-bench"])
def test_version_prints_the_package_version_and_exits(tmp_path, name):
    shown = run_script(tmp_path, name, "--version")

    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"train_loop {train_loop.__version__} (tensorflow ")
    assert os.listdir(tmp_path) == [name]  # nothing written beside the script (no logdir)
