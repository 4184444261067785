"""`--check_equivalence`: the first update on the run's strategy against one device on the same batch;
a term off by the number of replicas or micro-batches is named with its factor, and the run stops."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO
from test_faults import finish, start

import train_loop
from train_loop import Config
from train_loop.checks import equivalence
from train_loop.checks.differences import Verdict
from train_loop.launch import free_ports
from train_loop.model import tasks
from train_loop.model.state import build_state
from train_loop.model.user_models import load_model_function
from train_loop.training import distribute
from train_loop.training.run_data import RunData

USER_MODELS = os.path.join(REPO, "tests", "user_models.py")
USER_TASKS = os.path.join(REPO, "tests", "user_tasks.py")
TWO_REPLICAS = dict(strategy="mirrored", cpu_replicas=2)


def check(*, model: str = "", task: str = "", jit_compile: bool = False, **settings) -> Verdict:
    """The check of a digits run as `train` wires it (no training), which must leave every
    variable of the model and the optimizer as it was."""
    config = Config(
        dataset="digits",
        model=f"{USER_MODELS}:{model}" if model else "convnet",
        task=f"{USER_TASKS}:{task}" if task else "",
        jit_compile=jit_compile,
        **settings,
    )
    run_task = tasks.task_for(config.loss, config.metrics, config.task)
    data = RunData.read(config, targets=run_task.targets)
    strategy = distribute.make_strategy(config)
    model_fn = load_model_function(config.model) if model else None
    state = build_state(
        config, strategy, data.input_shape, model_fn=model_fn, task=run_task, sample=data.sample_batch()
    )
    variables = [*state.model.variables, *state.optimizer.variables, *(state.loss_scale or tf.Module()).variables]
    before = [variable.numpy() for variable in variables]
    next_batch, iterator = data.first_update_input(config, strategy, state)
    verdict = equivalence.check(
        config, strategy, state, next_batch=next_batch, iterator=iterator, jit_compile=jit_compile
    )
    for variable, value in zip(variables, before, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=f"{variable.name} changed")
    return verdict


def without_numbers(line: str) -> str:
    """The line with its two values, which depend on the initial weights, left out."""
    return re.sub(r"\(\S+ against \S+\)", "(... against ...)", line)


def test_a_correct_user_model_passes_on_two_replicas_and_changes_nothing():
    """Kernel, bias and activity regularizers, a mean add_loss and a nested sub-model: each term,
    each layer's regularization and each layer's gradients equal one device's."""
    verdict = check(model="build", **TWO_REPLICAS)
    assert verdict.failure == ""
    names = [item.name for item in verdict.differences]
    assert names[:6] == [
        "cross_entropy",
        "regularization/encoder/hidden",
        "regularization/encoder/penalty",
        "regularization/logits",
        "regularization",
        "total",
    ]
    assert {name.rpartition("/")[0] for name in names[6:]} == {"gradient/encoder/hidden", "gradient/logits"}
    assert max(item.relative for item in verdict.differences) < 1e-6
    assert all(item.one_device > 0 for item in verdict.differences)
    assert verdict.to_dict()["passed"] and verdict.to_dict()["replicas"] == 2


@pytest.mark.parametrize(
    "settings",
    [
        dict(accumulation_steps=2),
        dict(accumulation_steps=2, **TWO_REPLICAS),
        # XLA draws other dropout masks than TensorFlow's kernels: one device's must be compiled too.
        pytest.param(dict(accumulation_steps=2, jit_compile=True, **TWO_REPLICAS), marks=pytest.mark.slow),
    ],
    ids=["one-device", "two-replicas", "two-replicas-xla"],
)
def test_accumulation_with_a_correct_model_passes(settings):
    """The built-in convnet with L2 and dropout (whose masks are keyed by each example's place in
    the whole batch) as 2 micro-batches."""
    verdict = check(l2=0.001, dropout=0.2, **settings)
    assert verdict.failure == ""
    assert max(item.relative for item in verdict.differences) < 1e-5


FIX_MEAN = "what a layer adds (add_loss, an activity regularizer) must be a mean over its batch, not a sum."
FIX_TERM = "return each term per example and unscaled: the step divides its sum by the global batch itself."
FIX_SCALED = "leave what a layer adds unscaled: the step divides it by the replicas and micro-batches itself."


@pytest.mark.parametrize(
    ("setup", "line"),
    [
        (
            dict(model="build_summed_penalty", **TWO_REPLICAS),
            "the regularization of layer summed is 1/2 of one device's on the same batch (... against ...), "
            f"the factor of the 2 replicas: the classic scaling bug; {FIX_MEAN}",
        ),
        (
            dict(model="build_summed_penalty", accumulation_steps=2),
            "the regularization of layer summed is 1/2 of one device's on the same batch (... against ...), "
            f"the factor of the 2 micro-batches (--accumulation_steps): the classic scaling bug; {FIX_MEAN}",
        ),
        (
            dict(model="build_summed_penalty", accumulation_steps=2, **TWO_REPLICAS),
            "the regularization of layer summed is 1/4 of one device's on the same batch (... against ...), "
            f"the factor of the 2 replicas times 2 micro-batches: the classic scaling bug; {FIX_MEAN}",
        ),
        (
            dict(task="ReplicaScaledTerm", **TWO_REPLICAS),
            "loss term data is 2 times one device's on the same batch (... against ...), the factor of the 2 "
            f"replicas: the classic scaling bug; {FIX_TERM}",
        ),
        (
            dict(task="ReplicaDividedTerm", **TWO_REPLICAS),
            "loss term logit_penalty is 1/2 of one device's on the same batch (... against ...), the factor of "
            f"the 2 replicas: the classic scaling bug; {FIX_TERM}",
        ),
        (
            dict(model="build_replica_scaled_l2", **TWO_REPLICAS),
            "the regularization of layer hidden is 2 times one device's on the same batch (... against ...), the "
            f"factor of the 2 replicas: the classic scaling bug; {FIX_SCALED}",
        ),
    ],
    ids=["summed-add_loss", "summed-add_loss-accumulated", "summed-add_loss-both", "term-x-N", "term-over-N", "l2-x-N"],
)
def test_a_scaling_bug_fails_naming_the_term_and_the_factor(setup, line):
    verdict = check(**setup)
    assert without_numbers(verdict.failure) == f"--check_equivalence: {line}"
    assert not verdict.to_dict()["passed"]


def test_a_regularizer_added_twice_is_twice_on_one_device_too():
    """A layer that adds its kernel's L2 itself on top of its kernel_regularizer counts it twice on
    one device as on two replicas: the check passes (it compares the two), and shows the layer's
    term, twice its regularizer's (`--check_regularizers` names it: test_check_regularizers)."""
    verdict = check(model="build_own_l2_twice", **TWO_REPLICAS)
    assert verdict.failure == ""
    [hidden] = [item for item in verdict.differences if item.name == "regularization/hidden"]
    assert hidden.run == pytest.approx(hidden.one_device, rel=1e-6)


def test_a_failed_check_exits_70_in_one_line_and_leaves_only_its_verdict(run_cli, tmp_path):
    """No step is taken: the run folder holds settings.json with the verdict under "decided", and
    no result.json (a finished run) or checkpoint; the same command would take the folder and start it."""
    result = run_cli(
        f"--model={USER_MODELS}:build_summed_penalty",
        "--dataset=digits",
        "--strategy=mirrored",
        "--cpu_replicas=2",
        "--jit_compile=false",
        "--check_equivalence",
        "--run_name=bad",
        timeout=300,
    )
    assert result.returncode == 70, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("train_loop:")]
    assert without_numbers(line) == (
        "train_loop: error: --check_equivalence: the regularization of layer summed is 1/2 of one device's on the "
        f"same batch (... against ...), the factor of the 2 replicas: the classic scaling bug; {FIX_MEAN}"
    )
    assert "Traceback" not in result.stderr
    assert "  regularization/summed " in result.stdout and "check_equivalence: FAILED" in result.stdout
    run_dir = tmp_path / "logs" / "bad"
    assert os.listdir(run_dir) == ["settings.json"]
    verdict = json.loads((run_dir / "settings.json").read_text())["decided"]["check_equivalence"]
    assert (verdict["passed"], verdict["replicas"], verdict["worst"]["name"]) == (False, 2, "regularization/summed")
    assert verdict["failure"] == line.removeprefix("train_loop: error: ")


@pytest.mark.slow
def test_a_passing_check_trains_the_run_it_would_have_trained(tmp_path):
    """Its verdict in settings.json, and the same run as without the check: it updated nothing."""
    common = dict(dataset="digits", logdir=str(tmp_path), jit_compile=False, epochs=1, dropout=0.2, l2=0.001)
    checked = train_loop.train(run_name="checked", check_equivalence=True, **TWO_REPLICAS, **common)
    plain = train_loop.train(run_name="plain", **TWO_REPLICAS, **common)
    verdict = json.loads((tmp_path / "checked" / "settings.json").read_text())["decided"]["check_equivalence"]
    assert verdict["passed"] and verdict["seconds"] > 0
    assert checked["decided"]["check_equivalence"] == verdict  # result.json's too.
    assert checked["steps"] == plain["steps"] > 0
    for split in ("train", "validation", "test"):
        assert checked[split] == plain[split], split


@pytest.mark.slow
def test_a_stream_passes_both_checks_on_two_replicas(run_cli, tmp_path):
    """Streamed input (an input function): the equivalence check takes the stream's first batch, on
    an iterator of its own, and the run then trains from the stream's start."""
    result = run_cli(
        "--input=tests/stream_inputs.py:digits",
        "--strategy=mirrored",
        "--cpu_replicas=2",
        "--jit_compile=false",
        "--l2=0.001",
        "--epochs=1",
        "--check_equivalence",
        "--check_regularizers",
        "--run_name=s",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "check_equivalence: passed" in result.stdout and "check_regularizers: passed" in result.stdout
    decided = json.loads((tmp_path / "logs" / "s" / "result.json").read_text())["decided"]
    assert decided["check_equivalence"]["passed"] and decided["check_equivalence"]["replicas"] == 2
    assert decided["check_regularizers"]["passed"]


@pytest.mark.slow
def test_two_workers_pass_with_a_correct_model(tmp_path):
    """`launch`: the reference is one device's on the batch gathered from both workers."""
    launched = start(
        "--workers=2",
        "--",
        f"--model={USER_MODELS}:build",
        "--dataset=digits",
        "--epochs=1",
        "--jit_compile=false",
        "--check_equivalence",
        f"--logdir={tmp_path}",
        "--run_name=two",
        module="train_loop.launch",
    )
    status, stdout, stderr = finish(launched, timeout=600)
    assert status == 0, stdout[-3000:] + stderr[-3000:]
    verdict = json.loads((tmp_path / "two" / "settings.json").read_text())["decided"]["check_equivalence"]
    assert (verdict["passed"], verdict["replicas"]) == (True, 2)
    assert stdout.count("check_equivalence: passed") == 2  # Each worker's.


@pytest.mark.slow
def test_two_workers_both_fail_with_the_same_line(tmp_path):
    """Each worker started by hand with its TF_CONFIG: both end with status 70 and the one line, none waits."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    flags = (
        f"--model={USER_MODELS}:build_summed_penalty",
        "--dataset=digits",
        "--jit_compile=false",
        "--check_equivalence",
        f"--logdir={tmp_path}",
        "--run_name=bad",
    )
    workers = [
        start(*flags, env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})})
        for index in range(2)
    ]
    ended = [finish(worker, timeout=300) for worker in workers]
    lines = [[line for line in stderr.splitlines() if line.startswith("train_loop:")] for _, _, stderr in ended]
    assert [status for status, _, _ in ended] == [70, 70], [stderr[-2000:] for _, _, stderr in ended]
    assert lines[0] == lines[1] and len(lines[0]) == 1
    assert "1/2 of one device's" in lines[0][0] and "the factor of the 2 replicas" in lines[0][0]
    assert os.listdir(tmp_path / "bad") == ["settings.json"]  # The chief's alone.


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_passes_within_its_tolerance(precision):
    verdict = check(l2=0.001, precision=precision, **TWO_REPLICAS)
    assert verdict.failure == ""
    print(precision, max(item.relative for item in verdict.differences))  # The tolerance's evidence (-s).


def test_a_first_update_that_overflows_float16_is_compared_where_the_run_applies_it():
    """tests/user_models.py:build_overflowing: at the loss scale's start (2**15) the first float16
    gradients overflow, which the run's step skips, halving the scale; the check compares at the
    first scale where they are finite (it failed with NaN against NaN), and puts the scale back."""
    verdict = check(model="build_overflowing", precision="mixed_float16", **TWO_REPLICAS)
    assert verdict.failure == ""
    run, compared = verdict.loss_scales
    assert run == 2.0**15 and compared in [2.0**power for power in range(1, 15)]
    assert verdict.to_dict()["loss_scale"] == compared
    assert (
        f"mixed_float16 at loss scale {compared:g} (the gradients overflow at the run's 32768 and down to "
        in (verdict.lines()[0])
    )
    assert all(np.isfinite(item.run) and item.relative < 1e-2 for item in verdict.differences)
