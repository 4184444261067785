"""`python -m train_loop.study` and `python -m train_loop.compare`: the table and its numbers."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO
from helpers import assert_one_line_error
from tensorboard.backend.event_processing import plugin_event_multiplexer

from train_loop import Config, cli, train
from train_loop.errors import UsageError
from train_loop.model import models
from train_loop.outputs.events import scalar_series
from train_loop.study import plans, report, study

# Every test that trains is marked slow; the bad inputs stop before TensorFlow starts.


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=dict(os.environ),
    )


def parse_table(markdown: str) -> dict[str, list[str]]:
    """Rows of a markdown table by their first cell, headings row included under its first heading."""
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows}


def parse_sections(markdown: str) -> dict[str, str]:
    """study.md's parts by their `## ` heading; the part before the first heading under ''."""
    sections, heading = {"": ""}, ""
    for line in markdown.splitlines(keepends=True):
        if line.startswith("## "):
            heading = line[3:].strip()
            sections[heading] = ""
        else:
            sections[heading] += line
    return sections


def first_kernel(run_dir: Path) -> np.ndarray:
    return keras.models.load_model(run_dir / "model.keras").get_layer("conv1").kernel.numpy()


def run_numbers(run_dir: Path) -> dict[str, float]:
    """A run's final numbers recomputed from its result.json and its saved model's first kernel."""
    result = json.loads((run_dir / "result.json").read_text())
    train, validation, test = result["train"], result["validation"], result["test"]
    kernel = np.abs(first_kernel(run_dir))
    return {
        "train CE": train["cross_entropy"],
        "regularization": train["regularization"],
        "total": train["total"],
        "train acc": train["accuracy"],
        "val CE": validation["cross_entropy"],
        "val acc": validation["accuracy"],
        "test CE": test["cross_entropy"],
        "test acc": test["accuracy"],
        "gap (test - train CE)": test["cross_entropy"] - train["cross_entropy"],
        "gap (val - train CE)": validation["cross_entropy"] - train["cross_entropy"],
        "mean abs w": kernel.mean(),
        "max abs w": kernel.max(),
        "abs w < 0.001": np.mean(kernel < 1e-3),
    }


def cell(column: str, values: list[float]) -> str:
    """mean ± sample standard deviation, in the column's format."""
    mean, std = np.mean(values), np.std(values, ddof=1)
    if column.startswith("abs w"):
        return f"{mean:.1%} ± {std:.1%}"
    return f"{mean:+.4f} ± {std:.4f}" if column.startswith("gap") else f"{mean:.4f} ± {std:.4f}"


def expected_cells(run_dir: Path) -> list[str]:
    """A row of compare's per-run table, recomputed."""
    numbers = run_numbers(run_dir)
    return [
        f"{value:+.4f}"
        if column.startswith("gap")
        else f"{value:.1%}"
        if column.startswith("abs w")
        else f"{value:.4f}"
        for column, value in numbers.items()
    ]


STUDY_FLAGS = (
    "--experiments=baseline,l1",
    "--seeds=0,1",
    "--sweep=l2=1e-4,1e-3",
    "--dataset=digits",
    "--steps_per_loop=50",
)
EXPERIMENTS = ("baseline", "l1", "baseline-l2=0.0001", "baseline-l2=0.001")
FIGURES = ("learning_curves.png", "first_layer_kernels.png", "near_zero_weights.png", "regularization_path.png")


@pytest.fixture(scope="module")
def seeded_study(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Two experiments and a two-value sweep of the first, at two seeds: eight runs on digits."""
    logdir = tmp_path_factory.mktemp("study")
    done = run_module("train_loop.study", *STUDY_FLAGS, f"--logdir={logdir}", "--study_name=mine")
    assert done.returncode == 0, done.stderr
    return logdir / "mine", done


@pytest.mark.slow
def test_every_cell_is_the_mean_and_spread_over_seeds(seeded_study):
    folder, done = seeded_study
    assert sorted(os.listdir(folder)) == sorted(
        [*(f"{name}-seed={seed}" for name in EXPERIMENTS for seed in (0, 1)), "study.md", *FIGURES]
    )
    markdown = (folder / "study.md").read_text()
    assert markdown in done.stdout
    rows = parse_table(parse_sections(markdown)[""])
    headings = rows.pop("experiment")
    assert list(rows) == list(EXPERIMENTS) and "test acc" not in headings  # The test split ranks nothing.
    for name in EXPERIMENTS:
        runs = [run_numbers(folder / f"{name}-seed={seed}") for seed in (0, 1)]
        assert rows[name] == ["2", *(cell(column, [run[column] for run in runs]) for column in headings[1:])], name
    settings = json.loads((folder / "baseline-l2=0.001-seed=1" / "settings.json").read_text())
    assert (settings["seed"], settings["l1"], settings["l2"]) == (1, 0.0, 0.001)
    # TensorBoard's runs: no stray `.` for the study's folder; the HParams experiment in the newest run alone.
    seen = plugin_event_multiplexer.EventMultiplexer().AddRunsFromDirectory(str(folder)).Reload().Runs()
    runs = [f"{name}-seed={seed}" for name in EXPERIMENTS for seed in (0, 1)]
    assert sorted(seen) == sorted(f"{run}{writer}" for run in runs for writer in ("", "/train", "/validation", "/test"))
    trained = [line.removesuffix(": training") for line in done.stdout.splitlines() if line.endswith(": training")]
    assert sorted(trained) == sorted(runs)
    assert [run for run in runs if "_hparams_/experiment" in seen[run]["tensors"]] == [trained[-1]]


@pytest.mark.slow
def test_paired_differences_from_the_reference_and_the_rule(seeded_study):
    folder, _ = seeded_study
    section = parse_sections((folder / "study.md").read_text())["Against the reference, baseline, seed by seed"]
    assert "2 standard errors" in section
    rows = parse_table(section)
    rows.pop("experiment")
    assert list(rows) == list(EXPERIMENTS[1:])
    for name in EXPERIMENTS[1:]:
        expected = []
        for column in ("val CE", "val acc"):
            differences = [
                run_numbers(folder / f"{name}-seed={seed}")[column]
                - run_numbers(folder / f"baseline-seed={seed}")[column]
                for seed in (0, 1)
            ]
            error = np.std(differences, ddof=1) / np.sqrt(2)
            expected += [
                f"{np.mean(differences):+.4f} ± {error:.4f}",
                "yes" if abs(np.mean(differences)) > 2 * error else "no",
            ]
        assert rows[name] == expected, name


@pytest.mark.slow
def test_the_best_is_chosen_by_validation_and_tested_once(seeded_study):
    folder, _ = seeded_study
    numbers = {name: [run_numbers(folder / f"{name}-seed={seed}") for seed in (0, 1)] for name in EXPERIMENTS}
    best = min(EXPERIMENTS, key=lambda name: np.mean([run["val CE"] for run in numbers[name]]))
    selection = parse_sections((folder / "study.md").read_text())["Selection"]
    assert f"**{best}** ({cell('val CE', [run['val CE'] for run in numbers[best]])}, n = 2)" in selection
    assert "test accuracy, the test split's only use" in selection
    assert f"**{cell('test acc', [run['test acc'] for run in numbers[best]])}**" in selection


@pytest.mark.slow
def test_the_regularization_path(seeded_study):
    folder, _ = seeded_study
    rows = parse_table(parse_sections((folder / "study.md").read_text())["Regularization path: l2 on top of baseline"])
    headings = rows.pop("l2")
    assert list(rows) == ["0", "0.0001", "0.001"]
    for strength, name in zip(rows, ("baseline", "baseline-l2=0.0001", "baseline-l2=0.001")):
        runs = [run_numbers(folder / f"{name}-seed={seed}") for seed in (0, 1)]
        assert rows[strength] == [
            name,
            "2",
            *(cell(column, [run[column] for run in runs]) for column in headings[2:]),
        ], name
    assert headings[2:] == ["val CE", "val acc", "gap (val - train CE)", "abs w < 0.001"]


@pytest.mark.slow
def test_the_figures_are_pngs_of_a_sane_size_linked_from_study_md(seeded_study):
    folder, _ = seeded_study
    figures = parse_sections((folder / "study.md").read_text())["Figures"]
    for name in FIGURES:
        assert f"]({name})" in figures
        png = (folder / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and png[12:16] == b"IHDR"
        width, height = struct.unpack(">II", png[16:24])
        assert 300 <= width <= 1600 and 200 <= height <= 1000, (name, width, height)
        assert 5_000 < len(png) < 200_000, name


@pytest.mark.slow
def test_sparsity_scalars_equal_numpy_on_the_checkpointed_kernel(seeded_study):
    """sparsity/conv1 at the last step is the share of |w| < 1e-3 in the kernel checkpointed there."""
    folder, _ = seeded_study
    run_dir = folder / "l1-seed=1"
    steps = json.loads((run_dir / "result.json").read_text())["steps"]
    model = models.build_model(Config(dataset="digits", l1=0.001, seed=1), (8, 8, 1))
    checkpoint = tf.train.Checkpoint(model=model, step=tf.Variable(0, dtype=tf.int64))
    checkpoint.restore(tf.train.latest_checkpoint(str(run_dir / "checkpoints"))).expect_partial()
    assert int(checkpoint.step) == steps
    kernel = model.get_layer("conv1").kernel.numpy()
    logged = scalar_series(str(run_dir), "train", "sparsity/conv1")
    assert logged[steps] == pytest.approx(np.mean(np.abs(kernel) < 1e-3), abs=1e-7)
    assert 0 < logged[steps]  # L1 has pushed some weights under 1e-3.


@pytest.mark.slow
def test_rerunning_reuses_every_run_and_changes_no_byte(seeded_study):
    folder, _ = seeded_study
    before = {str(path): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}
    again = run_module("train_loop.study", *STUDY_FLAGS, f"--logdir={folder.parent}", "--study_name=mine")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("reusing the finished run") == 8 and "training" not in again.stdout
    assert {str(path): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()} == before


# The study as a user without matplotlib runs it: `import matplotlib` fails (a None in sys.modules).
WITHOUT_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None; from train_loop.study import study; study.run()"


@pytest.mark.slow
def test_without_matplotlib_the_tables_are_written_and_one_line_says_so(seeded_study, tmp_path):
    folder, _ = seeded_study
    shutil.copytree(folder, tmp_path / "copy", ignore=shutil.ignore_patterns("*.png", "study.md"))
    blocked = subprocess.run(
        [sys.executable, "-c", WITHOUT_MATPLOTLIB, *STUDY_FLAGS, f"--logdir={tmp_path}", "--study_name=copy"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=dict(os.environ),
    )
    assert blocked.returncode == 0, blocked.stderr
    said = [line for line in blocked.stderr.splitlines() if "matplotlib" in line]
    assert len(said) == 1 and said[0].startswith("train_loop: warning: ") and "train_loop[study]" in said[0]
    markdown = (tmp_path / "copy" / "study.md").read_text()
    assert "## Figures" not in markdown
    tables = parse_sections((folder / "study.md").read_text())[""].replace("# Study mine", "# Study copy")
    assert parse_sections(markdown)[""] == tables
    assert not list((tmp_path / "copy").glob("*.png"))


@pytest.mark.slow
def test_jobs_train_in_processes_of_their_own_and_report_a_failure_in_one_line(tmp_path):
    """Two processes at once; the one whose folder is a file fails in its one line, which the
    study passes on with its run's name; the other run finishes and a rerun in one process reuses it."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "l1").write_text("in the way")
    args = (
        "--experiments=baseline,l1",
        "--dataset=digits",
        "--steps_per_loop=50",
        f"--logdir={tmp_path}",
        "--study_name=mine",
    )
    failed = run_module("train_loop.study", *args, "--jobs=2")
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # Each of the two processes gets its share of the cores.
    assert f"baseline: training in a process of its own, TF_NUM_INTRAOP_THREADS={threads}" in failed.stdout
    assert "baseline: finished" in failed.stdout
    assert failed.returncode == 2 and failed.stderr.splitlines() == [failed.stderr.strip()], failed.stderr
    assert failed.stderr.startswith("train_loop: error: l1: ") and "is a file, not a folder" in failed.stderr
    (tmp_path / "mine" / "l1").unlink()
    result = (tmp_path / "mine" / "baseline" / "result.json").read_bytes()
    again = run_module("train_loop.study", *args, "--jobs=2")
    assert again.returncode == 0, again.stderr
    assert "baseline: reusing the finished run" in again.stdout and "l1: finished" in again.stdout
    assert (tmp_path / "mine" / "baseline" / "result.json").read_bytes() == result
    rows = parse_table(parse_sections((tmp_path / "mine" / "study.md").read_text())[""])
    assert rows["l1"][:2] == ["1", f"{run_numbers(tmp_path / 'mine' / 'l1')['train CE']:.4f}"]


BAD_STUDY_FLAGS = {
    "seeds-empty": ("--seeds=", "--seeds is empty"),
    "seeds-repeated": ("--seeds=0,1,0", "repeats a seed"),
    "seeds-not-integers": ("--seeds=0,one", "not an integer"),
    "seeds-negative": ("--seeds=-1", "every seed must be in"),
    "seeds-and-seed": ("--seeds=0,1 --seed=3", "--seed and --seeds"),
    "sweep-no-values": ("--sweep=l2=", "lists no values"),
    "sweep-no-flag": ("--sweep=1e-4,1e-3", "has no '='"),
    "sweep-repeated": ("--sweep=l2=1e-4,0.0001", "repeats a value"),
    "sweep-not-a-strength": ("--sweep=batch_size=16,32", "'batch_size' cannot be swept"),
    "sweep-unknown-flag": ("--sweep=l3=0.1", "'l3' cannot be swept (not a training flag)"),
    "sweep-negative": ("--sweep=l1=1e-4,-1e-3", "-0.001 is not a strength"),
    "sweep-dropout-one": ("--sweep=dropout=0.5,1", "1 is not a strength; each must be in [0, 1)"),
    "sweep-not-numbers": ("--sweep=l2=small", "not a number"),
    "sweep-the-reference": ("--sweep=l2=0,1e-4", "l2=0 is the reference's own strength"),
    "experiments-repeated": ("--experiments=l1,l1", "names an experiment twice"),
    "jobs-zero": ("--jobs=0", "--jobs"),
    "no-validation-split": ("--validation_split=0", "--validation_split=0 holds nothing out"),
}


@pytest.mark.parametrize("flags, words", BAD_STUDY_FLAGS.values(), ids=BAD_STUDY_FLAGS.keys())
def test_bad_seeds_and_sweeps_are_one_line_and_train_nothing(tmp_path, flags, words):
    refused = run_module("train_loop.study", *flags.split(), "--dataset=digits", f"--logdir={tmp_path / 'logs'}")
    assert_one_line_error(refused, (words,))
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_study_passes_a_user_model_and_npz_on_to_every_experiment(tmp_path):
    """--model and --dataset given to the study reach each experiment; the folder is named after the npz."""
    made = subprocess.run([sys.executable, "examples/wine.py", str(tmp_path / "wine.npz")], cwd=REPO)
    assert made.returncode == 0
    finished = run_module(
        "train_loop.study",
        "--experiments=baseline,l2",
        "--model=examples/wine.py:build",
        f"--dataset={tmp_path / 'wine.npz'}",
        "--batch_size=16",
        f"--logdir={tmp_path / 'logs'}",
    )
    assert finished.returncode == 0, finished.stderr
    (folder,) = (tmp_path / "logs").glob("study-wine-*")
    rows = parse_table(parse_sections((folder / "study.md").read_text())[""])
    assert list(rows) == ["experiment", "baseline", "l2"] and rows["baseline"][0] == rows["l2"][0] == "1"
    assert float(rows["baseline"][2]) == 0.0 < float(rows["l2"][2])  # The regularization column, from one seed.
    for name in ("baseline", "l2"):
        settings = json.loads((folder / name / "settings.json").read_text())
        assert (settings["model"], settings["dataset"]) == ("examples/wine.py:build", str(tmp_path / "wine.npz"))
        assert len(json.loads((folder / name / "result.json").read_text())["confusion_matrix"]) == 3


@pytest.mark.slow
def test_study_refuses_a_changed_experiment_in_the_same_folder(tmp_path):
    made = train(
        Config(dataset="digits", logdir=str(tmp_path / "mine"), run_name="baseline", epochs=1, steps_per_loop=50)
    )
    assert made["steps"] == (1437 - 144) // 32  # digits less its validation split, at batch 32
    refused = run_module(
        "train_loop.study",
        "--experiments=baseline",
        "--dataset=digits",
        "--epochs=2",
        f"--logdir={tmp_path}",
        "--study_name=mine",
    )
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.splitlines() == [refused.stderr.strip()]
    assert "epochs (run has 1, flags say 2)" in refused.stderr and "--study_name" in refused.stderr


@pytest.mark.slow
def test_five_experiments_in_one_process_print_no_retracing_warning(tmp_path):
    """From the fifth experiment on, TensorFlow would call each run's own traced step a retracing."""
    (tmp_path / "flags").mkdir()
    for index in range(5):
        (tmp_path / "flags" / f"e{index}.cfg").write_text(f"--l2={index / 1000}\n")
    done = run_module(
        "train_loop.study",
        f"--flags_dir={tmp_path / 'flags'}",
        "--experiments=e0,e1,e2,e3,e4",
        "--dataset=digits",
        "--steps_per_loop=50",
        f"--logdir={tmp_path / 'logs'}",
    )
    assert done.returncode == 0, done.stderr
    assert "retracing" not in done.stderr


def test_default_study_folders_are_named_by_what_the_shared_flags_change():
    """The two studies of docs/regularization-study.md (1 epoch, then --epochs=10) get folders of their own."""
    one, ten = (
        study.default_study_name(flags)
        for flags in (["--dataset=fashion_mnist"], ["--dataset=fashion_mnist", "--epochs=10"])
    )
    today = datetime.date.today().isoformat()
    assert (one, ten) == (f"study-fashion_mnist-{today}", f"study-fashion_mnist-epochs=10-{today}")
    assert study.default_study_name(["--model=linear", "--l2=0.01"]) == f"study-mnist-linear-l2=0.01-{today}"


def test_study_reads_the_flagfiles_shipped_in_the_package_and_a_folder_of_ones_own(tmp_path):
    """The default flagfiles are the package's (the same files as the source's flags/); --flags_dir
    swaps in a folder of the user's, and an unknown experiment lists the ones it has."""
    shipped = cli.config_from_args(plans.experiment_flags(["l1l2"], ["--dataset=digits"])["l1l2"])
    assert (shipped.l1, shipped.l2) == parse_flagfile(Path(REPO, "flags", "l1l2.cfg"))
    (tmp_path / "mine.cfg").write_text("--l2=0.5\n")
    assert cli.config_from_args(plans.experiment_flags(["mine"], [], str(tmp_path))["mine"]).l2 == 0.5
    with pytest.raises(UsageError, match="known: mine"):
        plans.experiment_flags(["baseline"], [], str(tmp_path))


def parse_flagfile(path):
    """(l1, l2) as the flagfile's `--name=value` lines set them."""
    values = dict(line.removeprefix("--").split("=") for line in path.read_text().splitlines() if line.startswith("--"))
    return float(values.get("l1", 0)), float(values.get("l2", 0))


@pytest.mark.slow
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
    assert report.first_kernel(str(tmp_path / "b-l2"))[1].shape == (3, 3, 1, 32)


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_compare_refuses_a_folder_without_runs(tmp_path, folder):
    (tmp_path / "empty").mkdir()
    refused = run_module("train_loop.compare", str(tmp_path / folder))
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("train_loop: error: ") and len(refused.stderr.splitlines()) == 1
    assert str(tmp_path / folder) in refused.stderr


def test_flag_lines_become_a_config_and_leave_absls_flags_as_they_were(tmp_path):
    """The study turns each experiment's flag lines into a Config in its own process: the lines,
    flagfiles included, are parsed into copies of the training flags, never into absl's FLAGS."""
    flagfile = tmp_path / "experiment.cfg"
    flagfile.write_text("# an experiment\n--dataset=digits\n--l2=0.25\n")
    before = {name: (cli.FLAGS[name].value, cli.FLAGS[name].present) for name in ("dataset", "l2", "epochs")}
    config = cli.config_from_args([f"--flagfile={flagfile}", "--epochs=7"])
    assert (config.dataset, config.l2, config.epochs, config.l1) == ("digits", 0.25, 7, Config().l1)
    # The next experiment's lines start from the defaults again, not from the last one's.
    assert cli.config_from_args(["--epochs=2"]) == Config(epochs=2)
    assert {name: (cli.FLAGS[name].value, cli.FLAGS[name].present) for name in before} == before
    assert not cli.FLAGS.is_parsed()
