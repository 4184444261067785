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
from train_loop import cli
from train_loop.configs import Config

SCRIPTS = tomllib.loads(Path(REPO, "pyproject.toml").read_text())["project"]["scripts"]
TRAINING_FLAGS = set(Config.__dataclass_fields__)
# What each tool takes besides --version: study and launch pass the training flags on.
EXPECTED_FLAGS = {
    "train-loop": TRAINING_FLAGS,
    "train-loop-study": TRAINING_FLAGS
    | {"experiments", "extra_flags", "study_name", "flags_dir", "seeds", "sweep", "jobs"},
    "train-loop-launch": TRAINING_FLAGS | {"workers"},
    "train-loop-compare": set(),
    "train-loop-bench": {"dataset", "batch_size", "precision", "steps", "quick", "rounds", "contenders", "whole_run"},
}


def run_script(tmp_path: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    module, function = SCRIPTS[name].split(":")
    script = tmp_path / name
    script.write_text(f"import sys\nfrom {module} import {function}\nsys.exit({function}())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )


def listed_flags(helpshort: str) -> set[str]:
    return set(re.findall(r"^  --(?:\[no\])?(\w+):", helpshort, flags=re.MULTILINE))


def test_every_tool_has_a_script():
    assert set(SCRIPTS) == set(EXPECTED_FLAGS)


@pytest.mark.parametrize("name", sorted(EXPECTED_FLAGS))
def test_helpshort_lists_the_flags_the_tool_takes_under_a_usage_line(tmp_path, name):
    shown = run_script(tmp_path, name, "--helpshort")

    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"Usage: {name} ")
    assert listed_flags(shown.stdout) == EXPECTED_FLAGS[name] | {"version"}
    headings = re.findall(r"^(\w[\w ]*):$", shown.stdout, flags=re.MULTILINE)
    assert headings[-1] == "this tool"
    if EXPECTED_FLAGS[name] >= TRAINING_FLAGS:
        assert headings[-len(cli.GROUPS) - 1 : -1] == list(cli.GROUPS)


def test_every_training_flag_is_in_exactly_one_group():
    grouped = [name for names in cli.GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(TRAINING_FLAGS)


def test_python_m_lists_the_same_flags_as_the_script(tmp_path):
    # The study is a package: `python -m train_loop.study` runs its __main__, which the README documents.
    assert SCRIPTS["train-loop-study"] == "train_loop.study.study:run"
    shown = subprocess.run(
        [sys.executable, "-m", "train_loop.study", "--helpshort"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert listed_flags(shown.stdout) == EXPECTED_FLAGS["train-loop-study"] | {"version"}


@pytest.mark.parametrize("name", ["train-loop", "train-loop-bench"])
def test_version_prints_the_package_version_and_exits(tmp_path, name):
    shown = run_script(tmp_path, name, "--version")

    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"train_loop {train_loop.__version__} (tensorflow ")
    assert os.listdir(tmp_path) == [name]  # nothing written beside the script (no logdir)


@pytest.mark.parametrize("ending, status", [("return None", 0), ("sys.exit(2)", 2), ("raise KeyError('bug')", 1)])
def test_a_tool_freezes_the_collector_when_its_main_ends_however_it_ends(tmp_path, ending, status):
    # Frozen, the interpreter's exit skips collecting TensorFlow's objects; atexit handlers still run.
    script = tmp_path / "tool.py"
    script.write_text(
        "import atexit, gc, sys\n"
        "from train_loop import apps\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
        f"def main(argv):\n    {ending}\n"
        "apps.run(main, usage='Usage: tool', groups={})\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    ended = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)

    assert ended.returncode == status, ended.stderr
    assert ended.stdout.strip() == "frozen at exit: True"


def test_the_training_tool_freezes_the_collector_after_a_user_error(tmp_path):
    # A user error raised inside main (a stray argument): one line, status 2, and the fast exit.
    code = (
        "import atexit, gc\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
        "from train_loop.cli import run\nrun()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    ended = subprocess.run(
        [sys.executable, "-c", code, f"--logdir={tmp_path / 'logs'}", "stray"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )

    assert ended.returncode == 2
    assert ended.stderr.strip().splitlines() == [
        "train_loop: error: unexpected arguments 'stray': every setting is a --flag=value."
    ]
    assert ended.stdout.strip() == "frozen at exit: True"
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    "name, bad_flag",
    [
        ("train-loop-bench", "--rounds=0"),
        ("train-loop-bench", "--steps=5"),
        ("train-loop", "--epochs=many"),
        ("train-loop-compare", "--nonsense=1"),
    ],
)
def test_a_bad_flag_is_one_line_and_status_2_in_every_tool(tmp_path, name, bad_flag):
    shown = run_script(tmp_path, name, bad_flag)

    assert shown.returncode == 2, shown.stderr
    lines = shown.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_loop: error: ")
    assert bad_flag.split("=")[0].lstrip("-") in lines[0]
    assert os.listdir(tmp_path) == [name]  # nothing written beside the script


def test_a_shipped_flagfile_is_named_without_a_path(tmp_path):
    """`--flagfile=l2` from any folder: the package's own flagfile, as installed from the wheel."""
    assert cli.config_from_args(["--flagfile=l2"]).l2 == 0.001
    assert cli.config_from_args(["--flagfile=dropout.cfg"]).dropout > 0
    refused = run_script(tmp_path, "train-loop", "--flagfile=l3")
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        "train_loop: error: --flagfile=l3: no such file, and no shipped flagfile of that name; the shipped ones "
        "are baseline, dropout, l1, l1l2, l2 (e.g. --flagfile=baseline), or give the path of a file of "
        "--flag=value lines."
    ]
