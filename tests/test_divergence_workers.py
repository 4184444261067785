"""--on_divergence on two workers (MultiWorkerMirroredStrategy over 127.0.0.1, one replica each):
every worker replays in lockstep from the run's checkpoint, and the report and a rollback's result
are those of two mirrored replicas in one process (tests/test_divergence.py's setup: digits and a
task term that is inf on one known example)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_divergence import FLAGS, MIRRORED, REPLICAS, ROLLBACK, expected_batch
from test_faults import assert_same_numbers, finish, read_result, start

from train_loop.launch import free_ports

WORKER_FLAGS = (*(flag for flag in FLAGS if flag not in MIRRORED), "--strategy=multi_worker")
NAMED = ("step", "term", "layer", "replica", "replicas", "examples")  # What the report names.


def two_workers(*flags: str) -> list[tuple[int, str, str]]:
    """Each worker's exit status, stdout and stderr, both started by hand with their TF_CONFIG (no
    launcher to stop the other: a worker that waits for its peer runs into the timeout)."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    workers = [
        start(*flags, env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})})
        for index in range(2)
    ]
    return [finish(worker, timeout=300) for worker in workers]


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory) -> Path:
    """Two mirrored replicas in one process, rolled back once an epoch: the reference run."""
    logdir = tmp_path_factory.mktemp("mirrored")
    status, _, stderr = finish(start(*FLAGS, *ROLLBACK, f"--logdir={logdir}", "--run_name=r"), timeout=300)
    assert status == 0, stderr[-3000:]
    return logdir / "r"


def first_report(run_dir: Path) -> dict:
    """The report of the run's first divergence, as its first rollback logged it in metrics.jsonl."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(line["divergence"] for line in lines if line.get("rollback") == 1)


def named(report: dict, *also: str) -> dict:
    """What a report names (and the fields `also`): what two workers and two replicas must agree on."""
    return {name: report[name] for name in (*NAMED, *also)}


def stopped(*flags: str) -> list[str]:
    """Two workers' stdouts, each asserted to have stopped at a divergence with its one line."""
    ended = two_workers(*flags)
    assert [status for status, _, _ in ended] == [3, 3], [stderr[-2000:] for _, _, stderr in ended]
    for _, _, stderr in ended:
        lines = stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("train_loop: error: training diverged at step"), stderr[-2000:]
    return [stdout for _, stdout, _ in ended]


@pytest.mark.slow
def test_stop_on_two_workers_reports_what_two_mirrored_replicas_report(mirrored, tmp_path):
    """Then the same command again: it resumes from the checkpoint before the divergence, which the
    other worker's own folder (fresh at each start) does not hold: it replays from the chief's."""
    flags = (*WORKER_FLAGS, "--checkpoint_every=5", f"--logdir={tmp_path}", "--run_name=r")
    stdouts = stopped(*flags)
    report = json.loads((tmp_path / "r" / "divergence.json").read_text())
    assert named(report) == named(first_report(mirrored))
    step, replica, examples = expected_batch(0)
    assert (report["step"], report["replica"], report["examples"]) == (step, replica, examples)
    assert report["replayed_from"] == (step - 1) // 5 * 5 and report["term"] == "loss/spike"
    for stdout in stdouts:  # Every worker replayed, and named the same.
        assert f"divergence at step {step} " in stdout and f"on replica {replica} of {REPLICAS}" in stdout
    # The chief alone wrote: one line of it.
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [line["divergence"] for line in lines if "divergence" in line] == [report]
    for stdout in stopped(*flags):
        assert f"resuming {tmp_path / 'r'} from step {report['replayed_from']}" in stdout, stdout
    again = json.loads((tmp_path / "r" / "divergence.json").read_text())
    assert named(again, "replayed_from") == named(report, "replayed_from")


@pytest.mark.slow
def test_rollback_on_two_workers_ends_where_two_mirrored_replicas_end(mirrored, tmp_path):
    """The same rollbacks, at the same steps, and the same numbers within 1e-5, as two workers train
    without a divergence (tests/test_faults.py): their collectives add in another order than one
    process's (measured: 4e-8 apart here)."""
    ended = two_workers(*WORKER_FLAGS, *ROLLBACK, f"--logdir={tmp_path}", "--run_name=r")
    assert [status for status, _, _ in ended] == [0, 0], [stderr[-2000:] for _, _, stderr in ended]
    result, expected = read_result(tmp_path / "r"), read_result(mirrored)
    assert (result["strategy"], result["replicas"]) == ("multi_worker", REPLICAS)
    assert len(result["rollbacks"]) == 2
    assert (result["steps"], result["rollbacks"]) == (expected["steps"], expected["rollbacks"])
    assert_same_numbers(result, expected, rel=1e-5)
    also = ("steps", "replayed_from")
    assert named(first_report(tmp_path / "r"), *also) == named(first_report(mirrored), *also)
