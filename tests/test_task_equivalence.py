"""The classifier's equivalences on the tasks of issue 20, the VAE (examples/vae.py, whose noise is
`ExampleNoise`'s) and a `--loss=huber` regression on diabetes: 1 device = 2 replicas, 2 workers
= 1 process, and SIGKILL + resume = uninterrupted; a task holding state of its own is refused;
a user's action that raises on one worker stops every worker; and train-loop-compare and the
study rank runs on their validation sums of the loss terms.

The VAE reads scikit-learn's digits, scaled to [0, 1] and enlarged to the example's 28x28: real
images at a fraction of Fashion-MNIST's cost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import user_tasks
from conftest import REPO
from helpers import assert_one_line_error, sigkill_at_a_seeded_moment
from sklearn.datasets import load_digits
from test_dropout_masks import logged
from test_faults import finish, read_result, start
from test_study import parse_sections, run_module
from test_tasks import diabetes

import train_loop
from train_loop.launch import free_ports
from train_loop.user_code import load_object

VAE = f"{REPO}/examples/vae.py:VAE"
load_object("task", VAE, role="a task file", kind="task")  # Registers its Sampling layer, for loading model.keras.


def digits_images(count: int) -> dict[str, np.ndarray]:
    """The first `count` digits as uint8 images of 28x28 (each pixel 3x3, on a border of 2), a
    fifth of them held out for the test."""
    digits = load_digits()
    images = np.round(digits.images[:count] * (255 / 16)).astype(np.uint8)
    images = np.pad(images.repeat(3, axis=1).repeat(3, axis=2), ((0, 0), (2, 2), (2, 2)))
    labels, train = digits.target[:count].astype(np.int64), count * 4 // 5
    return {"x_train": images[:train], "y_train": labels[:train], "x_test": images[train:], "y_test": labels[train:]}


CASES = {
    "vae": (dict(task=VAE, l2=1e-3), digits_images),
    "huber-regression": (dict(model="linear", loss="huber", metrics="mean_absolute_error", l2=1e-3), None),
}


def dataset(tmp_path: Path, arrays: dict[str, np.ndarray]) -> str:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return str(path)


def case_settings(tmp_path: Path, case: str, count: int) -> dict:
    """The case's settings, on an .npz of its data (`count` digits for the VAE)."""
    settings, images = CASES[case]
    return dict(settings, dataset=dataset(tmp_path, images(count) if images else diabetes()))


def as_flags(settings: dict) -> list[str]:
    return [f"--{name}={str(value).lower() if isinstance(value, bool) else value}" for name, value in settings.items()]


def assert_same_run(run: Path, reference: Path, *, rel: float, atol: float = 1e-7) -> None:
    """The same result, every logged number at the same steps, and the same weights."""
    result, expected = read_result(run), read_result(reference)
    for split in ("train", "validation", "test"):
        assert set(result[split]) == set(expected[split]), split
        for name, value in expected[split].items():
            assert result[split][name] == pytest.approx(value, rel=rel, abs=atol), (split, name)
    series, expected_series = logged(run), logged(reference)
    assert sorted(series) == sorted(expected_series) and len(expected_series) > 10
    for tag, values in expected_series.items():
        assert list(series[tag]) == list(values), tag
        np.testing.assert_allclose(list(series[tag].values()), list(values.values()), rtol=rel, atol=atol, err_msg=tag)
    weights = [keras.models.load_model(path / "model.keras").get_weights() for path in (run, reference)]
    for got, want in zip(*weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=rel, atol=atol)


# Few steps: 2 epochs of 9 (the VAE) or 11 (diabetes) updates of 32.
QUICK = dict(epochs=2, steps_per_loop=3, summary_every=4, jit_compile=False, optimizer="sgd", learning_rate=0.002)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_replicas_train_what_one_device_trains(tmp_path, case):
    settings = dict(case_settings(tmp_path, case, 400), logdir=str(tmp_path), **QUICK)
    train_loop.train(strategy="one_device", run_name="one", **settings)
    two = train_loop.train(strategy="mirrored", cpu_replicas=2, run_name="two", **settings)
    assert two["replicas"] == 2
    assert_same_run(tmp_path / "two", tmp_path / "one", rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_workers_train_what_one_process_trains(tmp_path, case):
    settings = dict(case_settings(tmp_path, case, 400), **QUICK)
    flags = [*as_flags(settings), f"--logdir={tmp_path}"]
    status, stdout, stderr = finish(start("--workers=2", "--", *flags, "--run_name=two", module="train_loop.launch"))
    assert status == 0, stdout[-3000:] + stderr[-3000:]
    assert (read_result(tmp_path / "two")["strategy"], read_result(tmp_path / "two")["replicas"]) == ("multi_worker", 2)
    train_loop.train(run_name="one", logdir=str(tmp_path), **settings)
    assert_same_run(tmp_path / "two", tmp_path / "one", rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_sigkill_then_resume_gives_the_uninterrupted_run(tmp_path, case):
    """--deterministic: within 1e-6, killed within the first half of the training time after the
    first checkpoint (a share seeded by the case, so that a failure can be run again)."""
    settings = dict(case_settings(tmp_path, case, 1797), epochs=4, checkpoint_every=20, summary_every=10)
    flags = [*as_flags(settings), "--deterministic", "--steps_per_loop=5", f"--logdir={tmp_path}"]
    status, _, stderr = finish(start(*flags, "--run_name=whole"))
    assert status == 0, stderr[-3000:]

    sigkill_at_a_seeded_moment(
        start(*flags, "--run_name=killed"),
        tmp_path / "killed",
        training_seconds=read_result(tmp_path / "whole")["seconds"]["training"],
        seed=case,
    )
    status, stdout, stderr = finish(start(*flags, "--run_name=killed"))
    assert status == 0, stderr[-3000:]
    assert stdout.startswith(f"resuming {tmp_path / 'killed'} from step ")
    assert_same_run(tmp_path / "killed", tmp_path / "whole", rel=1e-6)


@pytest.mark.slow  # Starts TensorFlow in a process of its own.
def test_a_task_holding_state_no_checkpoint_keeps_is_refused_in_one_line(run_cli, tmp_path):
    assert isinstance(user_tasks.SeededTask().seed, keras.random.SeedGenerator)
    result = run_cli("--dataset=digits", "--epochs=1", "--jit_compile=false", "--task=tests/user_tasks.py:SeededTask")
    assert_one_line_error(result, ("--task=tests/user_tasks.py:SeededTask", "attribute seed holds a SeedGenerator"))
    assert not (tmp_path / "logs").exists()


# A user's action that raises on one worker alone.


@pytest.mark.slow
def test_an_action_raising_on_one_worker_stops_every_worker_after_one_checkpoint(tmp_path):
    """Both workers stop at the failing step with the line naming the action (its error where it
    raised), within a bound. Before the agreement, worker 0 went on to its next loop call alone
    and died in its all-reduce once worker 1 had left (exit status 1, TensorFlow's traceback): a
    worker that leaves no sooner would have kept it waiting."""
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = [
        subprocess.Popen(
            [sys.executable, "tests/failing_worker.py", str(tmp_path)],
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={
                **os.environ,
                "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
            },
        )
        for index in range(2)
    ]
    try:
        ended = [finish(worker, timeout=240) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    said = {
        0: "action samples raised on another worker at step 10; the run is checkpointed there",
        1: "action samples raised OSError: disk of worker 1 unplugged at step 10; the run is checkpointed there",
    }
    for index, (status, stdout, stderr) in enumerate(ended):
        assert status == 2, (index, stdout[-2000:] + stderr[-3000:])
        assert stderr.splitlines()[-1].startswith(said[index]), (index, stderr[-3000:])
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "ckpt-10.index").exists() and not (checkpoints / "ckpt-15.index").exists()
    assert not (tmp_path / "run" / "result.json").exists()


# The comparison of finished runs and the study, with --loss and --task.


@pytest.mark.slow
def test_compare_ranks_a_vae_and_a_regression_on_their_validation_data_totals(tmp_path):
    """train-loop-compare, in a fresh process, loads the VAE's model (its Sampling layer registered
    by importing the task's file, as the model function's is) and gives each run's validation sum
    of its data terms in the "val CE" column."""
    runs = tmp_path / "runs"
    for case in CASES:
        (tmp_path / case).mkdir()
        settings = case_settings(tmp_path / case, case, 400)
        train_loop.train(logdir=str(runs), run_name=case, epochs=1, jit_compile=False, **settings)
    compared = subprocess.run(
        [sys.executable, "-m", "train_loop.compare", str(runs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert compared.returncode == 0 and compared.stderr == "", compared.stderr[-3000:]
    header, _, *rows = compared.stdout.splitlines()
    column = [cell.strip() for cell in header.split("|")].index("val CE")
    cells = {row.split("|")[1].strip(): row.split("|")[column].strip() for row in rows}
    assert set(cells) == set(CASES), compared.stdout
    vae, regression = (read_result(runs / case)["validation"] for case in ("vae", "huber-regression"))
    assert float(cells["vae"]) == pytest.approx(vae["reconstruction"] + vae["kl"], abs=1e-4)
    assert float(cells["vae"]) == pytest.approx(vae["data_total"], abs=1e-4)
    assert float(cells["huber-regression"]) == pytest.approx(regression["huber"], abs=1e-4)


@pytest.mark.slow
def test_a_study_of_a_regression_ranks_on_the_validation_sum_of_its_loss_terms(tmp_path):
    """--loss=huber: no accuracy anywhere in study.md; the best experiment has the lowest mean
    validation huber over its seeds, and is tested on the test huber."""
    finished = run_module(
        "train_loop.study",
        "--experiments=baseline,l2",
        "--seeds=0,1",
        "--extra_flags=--model=linear",
        "--loss=huber",
        f"--dataset={dataset(tmp_path, diabetes())}",
        "--epochs=1",
        "--jit_compile=false",
        f"--logdir={tmp_path / 'logs'}",
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    (folder,) = (tmp_path / "logs").glob("study-*")
    markdown = (folder / "study.md").read_text()
    sections = parse_sections(markdown)
    assert "accuracy" not in markdown.split("## Figures")[0]
    validation, test = (
        {
            name: np.mean([read_result(folder / f"{name}-seed={seed}")[split]["huber"] for seed in (0, 1)])
            for name in ("baseline", "l2")
        }
        for split in ("validation", "test")
    )
    best = min(validation, key=validation.get)
    assert sections["Selection"].startswith(
        f"\nBest by validation sum of the loss terms: **{best}** ({validation[best]:.4f} ± "
    ), sections["Selection"]
    assert (
        f"Its test sum of the loss terms, the test split's only use in this study (it ranks nothing): "
        f"**{test[best]:.4f} ± " in sections["Selection"]
    )
    assert "validation sum of the loss terms" in sections["Findings"]
    [headings] = [
        line for line in sections["Against the reference, baseline, seed by seed"].splitlines() if "Δ" in line
    ]
    assert headings == "| experiment | Δ val CE (mean ± s.e.) | beyond the spread |"
