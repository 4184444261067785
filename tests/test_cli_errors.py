"""The command line's bad inputs: exit status 2, one line on stderr, and nothing written.

Every case runs `python -m train_loop` as a real subprocess (conftest's `run_cli`) that stops
before training. Most fail while the flags are parsed or checked, before TensorFlow is imported
(a fraction of a second each); those that need data, a model file or a strategy import
TensorFlow and load the bundled `digits` set (seconds each): `STARTS_TENSORFLOW` marks them
`slow`, so that `-m 'not slow'` stays quick.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, snapshot

from train_loop import files
from train_loop.configs import Config
from train_loop.launch import free_ports
from train_loop.outputs import runs

DIGITS_TRAIN_EXAMPLES = 1437  # the bundled digits' fixed 80% training split
FINISHED_RUN = "convnet-dataset=digits"  # the default run name of `--dataset=digits`
UNFINISHED_RUN = "resume-me"


# The cases refused after TensorFlow is started (data, model files, the cluster, the run folder).
STARTS_TENSORFLOW = {
    "batch_size-above-digits-train-split",
    "data_dir-is-a-file",
    "data_dir-missing",
    "logdir-not-writable",
    "logdir-under-a-file",
    "model-file-does-not-import",
    "model-file-missing",
    "model-for-other-classes",
    "model-for-other-inputs",
    "model-function-missing",
    "model-function-raises",
    "model-function-returns-a-layer",
    "model-module-missing",
    "model-not-a-function",
    "model-regularized-and-regularizer-flags",
    "npz-empty-test-split",
    "npz-missing",
    "npz-non-finite-inputs",
    "npz-one-hot-labels",
    "npz-string-labels",
    "peer-timeout-not-a-number",
    "run_name-too-long",
    "slurm-outside-a-job-step",
    "tf_config-address-without-port",
    "tf_config-no-workers",
    "tf_config-not-json",
    "tf_config-peers-never-come",
    "tf_config-task-index-out-of-range",
    "tpu-that-does-not-answer",
    "unfinished-run-with-other-settings",
    "validation_split-holding-out-nothing",
    "validation_split-leaving-no-batch",
    "warmup-longer-than-the-run",
}


def case(
    case_id: str, *flags: str, names: tuple[str, ...], existing: str = "", env: dict[str, str] | None = None
) -> pytest.param:
    """One bad input: its flags ('{tmp}' is the test's folder), the words its error must contain,
    the run folder ('finished' or 'unfinished') that exists in the logdir beforehand, if any, and
    the environment variables set."""
    marks = [pytest.mark.slow] if case_id in STARTS_TENSORFLOW else []
    return pytest.param(flags, names, existing, env or {}, id=case_id, marks=marks)


def tf_config(cluster: object, task: object = None) -> dict[str, str]:
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": task or {"type": "worker", "index": 0}})}


PORTS = free_ports(2)  # This worker's and its peer's, which nobody answers.

BAD_INPUTS = [
    # Regularization factors must be finite and >= 0.
    case("l1-negative", "--l1=-0.1", names=("--l1=",)),
    case("l1-nan", "--l1=nan", names=("--l1=nan",)),
    case("l2-negative", "--l2=-1e-3", names=("--l2=",)),
    case("l2-inf", "--l2=inf", names=("--l2=inf",)),
    case("bias_l1-inf", "--bias_l1=inf", names=("--bias_l1=inf",)),
    case("bias_l1-negative", "--bias_l1=-1", names=("--bias_l1=",)),
    case("bias_l2-nan", "--bias_l2=nan", names=("--bias_l2=nan",)),
    case("bias_l2-negative-inf", "--bias_l2=-inf", names=("--bias_l2=",)),
    # Dropout is a fraction in [0, 1).
    case("dropout-negative", "--dropout=-0.1", names=("--dropout=-0.1",)),
    case("dropout-one", "--dropout=1.0", names=("--dropout=1",)),
    # Choices.
    case("unknown-dataset", "--dataset=cifar10", names=("--dataset=cifar10",)),
    case("unknown-model", "--model=resnet50", names=("--model=resnet50",)),
    case("unknown-optimizer", "--optimizer=adagrad", names=("--optimizer=adagrad",)),
    case("unknown-strategy", "--strategy=parameter_server", names=("--strategy=parameter_server",)),
    # Counts and rates.
    case("batch_size-zero", "--batch_size=0", names=("--batch_size=0",)),
    case("batch_size-negative", "--batch_size=-5", names=("--batch_size=-5",)),
    case("batch_size-not-an-integer", "--batch_size=abc", names=("--batch_size=abc",)),
    case("epochs-zero", "--epochs=0", names=("--epochs=0",)),
    case("learning_rate-zero", "--learning_rate=0", names=("--learning_rate=0",)),
    case("learning_rate-negative", "--learning_rate=-1", names=("--learning_rate=-1",)),
    case("learning_rate-nan", "--learning_rate=nan", names=("--learning_rate=nan",)),
    case("steps_per_loop-zero", "--steps_per_loop=0", names=("--steps_per_loop=0",)),
    case("summary_every-zero", "--summary_every=0", names=("--summary_every=0",)),
    case("cpu_replicas-one", "--cpu_replicas=1", names=("--cpu_replicas=1",)),
    case("run_name-with-slash", "--run_name=a/b", names=("--run_name=", "a/b")),
    case("run_name-too-long", "--dataset=digits", f"--run_name={'n' * 256}", names=("256 bytes", "--run_name")),
    case("seed-negative", "--seed=-1", names=("--seed=-1",)),
    case("seed-beyond-int32", "--seed=2147483648", names=("--seed=2147483648",)),
    case("profile_steps-one-number", "--profile_steps=5", names=("--profile_steps='5'",)),
    case("profile_steps-reversed", "--profile_steps=10,5", names=("--profile_steps='10,5'",)),
    case("profile_steps-not-numbers", "--profile_steps=a,b", names=("--profile_steps='a,b'",)),
    # The optimizer's schedule, clipping, decay and average.
    case("lr_schedule-unknown", "--lr_schedule=linear", names=("--lr_schedule",)),
    case(
        "warmup-longer-than-the-run",
        "--dataset=digits",
        "--lr_schedule=cosine",
        "--warmup_steps=1000",
        names=("--warmup_steps=1000", "40 steps", "cosine"),
    ),
    case(
        "lr_decay_steps-negative-with-step",
        "--lr_schedule=step",
        "--lr_decay_steps=-10",
        names=("--lr_decay_steps=-10",),
    ),
    case("lr_decay_steps-with-constant", "--lr_decay_steps=100", names=("--lr_decay_steps=100", "constant")),
    case(
        "lr_decay_rate-zero",
        "--lr_schedule=step",
        "--lr_decay_steps=10",
        "--lr_decay_rate=0",
        names=("--lr_decay_rate=0",),
    ),
    case("lr_decay_rate-above-one", "--lr_decay_rate=2", names=("--lr_decay_rate=2",)),
    case(
        "lr_decay_rate-with-cosine",
        "--lr_schedule=cosine",
        "--lr_decay_steps=10",
        "--lr_decay_rate=0.5",
        names=("--lr_decay_rate=0.5", "cosine"),
    ),
    case("warmup_steps-negative", "--warmup_steps=-1", names=("--warmup_steps=-1",)),
    case("global_clipnorm-negative", "--global_clipnorm=-1", names=("--global_clipnorm=-1",)),
    case("weight_decay-nan", "--weight_decay=nan", names=("--weight_decay=nan",)),
    case("ema-one", "--ema=1", names=("--ema=1",)),
    # The validation split and its evaluations.
    case("validation_split-one", "--validation_split=1", names=("--validation_split=1",)),
    case("validation_split-negative", "--validation_split=-0.1", names=("--validation_split=-0.1",)),
    case(
        "eval_every-without-validation-split",
        "--validation_split=0",
        "--eval_every=10",
        names=("--eval_every=10", "--validation_split=0"),
    ),
    case("eval_every-negative", "--eval_every=-1", names=("--eval_every=-1",)),
    # The best model, early stopping, export.
    case("best_metric-unknown", "--best_metric=train/accuracy", names=("--best_metric='train/accuracy'",)),
    case(
        "best_metric-without-validation-split",
        "--best_metric=validation/accuracy",
        "--validation_split=0",
        names=("--best_metric=validation/accuracy", "--validation_split=0"),
    ),
    case(
        "patience-without-best-metric",
        "--early_stopping_patience=3",
        names=("--early_stopping_patience=3", "--best_metric"),
    ),
    case(
        "patience-negative",
        "--best_metric=validation/accuracy",
        "--early_stopping_patience=-1",
        names=("--early_stopping_patience=-1",),
    ),
    case(
        "min_delta-negative",
        "--best_metric=validation/accuracy",
        "--early_stopping_min_delta=-0.1",
        names=("--early_stopping_min_delta=-0.1",),
    ),
    case(
        "min_delta-without-best-metric",
        "--early_stopping_min_delta=0.01",
        names=("--early_stopping_min_delta=0.01", "--best_metric"),
    ),
    case("export-unknown", "--export=onnx", names=("--export",)),
    # The command line itself.
    case("unknown-flag", "--no_such_flag=1", names=("no_such_flag",)),
    case("misspelled-flag", "--epoch=2", names=("'epoch'",)),
    case("positional-argument", "--dataset=digits", "train", names=("'train'",)),
    case(
        "slurm-without-multi_worker",
        "--cluster_resolver=slurm",
        names=("--cluster_resolver=slurm", "--strategy=multi_worker"),
    ),
    case(
        "slurm-outside-a-job-step",
        "--dataset=digits",
        "--strategy=multi_worker",
        "--cluster_resolver=slurm",
        names=("--cluster_resolver=slurm", "SLURM_PROCID", "srun"),
    ),
    case("flagfile-missing", "--flagfile={tmp}/no_such.cfg", names=("--flagfile", "no_such.cfg", "No such file")),
    # Bad inputs beside a run that already finished: it must stay as it is.
    case("l2-negative-beside-finished-run", "--dataset=digits", "--l2=-1", names=("--l2=",), existing="finished"),
    # Where the run would be written.
    case("logdir-under-a-file", "--dataset=digits", "--logdir={tmp}/mnist.npz/logs", names=("--logdir=",)),
    case("logdir-not-writable", "--dataset=digits", "--logdir=/proc/logs", names=("--logdir='/proc/logs'",)),
    # These import TensorFlow and read data (about ten seconds each).
    case("data_dir-missing", "--data_dir={tmp}/no-such-folder", names=("--data_dir=", "{tmp}/no-such-folder")),
    case("data_dir-is-a-file", "--data_dir={tmp}/mnist.npz", names=("--data_dir=", "{tmp}/mnist.npz")),
    case(
        "validation_split-holding-out-nothing",
        "--dataset=digits",
        "--validation_split=0.0001",
        names=("--validation_split=0.0001", "holds out none"),
    ),
    case(
        "validation_split-leaving-no-batch",
        "--dataset=digits",
        "--validation_split=0.99",
        names=("--batch_size=32", "left after --validation_split"),
    ),
    case(
        "batch_size-above-digits-train-split",
        "--dataset=digits",
        f"--batch_size={DIGITS_TRAIN_EXAMPLES + 1}",
        names=(f"--batch_size={DIGITS_TRAIN_EXAMPLES + 1}",),
    ),
    # A malformed TF_CONFIG is refused before any worker waits for its peers.
    case("tf_config-not-json", "--dataset=digits", names=("TF_CONFIG", "JSON"), env={"TF_CONFIG": "{cluster"}),
    case("tf_config-no-workers", "--dataset=digits", names=("TF_CONFIG", "worker"), env=tf_config({})),
    case(
        "tf_config-address-without-port",
        "--dataset=digits",
        names=("TF_CONFIG", "host:port"),
        env=tf_config({"worker": ["127.0.0.1:2222", "127.0.0.1"]}),
    ),
    case(
        "tf_config-task-index-out-of-range",
        "--dataset=digits",
        names=("TF_CONFIG", "task"),
        env=tf_config({"worker": ["127.0.0.1:2222"]}, {"type": "worker", "index": 3}),
    ),
    # A leftover TF_CONFIG whose peers never come: the wait ends (TRAIN_LOOP_PEER_TIMEOUT).
    case(
        "tf_config-peers-never-come",
        "--dataset=digits",
        names=("TF_CONFIG", f"127.0.0.1:{PORTS[1]}"),
        env={**tf_config({"worker": [f"127.0.0.1:{port}" for port in PORTS]}), "TRAIN_LOOP_PEER_TIMEOUT": "1"},
    ),
    case(
        "peer-timeout-not-a-number",
        "--dataset=digits",
        names=("TRAIN_LOOP_PEER_TIMEOUT='soon'",),
        env={**tf_config({"worker": [f"127.0.0.1:{port}" for port in PORTS]}), "TRAIN_LOOP_PEER_TIMEOUT": "soon"},
    ),
    case(
        "tpu-that-does-not-answer",
        "--dataset=digits",
        "--strategy=tpu",
        "--tpu=grpc://127.0.0.1:1",
        names=("--tpu=grpc://127.0.0.1:1",),
    ),
    # A user's model function (tests/bad_models.py) or data (npz files that clean_environment writes).
    case("model-without-function", "--model=tests/bad_models.py:", names=("--model=tests/bad_models.py: is not",)),
    case(
        "model-function-with-dropout",
        "--model=tests/user_models.py:build",
        "--dropout=0.2",
        names=("--dropout=0.2", "built-in models only"),
    ),
    case(
        "model-file-missing",
        "--dataset=digits",
        "--model={tmp}/no_such.py:build",
        names=("--model={tmp}/no_such.py:build", "no file"),
    ),
    case(
        "model-file-does-not-import",
        "--dataset=digits",
        "--model={tmp}/broken.py:build",
        names=("{tmp}/broken.py", "SyntaxError"),
    ),
    case(
        "model-module-missing",
        "--dataset=digits",
        "--model=no_such_package.models:build",
        names=("no_such_package", "ModuleNotFoundError"),
    ),
    case(
        "model-function-missing",
        "--dataset=digits",
        "--model=tests/bad_models.py:build",
        names=("tests/bad_models.py", "no function build"),
    ),
    case(
        "model-not-a-function",
        "--dataset=digits",
        "--model=tests/bad_models.py:NOT_A_FUNCTION",
        names=("no function NOT_A_FUNCTION",),
    ),
    case(
        "model-function-raises",
        "--dataset=digits",
        "--model=tests/bad_models.py:raises",
        names=("bad_models.py:raises", "RuntimeError: this model needs a GPU"),
    ),
    case(
        "model-function-returns-a-layer",
        "--dataset=digits",
        "--model=tests/bad_models.py:returns_a_layer",
        names=("returned Dense", "keras.Model"),
    ),
    case(
        "model-for-other-classes",
        "--dataset=digits",
        "--model=tests/bad_models.py:five_classes",
        names=("five_classes", "(2, 5)", "(2, 10)"),
    ),
    case(
        "model-for-other-inputs",
        "--dataset=digits",
        "--model=tests/bad_models.py:wants_vectors",
        names=("wants_vectors", "(N, 8, 8, 1)"),
    ),
    case(
        "model-regularized-and-regularizer-flags",
        "--dataset=digits",
        "--model=tests/bad_models.py:regularized",
        "--l2=0.001",
        names=("regularized", "already carry regularizers", "dense/kernel", "--l2"),
    ),
    case("npz-missing", "--dataset={tmp}/no_such.npz", names=("--dataset={tmp}/no_such.npz", "no such file")),
    case(
        "npz-empty-test-split",
        "--dataset={tmp}/empty_test.npz",
        "--model=linear",
        names=("x_test in {tmp}/empty_test.npz", "no examples"),
    ),
    case(
        "npz-non-finite-inputs",
        "--dataset={tmp}/nan.npz",
        "--model=linear",
        names=("x_train in {tmp}/nan.npz", "1 non-finite values (nan)"),
    ),
    case(
        "npz-string-labels",
        "--dataset={tmp}/strings.npz",
        "--model=linear",
        names=("y_train in {tmp}/strings.npz", "np.unique"),
    ),
    case(
        "npz-one-hot-labels",
        "--dataset={tmp}/one_hot.npz",
        "--model=linear",
        names=("y_train in {tmp}/one_hot.npz", "argmax"),
    ),
    case(
        "unfinished-run-with-other-settings",
        "--dataset=digits",
        f"--run_name={UNFINISHED_RUN}",
        "--l2=0.01",
        names=(f"{{tmp}}/logs/{UNFINISHED_RUN}", "l2"),
        existing="unfinished",
    ),
]


@pytest.fixture(autouse=True)
def clean_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No TF_CONFIG (it would change the strategy), an empty KERAS_HOME, a file for --data_dir,
    a model file that does not import, and a user's npz broken in each way the table names."""
    monkeypatch.delenv("TF_CONFIG", raising=False)
    (tmp_path / "keras_home").mkdir()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    (tmp_path / "mnist.npz").write_bytes(b"not a folder")
    (tmp_path / "broken.py").write_text("def build(:\n")
    inputs, labels = np.linspace(0, 1, 40 * 13, dtype=np.float32).reshape(40, 13), np.arange(40) % 3
    arrays = {"x_train": inputs, "y_train": labels, "x_test": inputs[:8], "y_test": labels[:8]}
    for name, changed in (
        ("empty_test", {"x_test": inputs[:0], "y_test": labels[:0]}),
        ("nan", {"x_train": np.where(inputs == inputs[7, 3], np.nan, inputs)}),
        ("strings", {"y_train": np.array(["red", "white", "rose"])[labels]}),
        ("one_hot", {"y_train": np.eye(3)[labels]}),
    ):
        np.savez(tmp_path / f"{name}.npz", **{**arrays, **changed})


def make_run(logdir: Path, name: str, *, finished: bool) -> None:
    """A run folder as training leaves it: settings, a binary checkpoint, and result.json if done."""
    run_dir = str(logdir / name)
    runs.create(run_dir, Config(dataset="digits"))
    Path(run_dir, "ckpt-1.data-00000-of-00001").write_bytes(bytes(range(256)) * 4)
    Path(run_dir, "train").mkdir()
    Path(run_dir, "train", "events.out.tfevents.1.host").write_bytes(b"\x00\x01event\xff")
    if finished:
        files.write_json(os.path.join(run_dir, runs.RESULT_FILE), {"dataset": "digits", "steps": 44})


def test_the_cases_marked_slow_exist() -> None:
    assert STARTS_TENSORFLOW <= {case.id for case in BAD_INPUTS}


@pytest.mark.parametrize(("flags", "names", "existing", "env"), BAD_INPUTS)
def test_bad_input_is_one_line_and_writes_nothing(
    run_cli, tmp_path: Path, flags: tuple[str, ...], names: tuple[str, ...], existing: str, env: dict[str, str]
) -> None:
    """Each bad input exits 2 with one error line naming its flag or file; the logdir is untouched."""
    logdir = tmp_path / "logs"
    if existing:
        make_run(logdir, FINISHED_RUN if existing == "finished" else UNFINISHED_RUN, finished=existing == "finished")
    before = snapshot(logdir) if existing else None

    result = run_cli(*(flag.format(tmp=tmp_path) for flag in flags), timeout=180, env=env)

    assert_one_line_error(result, tuple(name.format(tmp=tmp_path) for name in names))
    if existing:
        assert snapshot(logdir) == before
    else:
        assert not logdir.exists()


@pytest.mark.slow  # It starts TensorFlow.
def test_finished_run_is_unchanged_byte_for_byte(run_cli, tmp_path: Path) -> None:
    """A bad input that gets past the run folder's choice (a finished run means `-2`) writes nothing.

    --strategy=multi_worker without TF_CONFIG fails after the data is read and the run folder is
    chosen, the last check before anything is written: neither the finished run nor its `-2`
    successor may be touched or made.
    """
    logdir = tmp_path / "logs"
    make_run(logdir, FINISHED_RUN, finished=True)
    before = snapshot(logdir)

    result = run_cli("--dataset=digits", "--strategy=multi_worker", timeout=180)

    assert_one_line_error(result, ("--strategy=multi_worker", "TF_CONFIG"))
    assert snapshot(logdir) == before
    assert sorted(os.listdir(logdir)) == [FINISHED_RUN]
