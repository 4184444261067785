"""--on_divergence (issue 22): the report names the step, term, layer, replica and examples that
diverged; rollback goes back to the last checkpoint and on, deterministically, across a SIGKILL.

The runs train digits with a task whose term is inf on one known example (`user_tasks.InfOnExample`),
on two CPU replicas: where that example lands follows from the seed, the epoch and the step, which
`expected_batch` recomputes from the data's contract."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_one_line_error, events
from user_tasks import INF_EXAMPLE

from train_loop import Config
from train_loop.data import sources
from train_loop.errors import UsageError

BATCH, REPLICAS = 32, 2
MIRRORED = ("--strategy=mirrored", f"--cpu_replicas={REPLICAS}")
FLAGS = (
    "--dataset=digits",
    "--task=tests/user_tasks.py:InfOnExample",
    *MIRRORED,
    f"--batch_size={BATCH}",
    "--steps_per_loop=5",
    "--nojit_compile",
    "--deterministic",
)
ROLLBACK = ("--epochs=2", "--on_divergence=rollback", "--divergence_skip", "--divergence_lr_factor=0.5")


def expected_batch(epoch: int) -> tuple[int, int, list[int]]:
    """The step whose batch holds x_train[INF_EXAMPLE] in `epoch` (from 0), the replica that gets
    it and the batch's examples, as indices into x_train as given: the seeded hold-out of 10%
    (seed 0), then each epoch's stateless shuffle keyed by (seed, epoch), in whole batches."""
    count = len(sources.load_splits(Config(dataset="digits")).x_train)
    held = np.zeros(count, bool)
    held[np.random.default_rng(0).permutation(count)[: round(0.1 * count)]] = True
    kept = np.flatnonzero(~held)
    steps_per_epoch = len(kept) // BATCH
    order = kept[tf.random.experimental.stateless_shuffle(tf.range(len(kept)), seed=[0, epoch]).numpy()]
    position = int(np.flatnonzero(order == INF_EXAMPLE)[0])
    assert position < steps_per_epoch * BATCH, "the example falls in the epoch's dropped remainder"
    row = position // BATCH
    replica = position % BATCH // (BATCH // REPLICAS)
    return epoch * steps_per_epoch + row + 1, replica, order[row * BATCH : (row + 1) * BATCH].tolist()


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"on_divergence": "retry"}, ("--on_divergence", "retry")),
        ({"on_divergence": "rollback", "divergence_lr_factor": 0.0}, ("--divergence_lr_factor=0.0", "positive")),
        ({"on_divergence": "rollback", "divergence_lr_factor": float("inf")}, ("--divergence_lr_factor=inf",)),
        ({"on_divergence": "rollback", "max_rollbacks": -1}, ("--max_rollbacks=-1", "0 or more")),
        ({"divergence_skip": True}, ("--divergence_skip=True", "--on_divergence=rollback")),
        ({"max_rollbacks": 5}, ("--max_rollbacks=5", "--on_divergence=rollback")),
    ],
)
def test_bad_divergence_settings_are_refused(settings, named):
    with pytest.raises(UsageError) as refused:
        Config(dataset="digits", **settings)
    for name in named:
        assert name in str(refused.value)


def test_a_bad_divergence_flag_is_one_line_and_writes_nothing(run_cli, tmp_path):
    refused = run_cli("--dataset=digits", "--divergence_lr_factor=0.5")
    assert_one_line_error(refused, ("--divergence_lr_factor=0.5", "--on_divergence=rollback"))
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_stop_reports_the_step_term_layer_replica_and_examples(run_cli, tmp_path):
    step, replica, examples = expected_batch(0)
    finished = run_cli(*FLAGS, "--run_name=r", "--checkpoint_every=5")
    assert finished.returncode == 3, finished.stderr
    assert finished.stderr.count("\n") == 1, finished.stderr
    # The replay's step and term, not the loop call's (whose summed data term is nan), and the fixes.
    assert finished.stderr.startswith(
        f"train_loop: error: training diverged at step {step}: loss/spike became inf on replica {replica} of "
        f"{REPLICAS}; nothing past step {(step - 1) // 5 * 5} was saved; lower --learning_rate, or pass "
        "--on_divergence=rollback"
    ), finished.stderr
    run_dir = tmp_path / "logs" / "r"
    report = json.loads((run_dir / "divergence.json").read_text())
    assert report["step"] == step and report["replayed_from"] == (step - 1) // 5 * 5
    assert report["term"] == "loss/spike" and report["value"] == "inf"
    assert report["layer"] == "hidden"  # The first layer of the model: every gradient below the term is inf.
    assert (report["replica"], report["replicas"]) == (replica, REPLICAS)
    assert report["examples"] == examples
    # The other replica's terms are finite: the one example is on one replica only.
    assert report["replica_terms"][1 - replica]["spike"] == 0.0
    assert f"divergence at step {step} " in finished.stdout and "loss/spike became inf" in finished.stdout
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["divergence"] == report
    assert not (run_dir / "result.json").exists()


def finished_run(run_cli, tmp_path, name: str) -> dict:
    finished = run_cli(*FLAGS, *ROLLBACK, f"--run_name={name}")
    assert finished.returncode == 0, finished.stderr
    return json.loads((tmp_path / "logs" / name / "result.json").read_text())


def outcome(result: dict) -> dict:
    """What a run computed: what a second run or a resumed one must give again."""
    return {key: result[key] for key in ("steps", "train", "validation", "test", "rollbacks")}


@pytest.mark.slow
def test_rollback_skips_the_diverged_steps_lowers_the_rate_and_logs_each(run_cli, tmp_path):
    first, _, _ = expected_batch(0)
    second, _, _ = expected_batch(1)
    result = finished_run(run_cli, tmp_path, "a")
    steps_per_epoch = result["steps"] // 2
    assert result["rollbacks"] == [
        {"diverged_at": first, "back_to": 0},  # Saved at the start: a rollback always has a checkpoint.
        {"diverged_at": second, "back_to": steps_per_epoch},
    ]
    assert result["train"]["spike"] == 0.0  # The skipped steps are not in the epoch's means.
    run_dir = tmp_path / "logs" / "a"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["rollback"]) for line in lines if "rollback" in line] == [(first, 1), (second, 2)]
    assert [line["learning_rate"] for line in lines if "epoch" in line] == pytest.approx([0.0005, 0.00025])
    logged = events(str(run_dir), "train").Tensors("divergence/rollbacks")
    assert [(event.step, float(tf.make_ndarray(event.tensor_proto))) for event in logged] == [
        (first, 1.0),
        (second, 2.0),
    ]
    # Logged once each: the steps after a rollback's checkpoint were cut from the events and logged again.
    totals = [event.step for event in events(str(run_dir), "train").Tensors("loss/total")]
    assert totals == sorted(set(totals))
    assert outcome(finished_run(run_cli, tmp_path, "b")) == outcome(result)


@pytest.mark.slow
def test_past_max_rollbacks_the_run_stops(run_cli, tmp_path):
    step, _, _ = expected_batch(0)
    finished = run_cli(*FLAGS, "--on_divergence=rollback", "--max_rollbacks=1", "--run_name=r")
    assert finished.returncode == 3, finished.stderr
    assert finished.stdout.count(f"divergence at step {step} ") == 2
    assert "rollback 1 of at most 1" in finished.stdout
    assert finished.stderr.count("\n") == 1 and f"training diverged at step {step}: " in finished.stderr
    assert "the rollbacks --max_rollbacks=1 allows are used up: lower --learning_rate, or raise" in finished.stderr


@pytest.mark.slow
def test_a_sigkill_after_a_rollback_resumes_exactly(run_cli, tmp_path):
    command = [sys.executable, "-m", "train_loop", f"--logdir={tmp_path / 'logs'}", *FLAGS, *ROLLBACK, "--run_name=k"]
    run_dir = tmp_path / "logs" / "k"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and '"rollback": 1' in metrics.read_text():
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    # Killed after the first rollback and before the checkpoint after it (the end of the first epoch).
    assert sorted(path.name for path in (run_dir / "checkpoints").glob("*.index")) == ["ckpt-0.index"]
    resumed = run_cli(*FLAGS, *ROLLBACK, "--run_name=k")
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads((run_dir / "result.json").read_text())
    assert outcome(result) == outcome(finished_run(run_cli, tmp_path, "uninterrupted"))
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [line["rollback"] for line in lines if "rollback" in line] == [1, 2]


@pytest.mark.slow
def test_a_stream_is_replayed_from_its_restored_position_and_rolled_back(run_cli, tmp_path):
    streamed = ("--input=tests/stream_inputs.py:digits", *FLAGS[1:], *ROLLBACK, "--checkpoint_every=5", "--run_name=s")
    finished = run_cli(*streamed)
    assert finished.returncode == 0, finished.stderr
    run_dir = tmp_path / "logs" / "s"
    rollbacks = json.loads((run_dir / "result.json").read_text())["rollbacks"]
    # Once an epoch, where the stream's shuffle put the example, and back to the checkpoint before it.
    assert len(rollbacks) == 2 and all(0 < r["diverged_at"] - r["back_to"] <= 5 for r in rollbacks), rollbacks
    report = json.loads((run_dir / "divergence.json").read_text())
    assert report["step"] == rollbacks[1]["diverged_at"] and report["term"] == "loss/spike"
    assert report["examples"] is None and "streamed examples (they have no index" in finished.stdout
