"""`python -m train_loop.study` and `python -m train_loop.compare`: the table and its numbers."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import REPO
from tensorboard.backend.event_processing import plugin_event_multiplexer

from train_loop import Config, report, study, train
from train_loop.errors import UsageError

pytestmark = pytest.mark.slow  # every test here trains a model


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=dict(os.environ))


def parse_table(markdown: str) -> dict[str, list[str]]:
    """Rows of a markdown table by their first cell, headings row included under 'run'."""
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows}


def expected_cells(run_dir: Path) -> list[str]:
    """A row recomputed from the run's result.json and its saved model's first kernel."""
    result = json.loads((run_dir / "result.json").read_text())
    train, validation, test = result["train"], result["validation"], result["test"]
    kernel = np.abs(keras.models.load_model(run_dir / "model.keras").get_layer("conv1").kernel.numpy())
    return [f"{train['cross_entropy']:.4f}", f"{train['regularization']:.4f}", f"{train['total']:.4f}",
            f"{train['accuracy']:.4f}", f"{validation['cross_entropy']:.4f}", f"{validation['accuracy']:.4f}",
            f"{test['cross_entropy']:.4f}", f"{test['accuracy']:.4f}",
            f"{test['cross_entropy'] - train['cross_entropy']:+.4f}", f"{kernel.mean():.4f}",
            f"{kernel.max():.4f}", f"{np.mean(kernel < 1e-3):.1%}"]


def test_study_trains_each_experiment_then_reuses_them(tmp_path):
    args = ("--experiments=baseline,l1", "--extra_flags=--dataset=digits --steps_per_loop=50",
            f"--logdir={tmp_path}", "--study_name=mine")
    first = run_module("train_loop.study", *args)
    assert first.returncode == 0, first.stderr
    folder = tmp_path / "mine"
    assert sorted(os.listdir(folder)) == ["baseline", "l1", "study.md"]
    # TensorBoard's runs: no stray `.` for the study's folder; the HParams experiment in the newest run.
    seen = plugin_event_multiplexer.EventMultiplexer().AddRunsFromDirectory(str(folder)).Reload().Runs()
    assert sorted(seen) == ["baseline", "baseline/test", "baseline/train", "baseline/validation",
                            "l1", "l1/test", "l1/train", "l1/validation"]
    assert ["_hparams_/experiment" in seen[name]["tensors"] for name in ("baseline", "l1")] == [False, True]
    table = (folder / "study.md").read_text()
    assert table in first.stdout
    rows = parse_table(table)
    assert list(rows) == ["run", "baseline", "l1"]
    for name in ("baseline", "l1"):
        assert rows[name] == expected_cells(folder / name), name
    settings = json.loads((folder / "l1" / "settings.json").read_text())
    assert (settings["dataset"], settings["l1"], settings["l2"]) == ("digits", 0.001, 0.0)
    assert float(rows["baseline"][1]) == 0.0 < float(rows["l1"][1])

    results = {name: (folder / name / "result.json").read_bytes() for name in ("baseline", "l1")}
    again = run_module("train_loop.study", *args)
    assert again.returncode == 0, again.stderr
    assert "baseline: reusing the finished run" in again.stdout and "training" not in again.stdout
    assert {name: (folder / name / "result.json").read_bytes() for name in results} == results
    assert (folder / "study.md").read_text() == table


def test_study_passes_a_user_model_and_npz_on_to_every_experiment(tmp_path):
    """--model and --dataset given to the study reach each experiment; the folder is named after the npz."""
    made = subprocess.run([sys.executable, "examples/wine.py", str(tmp_path / "wine.npz")], cwd=REPO)
    assert made.returncode == 0
    finished = run_module("train_loop.study", "--experiments=baseline,l2", "--model=examples/wine.py:build",
                          f"--dataset={tmp_path / 'wine.npz'}", "--batch_size=16", f"--logdir={tmp_path / 'logs'}")
    assert finished.returncode == 0, finished.stderr
    (folder,) = (tmp_path / "logs").glob("study-wine-*")
    rows = parse_table((folder / "study.md").read_text())
    assert list(rows) == ["run", "baseline", "l2"] and float(rows["baseline"][1]) == 0.0 < float(rows["l2"][1])
    for name in ("baseline", "l2"):
        settings = json.loads((folder / name / "settings.json").read_text())
        assert (settings["model"], settings["dataset"]) == ("examples/wine.py:build", str(tmp_path / "wine.npz"))
        assert len(json.loads((folder / name / "result.json").read_text())["confusion_matrix"]) == 3


def test_study_refuses_a_changed_experiment_in_the_same_folder(tmp_path):
    made = train(Config(dataset="digits", logdir=str(tmp_path / "mine"), run_name="baseline", epochs=1,
                        steps_per_loop=50))
    assert made["steps"] == (1437 - 144) // 32  # digits less its validation split, at batch 32
    refused = run_module("train_loop.study", "--experiments=baseline", "--dataset=digits", "--epochs=2",
                         f"--logdir={tmp_path}", "--study_name=mine")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.splitlines() == [refused.stderr.strip()]
    assert "epochs (run has 1, flags say 2)" in refused.stderr and "--study_name" in refused.stderr


def test_five_experiments_in_one_process_print_no_retracing_warning(tmp_path):
    """From the fifth experiment on, TensorFlow would call each run's own traced step a retracing."""
    (tmp_path / "flags").mkdir()
    for index in range(5):
        (tmp_path / "flags" / f"e{index}.cfg").write_text(f"--l2={index / 1000}\n")
    done = run_module("train_loop.study", f"--flags_dir={tmp_path / 'flags'}", "--experiments=e0,e1,e2,e3,e4",
                      "--dataset=digits", "--steps_per_loop=50", f"--logdir={tmp_path / 'logs'}")
    assert done.returncode == 0, done.stderr
    assert "retracing" not in done.stderr


def test_default_study_folders_are_named_by_what_the_shared_flags_change():
    """The README's two studies (1 epoch, then --epochs=10) get folders of their own."""
    one, ten = (study.default_study_name(flags) for flags in (["--dataset=fashion_mnist"],
                                                              ["--dataset=fashion_mnist", "--epochs=10"]))
    today = datetime.date.today().isoformat()
    assert (one, ten) == (f"study-fashion_mnist-{today}", f"study-fashion_mnist-epochs=10-{today}")
    assert study.default_study_name(["--model=linear", "--l2=0.01"]) == f"study-mnist-linear-l2=0.01-{today}"


def test_study_reads_the_flagfiles_shipped_in_the_package_and_a_folder_of_ones_own(tmp_path):
    """The default flagfiles are the package's (the same files as the source's flags/); --flags_dir
    swaps in a folder of the user's, and an unknown experiment lists the ones it has."""
    shipped = study.experiment_configs(["l1l2"], ["--dataset=digits"])
    assert (shipped["l1l2"].l1, shipped["l1l2"].l2) == parse_flagfile(Path(REPO, "flags", "l1l2.cfg"))
    (tmp_path / "mine.cfg").write_text("--l2=0.5\n")
    assert study.experiment_configs(["mine"], [], str(tmp_path))["mine"].l2 == 0.5
    with pytest.raises(UsageError, match="known: mine"):
        study.experiment_configs(["baseline"], [], str(tmp_path))


def parse_flagfile(path):
    """(l1, l2) as the flagfile's `--name=value` lines set them."""
    values = dict(line.removeprefix("--").split("=") for line in path.read_text().splitlines()
                  if line.startswith("--"))
    return float(values.get("l1", 0)), float(values.get("l2", 0))


def test_compare_prints_the_table_of_runs_in_a_folder(tmp_path):
    for name, l2 in (("a-plain", 0.0), ("b-l2", 0.01)):
        train(Config(dataset="digits", l2=l2, logdir=str(tmp_path), run_name=name, steps_per_loop=50))
    (tmp_path / "not-a-run").mkdir()
    compared = run_module("train_loop.compare", str(tmp_path))
    assert compared.returncode == 0, compared.stderr
    rows = parse_table(compared.stdout)
    assert list(rows) == ["run", "a-plain", "b-l2"]
    for name in ("a-plain", "b-l2"):
        assert rows[name] == expected_cells(tmp_path / name), name
    assert report.first_kernel(str(tmp_path / "b-l2")).shape == (3, 3, 1, 32)


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_compare_refuses_a_folder_without_runs(tmp_path, folder):
    (tmp_path / "empty").mkdir()
    refused = run_module("train_loop.compare", str(tmp_path / folder))
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("train_loop: error: ") and len(refused.stderr.splitlines()) == 1
    assert str(tmp_path / folder) in refused.stderr
