"""Beyond one process, and the faults real clusters produce: several workers, SIGTERM and SIGINT
(in training and in start-up), SIGKILL at a random step, peers that never come or die early,
a full disk, divergence. Every process is real and bounded in time. (Damaged run folders:
test_damaged_runs.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import user_models  # noqa: F401  (registers its layer, so that its model.keras loads)
from conftest import REPO
from helpers import events, sigkill_at_a_seeded_moment
from test_data import make_arrays, write_npz

from train_loop import Config, files, train
from train_loop import launch as launch_module
from train_loop.errors import DivergedError, NoSpace
from train_loop.model.measurements import CLASSIFIER
from train_loop.outputs import checkpoints, locks
from train_loop.training.controller import check_finite

pytestmark = pytest.mark.slow  # every test here trains a model

DIGITS_STEPS = (1437 - round(0.1 * 1437)) // 32  # digits' training examples less the validation split, batch 32.


def start(*args: str, module: str = "train_loop", env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def read_result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def assert_same_numbers(result: dict, expected: dict, rel: float) -> None:
    for split in ("train", "validation", "test"):
        for name, value in expected[split].items():
            assert result[split][name] == pytest.approx(value, rel=rel, abs=1e-7), (split, name)


@pytest.mark.parametrize(
    "model",
    [
        # The best model's weights and counters live in mirrored variables on every worker.
        dict(l2=0.001, best_metric="validation/accuracy", eval_every=15, global_clipnorm=0.5),
        # Kernel, bias and activity regularizers, an add_loss term and a nested sub-model.
        dict(model=os.path.join(REPO, "tests", "user_models.py") + ":build"),
    ],
    ids=["convnet", "user-model"],
)
def test_two_workers_match_one_process_and_only_the_chief_writes(tmp_path, model):
    """`launch --workers=2`: MultiWorkerMirroredStrategy over loopback; the workers agree on what
    `--jit_compile=auto` measured, and train the numbers of one device forced to that choice."""
    settings = dict(dataset="digits", epochs=2, steps_per_loop=10, **model)
    scratch = tmp_path / "scratch"  # The workers' TMPDIR: non-chief checkpoints go there, then away.
    scratch.mkdir()
    flags = [f"--{name}={value}" for name, value in settings.items()]
    launched = start(
        "--workers=2",
        "--",
        *flags,
        f"--logdir={tmp_path / 'two'}",
        "--run_name=run",
        module="train_loop.launch",
        env={"TMPDIR": str(scratch)},
    )
    status, stdout, stderr = finish(launched)
    assert status == 0, stdout[-3000:] + stderr[-3000:]
    assert "[worker 0] training" in stdout and "[worker 1] training" in stdout
    # Progress from the chief only: each epoch's header and line, the test line and the last one, once.
    lines = stdout.splitlines()
    for said in ("] Epoch 1/2", "] epoch 1/2: train ", "] Epoch 2/2", "] epoch 2/2: train ", "] test ", "] saved "):
        assert [line.startswith("[worker 0]") for line in lines if said in line] == [True], said
    two = read_result(tmp_path / "two" / "run")
    assert (two["strategy"], two["replicas"], two["steps"]) == ("multi_worker", 2, 2 * DIGITS_STEPS)
    choice = two["decided"]["jit_compile"]
    assert two["decided"]["by"] == "measured"
    said = {line.split("] ", 1)[1] for line in stdout.splitlines() if "] XLA " in line}
    assert len(said) == 1 and f"XLA {'on' if choice else 'off'}, measured" in said.pop()
    one = train(
        Config(**settings, jit_compile=choice, logdir=str(tmp_path / "one"), run_name="run", strategy="one_device")
    )
    assert_same_numbers(two, one, rel=1e-4)
    assert two["best_step"] == one["best_step"]
    assert os.listdir(tmp_path / "two") == ["run"]
    assert not [name for name in os.listdir(scratch) if name.startswith("train_loop-worker-")]
    weights = [
        keras.models.load_model(tmp_path / name / "run" / "model.keras").get_weights() for name in ("one", "two")
    ]
    # Without XLA, oneDNN sums a half batch's gradient in another order than a whole one's: after
    # 88 steps a few of the smallest weights (|w| ~ 1e-3) differ by up to 2e-6.
    for first, second in zip(*weights):
        np.testing.assert_allclose(second, first, rtol=1e-4, atol=1e-6 if choice else 1e-5)


def consecutive_free_ports(count: int) -> int:
    """The first of `count` consecutive ports free on 127.0.0.1 now, as `srun --resv-ports` reserves them."""
    for first in range(20_000, 60_000, count):
        probes = [socket.socket() for _ in range(count)]
        try:
            for offset, probe in enumerate(probes):
                probe.bind(("127.0.0.1", first + offset))
            return first
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError("no free ports")


def test_two_slurm_tasks_on_one_node_match_one_process(tmp_path):
    """`--cluster_resolver=slurm` in the environment srun gives two tasks on one node: the two
    find each other through SlurmClusterResolver and train the numbers of one device.

    With SGD: RMSprop divides by the root of its running mean square, which amplifies the last bit
    that the two workers' all-reduce rounds apart from one device's sum; on an AVX2-only EPYC that
    reached 3e-4 of the validation cross-entropy by step 80, with the scaling right."""
    settings = dict(
        dataset="digits", epochs=2, steps_per_loop=10, l2=0.001, jit_compile=False, optimizer="sgd", learning_rate=0.05
    )
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    port = consecutive_free_ports(2)
    slurm = {
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_STEP_TASKS_PER_NODE": "2",
        "SLURM_STEP_RESV_PORTS": f"{port}-{port + 1}",
        "TMPDIR": str(scratch),
    }
    flags = [f"--{name}={value}" for name, value in settings.items()]
    tasks = [
        start(
            "--strategy=multi_worker",
            "--cluster_resolver=slurm",
            *flags,
            f"--logdir={tmp_path / 'two'}",
            "--run_name=run",
            env={**slurm, "SLURM_PROCID": str(rank)},
        )
        for rank in range(2)
    ]
    for rank, task in enumerate(tasks):
        status, stdout, stderr = finish(task)
        assert status == 0, (rank, stdout[-3000:] + stderr[-3000:])
        assert "; MultiWorkerMirroredStrategy, 2 replicas in sync, here on CPU:0" in stdout.splitlines()[1]
    two = read_result(tmp_path / "two" / "run")
    assert (two["strategy"], two["replicas"], two["steps"]) == ("multi_worker", 2, 2 * DIGITS_STEPS)
    one = train(Config(**settings, logdir=str(tmp_path / "one"), run_name="run", strategy="one_device"))
    assert_same_numbers(two, one, rel=1e-4)
    assert os.listdir(tmp_path / "two") == ["run"]


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("--workers=0",), ("--workers",)),
        (("--workers=2", "--", "--l2=-1"), ("--l2=",)),
        (("--workers=2", "--", "--no_such_flag"), ("no_such_flag",)),
    ],
)
def test_launch_refuses_bad_input_in_one_line(tmp_path, args, names):
    status, stdout, stderr = finish(start(*args, f"--logdir={tmp_path}", module="train_loop.launch"), timeout=120)
    assert (status, stdout) == (2, "")
    assert len(stderr.splitlines()) == 1 and stderr.startswith("train_loop: error: "), stderr
    assert all(name in stderr for name in names), stderr
    assert os.listdir(tmp_path) == []


def wait_for_output(process: subprocess.Popen, text: str, timeout: float = 120) -> list[str]:
    """Reads stdout lines until one contains `text`; returns the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    pytest.fail(f"no {text!r} in the output:\n{''.join(lines)[-3000:]}")


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_and_exits_then_the_same_command_resumes(tmp_path, signum, status):
    flags = (
        "--dataset=digits",
        "--epochs=30",
        "--steps_per_loop=20",
        "--summary_every=20",
        f"--logdir={tmp_path}",
        "--run_name=r",
    )
    process = start(*flags)
    wait_for_output(process, "epoch 1/30: ")  # Training is under way: the first epoch has ended.
    signalled = time.monotonic()
    process.send_signal(signum)
    code, _, stderr = finish(process, timeout=60)
    assert time.monotonic() - signalled < 30
    assert code == status, stderr
    assert stderr.count("\n") == 1 and signal.Signals(signum).name in stderr, stderr
    step = int(stderr.split(" at step ")[1].split()[0])
    assert 0 < step < 30 * DIGITS_STEPS
    assert (tmp_path / "r" / "checkpoints" / f"ckpt-{step}.index").exists()
    assert not (tmp_path / "r" / "result.json").exists()
    if signum == signal.SIGINT:
        return  # Resuming is the same either way; once is enough.
    code, stdout, stderr = finish(start(*flags))
    assert code == 0, stderr
    assert f"from step {step}" in stdout.splitlines()[0]
    assert read_result(tmp_path / "r")["steps"] == 30 * DIGITS_STEPS


def test_a_signal_while_the_test_split_is_scored_stops_at_the_last_checkpoint_and_resume_finishes(tmp_path):
    """The end of the run scores the kept weights; on a large split that takes a while, and a
    SIGTERM then stops the run before anything is written, at the last step's checkpoint. The same
    command resumes into the end and finishes it."""
    rng = np.random.default_rng(0)
    arrays = make_arrays(n_train=320)
    arrays["x_test"] = rng.integers(0, 256, size=(200_000, 28, 28), dtype=np.uint8)  # Seconds to score.
    arrays["y_test"] = rng.integers(0, 10, size=200_000, dtype=np.uint8)
    npz = write_npz(tmp_path, arrays)
    flags = (f"--dataset={npz}", "--model=linear", "--epochs=2", f"--logdir={tmp_path}", "--run_name=r")
    total = 2 * 9  # 288 training examples (320 less the validation split) at batch 32: 9 steps an epoch.
    last = tmp_path / "r" / "checkpoints" / f"ckpt-{total}.index"
    process = start(*flags)
    deadline = time.monotonic() + 300
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    code, _, stderr = finish(process, timeout=120)
    assert code == 143, stderr
    assert stderr.splitlines() == [
        f"train_loop: stopped by SIGTERM at step {total} with a checkpoint; the same command resumes the run."
    ]
    assert not (tmp_path / "r" / "result.json").exists() and not (tmp_path / "r" / "model.keras").exists()
    code, stdout, stderr = finish(start(*flags))
    assert code == 0, stderr
    assert f"from step {total}" in stdout.splitlines()[0]
    assert read_result(tmp_path / "r")["steps"] == total


def logged_steps(run_dir: Path) -> dict[str, list[int]]:
    """Every tag's logged steps, across all event files of the train, validation and test writers."""
    steps = {}
    for writer in ("train", "validation", "test"):
        accumulator = events(str(run_dir), writer)
        for tag in accumulator.Tags()["tensors"]:
            steps[f"{writer}/{tag}"] = [event.step for event in accumulator.Tensors(tag)]
    return steps


# Every loop feature: clipping, decoupled decay, the weights' average (in the optimizer's
# checkpointed state), and a schedule that warms up and decays across the kill.
LOOP_FEATURES = (
    "--l2=0.001",
    "--global_clipnorm=0.5",
    "--weight_decay=0.01",
    "--ema=0.99",
    "--lr_schedule=cosine",
    "--lr_decay_steps=150",
    "--warmup_steps=10",
)


@pytest.mark.parametrize(
    "model_flags",
    [
        # Dropout, every loop feature, and the best model with early stopping (their counters
        # checkpointed too).
        (
            "--dropout=0.2",
            *LOOP_FEATURES,
            "--eval_every=15",
            "--best_metric=validation/accuracy",
            "--early_stopping_patience=4",
        ),
        # A user's model: kernel, bias and activity regularizers, add_loss, a nested sub-model.
        ("--model=tests/user_models.py:build", "--epochs=20"),  # Fast steps: more of them, for the kill to land.
        # Fine-tuning (frozen layers), and BatchNorm's moving statistics (tests/fine_tuning_models.py).
        ("--model=tests/fine_tuning_models.py:frozen", "--epochs=20"),
        ("--model=tests/fine_tuning_models.py:batch_norm", "--epochs=12"),
        # Gradient accumulation with dropout and every loop feature: the micro-batches live inside one update.
        ("--accumulation_steps=4", "--dropout=0.2", *LOOP_FEATURES),
    ],
    ids=["convnet-with-dropout-and-optimizer-features", "user-model", "frozen-layers", "batch-norm", "accumulation"],
)
def test_sigkill_at_a_random_step_then_resume_gives_the_uninterrupted_numbers(tmp_path, model_flags):
    """--deterministic: the resumed run's result, weights and curves are the same."""
    flags = (
        "--dataset=digits",
        "--epochs=4",
        "--deterministic",
        *model_flags,
        "--checkpoint_every=20",
        "--summary_every=10",
        "--steps_per_loop=5",
        f"--logdir={tmp_path}",
    )
    code, _, stderr = finish(start(*flags, "--run_name=whole"))
    assert code == 0, stderr

    delay = sigkill_at_a_seeded_moment(
        start(*flags, "--run_name=killed"),
        tmp_path / "killed",
        training_seconds=read_result(tmp_path / "whole")["seconds"]["training"],
        seed=repr(model_flags),
    )

    code, stdout, stderr = finish(start(*flags, "--run_name=killed"))
    assert code == 0, stderr
    assert stdout.startswith(f"resuming {tmp_path / 'killed'} from step ")
    whole, resumed = read_result(tmp_path / "whole"), read_result(tmp_path / "killed")
    for split in ("train", "validation", "test"):
        for name, value in whole[split].items():
            assert abs(resumed[split][name] - value) <= 1e-6, (split, name, delay)
    assert resumed["confusion_matrix"] == whole["confusion_matrix"]
    assert (resumed["best_step"], resumed["stopped_early"]) == (whole["best_step"], whole["stopped_early"])
    weights = [keras.models.load_model(tmp_path / name / "model.keras").get_weights() for name in ("whole", "killed")]
    for first, second in zip(*weights):
        assert np.max(np.abs(second - first)) <= 1e-6, delay
    steps, expected = logged_steps(tmp_path / "killed"), logged_steps(tmp_path / "whole")
    assert steps == expected, f"repeated or missing steps after a kill {delay:.2f} s in"
    epochs, expected = epoch_lines(tmp_path / "killed"), epoch_lines(tmp_path / "whole")
    assert [sorted(line) for line in epochs] == [sorted(line) for line in expected], (
        f"repeated or missing epochs in metrics.jsonl after a kill {delay:.2f} s in"
    )
    for line, uninterrupted in zip(epochs, expected):
        assert all(abs(line[key] - value) <= 1e-6 for key, value in uninterrupted.items()), (line, uninterrupted)


def epoch_lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl's lines, less what a kill changes: the time and the throughput."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        {key: value for key, value in line.items() if key not in ("wall_time", "examples_per_second")} for line in lines
    ]


def test_a_non_finite_gradient_is_divergence_too():
    finite = {"cross_entropy": 1.0, "regularization": 0.1, "gradient_norm": 2.0}
    check_finite(finite, step=10, num_steps=5, table=CLASSIFIER)
    with pytest.raises(DivergedError, match="gradient_norm became inf between steps 11 and 15"):
        check_finite({**finite, "gradient_norm": float("inf")}, step=10, num_steps=5, table=CLASSIFIER)


def worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """The launcher's worker processes by task index, read from /proc. Children without a
    TF_CONFIG (the start-up's stderr filter) are not workers; one that exited is skipped."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    pids = {}
    for pid in map(int, children):
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        environ = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
        if "TF_CONFIG" in environ:
            pids[json.loads(environ["TF_CONFIG"])["task"]["index"]] = pid
    return pids


def test_sigterm_to_one_worker_stops_all_at_one_checkpoint_and_the_run_resumes(tmp_path):
    args = (
        "--workers=2",
        "--",
        "--dataset=digits",
        "--epochs=8",
        "--steps_per_loop=20",
        "--summary_every=20",
        f"--logdir={tmp_path}",
        "--run_name=r",
    )
    launcher = start(*args, module="train_loop.launch")
    wait_for_output(launcher, "[worker 0] epoch 1/8: ")
    os.kill(worker_pids(launcher)[1], signal.SIGTERM)  # Not the chief: it must stop too, at the same step.
    signalled = time.monotonic()
    code, stdout, stderr = finish(launcher, timeout=120)
    assert code == 143 and time.monotonic() - signalled < 30, stdout[-3000:] + stderr[-3000:]
    saved = sorted(int(path.name[5:-6]) for path in (tmp_path / "r" / "checkpoints").glob("ckpt-*.index"))
    assert saved and not (tmp_path / "r" / "result.json").exists()
    code, stdout, stderr = finish(start(*args, module="train_loop.launch"))
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert f"[worker 0] resuming {tmp_path / 'r'} from step {saved[-1]}" in stdout
    assert f"[worker 1] resuming {tmp_path / 'r'} from step {saved[-1]}" in stdout
    assert read_result(tmp_path / "r")["steps"] == 8 * DIGITS_STEPS
    assert os.listdir(tmp_path) == ["r"]


def test_sigint_during_start_up_is_one_line_and_status_130(tmp_path):
    """Ctrl-C while Python and TensorFlow still import: no KeyboardInterrupt traceback."""
    process = start("--dataset=digits", f"--logdir={tmp_path}", "--run_name=r")
    time.sleep(1.0)  # Importing TensorFlow alone takes longer.
    process.send_signal(signal.SIGINT)
    code, stdout, stderr = finish(process, timeout=120)
    assert code == 130, stderr
    assert len(stderr.splitlines()) == 1 and "stopped by SIGINT" in stderr and "Traceback" not in stderr, stderr
    assert not (tmp_path / "r" / "result.json").exists()


def test_sigint_to_the_launcher_during_start_up_is_one_line_per_worker(tmp_path):
    launcher = start(
        "--workers=2", "--", "--dataset=digits", f"--logdir={tmp_path}", "--run_name=r", module="train_loop.launch"
    )
    deadline = time.monotonic() + 60
    while len(worker_pids(launcher)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGINT)
    code, stdout, stderr = finish(launcher, timeout=120)
    assert code == 130, stdout[-3000:] + stderr[-3000:]
    assert "Traceback" not in stdout + stderr
    for index in range(2):
        lines = [line for line in stdout.splitlines() if line.startswith(f"[worker {index}] ")]
        assert len(lines) == 1 and "stopped by SIGINT" in lines[0], stdout


def test_a_worker_dying_during_start_up_stops_the_launcher_without_its_grace_period(tmp_path):
    """Worker 0, waiting for its dead peer, stops at the launcher's SIGTERM instead of hanging
    until the 30 s grace period ends in SIGKILL."""
    launcher = start(
        "--workers=2", "--", "--dataset=digits", f"--logdir={tmp_path}", "--run_name=r", module="train_loop.launch"
    )
    deadline = time.monotonic() + 60
    while len(worker_pids(launcher)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(worker_pids(launcher)[1], signal.SIGKILL)
    killed = time.monotonic()
    code, stdout, stderr = finish(launcher, timeout=120)
    assert code == 128 + signal.SIGKILL, stdout[-3000:] + stderr[-3000:]
    assert time.monotonic() - killed < launch_module._STOP_SECONDS
    assert "Traceback" not in stdout + stderr


def test_a_leftover_tf_config_waits_for_its_peers_until_a_signal(tmp_path):
    """A single run under a TF_CONFIG naming an absent peer: SIGTERM ends the wait in one line."""
    own, peer = launch_module.free_ports(2)
    tf_config = {
        "cluster": {"worker": [f"127.0.0.1:{own}", f"127.0.0.1:{peer}"]},
        "task": {"type": "worker", "index": 0},
    }
    process = start("--dataset=digits", f"--logdir={tmp_path}", env={"TF_CONFIG": json.dumps(tf_config)})
    deadline = time.monotonic() + 120
    while not listening(own) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # Listening on its own port: it waits for the peer.
    process.send_signal(signal.SIGTERM)
    code, _, stderr = finish(process, timeout=60)
    assert code == 143, stderr
    assert stderr == "train_loop: stopped by SIGTERM while waiting for the other workers; nothing was written.\n"
    assert os.listdir(tmp_path) == []


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_a_killed_workers_temporary_folder_is_removed_at_the_next_start(tmp_path, monkeypatch):
    """Only this run's folders whose worker is gone (their lock free); a live worker's and another
    run's stay."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    run_dir = str(tmp_path / "logs" / "r")
    prefix = checkpoints.worker_folder_prefix(run_dir)
    for name in (f"{prefix}killed", f"{prefix}alive", f"{checkpoints.worker_folder_prefix(run_dir + '-2')}other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ckpt-20.index").write_bytes(b"data")
    alive = locks.acquire(str(tmp_path / f"{prefix}alive"))
    try:
        with checkpoints.save_directory(run_dir, chief=False) as folder:
            assert os.path.basename(folder).startswith(prefix)
            left = sorted(os.listdir(tmp_path))
    finally:
        alive.release()
    assert not os.path.exists(folder)
    assert f"{prefix}killed" not in left and f"{prefix}alive" in left
    assert len(left) == 3  # alive, other, and the new worker's own


def mounted(path: Path, size: str) -> bool:
    path.mkdir(exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: room for a digits run's settings and first events, not for a checkpoint.
    Mounting needs root (CAP_SYS_ADMIN), as in CI's container; elsewhere the test is skipped."""
    disk = tmp_path / "disk"
    if not mounted(disk, "64k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_while_checkpointing_is_one_line_and_the_run_resumes_once_space_is_freed(small_disk):
    flags = ("--dataset=digits", "--checkpoint_every=20", f"--logdir={small_disk}", "--run_name=r")
    code, _, stderr = finish(start(*flags))
    assert code == NoSpace.EXIT_STATUS, stderr
    assert stderr == (
        f"train_loop: error: no space left on {small_disk / 'r' / 'checkpoints'}; the run resumes once "
        "space is freed.\n"
    )
    assert os.listdir(small_disk / "r" / "checkpoints") == []  # The half-written ckpt-20_temp is gone.
    settings = json.loads((small_disk / "r" / "settings.json").read_text())
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    code, _, stderr = finish(start(*flags))
    assert code == 0, stderr
    assert read_result(small_disk / "r")["steps"] == DIGITS_STEPS
    assert json.loads((small_disk / "r" / "settings.json").read_text()) == settings


def fill(disk: Path) -> None:
    with open(disk / "filler", "wb", buffering=0) as stream, contextlib.suppress(OSError):
        while True:
            stream.write(bytes(4096))


def test_a_full_disk_while_writing_result_or_model_keeps_the_old_file_and_no_temporary(small_disk):
    files.write_json(str(small_disk / "result.json"), {"steps": 1})
    before = (small_disk / "result.json").read_bytes()
    fill(small_disk)
    with pytest.raises(NoSpace, match=f"no space left on {small_disk / 'result.json'};"):
        files.write_json(str(small_disk / "result.json"), {"steps": 2, "padding": "x" * 10_000})
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(500)])
    with pytest.raises(NoSpace, match=f"no space left on {small_disk / 'model.keras'};"):
        files.write_atomically(str(small_disk / "model.keras"), model.save)
    assert (small_disk / "result.json").read_bytes() == before
    assert sorted(os.listdir(small_disk)) == ["filler", "result.json"]


def test_ctrl_c_during_a_final_write_leaves_the_old_file_and_no_temporary(tmp_path):
    """What a SIGINT in the final save meets: `result.json` and `model.keras` go through
    `write_atomically`, which removes its temporary whatever stops the write."""
    path = tmp_path / "result.json"
    files.write_json(str(path), {"steps": 1})
    before = path.read_bytes()

    def interrupted(temporary: str) -> None:
        Path(temporary).write_bytes(b'{"steps": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.write_atomically(str(path), interrupted)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["result.json"]
