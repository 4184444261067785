"""--check_regularizers: the table of which regularizer covers each weight, and the proof under the
run's strategy, precision and accumulation; --l2_exclude and --weight_decay_exclude."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import check_models
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_one_line_error, snapshot
from test_faults import finish, start

from train_loop.checks.regularizers import check_regularizers
from train_loop.configs import Config
from train_loop.data import inputs, sources
from train_loop.errors import CheckFailed, UsageError
from train_loop.launch import free_ports
from train_loop.model import losses, models, optimizers, tasks
from train_loop.model.state import build_state
from train_loop.outputs import runs
from train_loop.training import distribute

EMBEDDING = "tests/check_models.py:embedding"
DETACHED = "tests/check_models.py:detached"
QUICK = ("--dataset=digits", "--batch_size=64", "--jit_compile=false", "--export=none", "--validation_split=0")


def result(tmp_path, run_name: str) -> dict:
    return json.loads((tmp_path / "logs" / run_name / "result.json").read_text())


def digits_state(strategy: tf.distribute.Strategy, **settings) -> tuple:
    """A digits run's config, train state (a `notebook:NAME` model is check_models' NAME) and sample."""
    config = Config(dataset="digits", **settings)
    splits = sources.load_splits(config)
    model_fn = getattr(check_models, config.model.partition(":")[2]) if config.model.startswith("notebook:") else None
    task = tasks.task_for(config.loss, config.metrics, config.task)
    sample = inputs.sample_batch(splits, size=4)
    state = build_state(config, strategy, splits.x_train.shape[1:], model_fn=model_fn, task=task, sample=sample)
    return config, state, sample


@pytest.mark.slow
def test_an_embedding_table_and_a_norm_scale_missed_by_l2_are_flagged_not_failed(run_cli, tmp_path):
    finished = run_cli(f"--model={EMBEDDING}", "--l2=0.001", "--check_regularizers", "--run_name=r", *QUICK)
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("check_regularizers: 5 trainable"))) :]
    assert "  warning: --l2 misses an Embedding table" in "\n".join(table)
    assert "  warning: --l2 misses a normalization layer's gamma" in "\n".join(table)
    verdict = result(tmp_path, "r")["decided"]["check_regularizers"]
    flagged = {row["weight"] for row in verdict["weights"] if row["flag"]}
    assert verdict["passed"] and flagged == {"embed/embeddings", "norm/gamma"}
    assert {row["weight"]: row["regularizer"] for row in verdict["weights"]}["dense/kernel"] == "L2(0.001)"


@pytest.mark.slow
def test_a_weight_exempt_on_purpose_is_not_flagged(run_cli, tmp_path):
    finished = run_cli(
        f"--model={EMBEDDING}", "--l2=0.001", "--l2_exclude=embed|norm", "--check_regularizers", "--run_name=r", *QUICK
    )
    assert finished.returncode == 0, finished.stderr
    assert "warning" not in finished.stdout
    settings = json.loads((tmp_path / "logs" / "r" / "settings.json").read_text())
    assert settings["l2_exclude"] == "embed|norm" and settings["decided"]["check_regularizers"]["passed"]


@pytest.mark.slow
def test_a_float16_loss_scaled_mirrored_run_with_accumulation_passes_and_trains_as_without_the_check(run_cli, tmp_path):
    flags = (
        "--l2=0.001",
        "--bias_l1=0.0001",
        "--precision=mixed_float16",
        "--strategy=mirrored",
        "--accumulation_steps=2",
        "--optimizer=adam",
        "--weight_decay=0.01",
        "--weight_decay_exclude=bias",
        "--epochs=1",
        *QUICK,
    )
    checked = run_cli(*flags, "--check_regularizers", "--run_name=checked")
    assert checked.returncode == 0, checked.stderr
    assert "check_regularizers: passed in" in checked.stdout
    plain = run_cli(*flags, "--run_name=plain")
    assert plain.returncode == 0, plain.stderr
    # The check put every variable back: the run trained exactly as without it.
    assert result(tmp_path, "checked")["train"] == result(tmp_path, "plain")["train"]
    rows = result(tmp_path, "checked")["decided"]["check_regularizers"]["weights"]
    assert {row["weight"]: row["decay"] for row in rows} == {
        "conv1/kernel": True,
        "conv1/bias": False,
        "conv2/kernel": True,
        "conv2/bias": False,
        "dense/kernel": True,
        "dense/bias": False,
    }


DETACHED_LINE = re.compile(
    r"check_regularizers: layer detached: a loss term of value [0-9.e+-]+ \(a regularizer or add_loss\) has no "
    r"gradient with respect to any trainable weight, so it regularizes nothing: compute it from the weight itself, "
    r"not tf\.stop_gradient\(w\) or a copy of its value\."
)


@pytest.mark.slow
def test_a_detached_regularizer_fails_in_one_line_and_leaves_only_its_verdict(run_cli, tmp_path):
    """As a failed --check_equivalence: no step is taken, and the run folder holds settings.json
    alone, with the verdict under "decided"; the same command would take the folder and start it."""
    finished = run_cli(f"--model={DETACHED}", "--check_regularizers", "--run_name=r", *QUICK)
    assert finished.returncode == CheckFailed.EXIT_STATUS, finished.stderr
    [line] = finished.stderr.splitlines()
    assert DETACHED_LINE.fullmatch(line.removeprefix("train_loop: error: ")), line
    assert "check_regularizers: FAILED (" in finished.stdout
    run_dir = tmp_path / "logs" / "r"
    assert os.listdir(run_dir) == ["settings.json"]
    verdict = json.loads((run_dir / "settings.json").read_text())["decided"]["check_regularizers"]
    assert (verdict["passed"], verdict["failure"]) == (False, line.removeprefix("train_loop: error: "))
    assert [row["weight"] for row in verdict["weights"]] == ["detached/kernel"]


@pytest.mark.slow
def test_a_failed_check_on_a_resumed_run_records_its_verdict_and_leaves_every_other_file(run_cli, tmp_path):
    """A run stopped after its last checkpoint (its result.json removed: not finished), resumed with
    the check: settings.json gets the failed verdict, what else it held stays, no other file changes."""
    trained = run_cli(f"--model={DETACHED}", "--epochs=1", "--run_name=r", *QUICK)
    assert trained.returncode == 0, trained.stderr
    run_dir = tmp_path / "logs" / "r"
    (run_dir / "result.json").unlink()
    settings = json.loads((run_dir / "settings.json").read_text())
    before = snapshot(run_dir, folder_times=False)
    finished = run_cli(f"--model={DETACHED}", "--epochs=1", "--check_regularizers", "--run_name=r", *QUICK)
    assert finished.returncode == CheckFailed.EXIT_STATUS, finished.stderr
    after = snapshot(run_dir, folder_times=False)
    assert {path: entry for path, entry in after.items() if path != "settings.json"} == {
        path: entry for path, entry in before.items() if path != "settings.json"
    }
    recorded = json.loads((run_dir / "settings.json").read_text())
    verdict = recorded["decided"].pop("check_regularizers")
    assert recorded == settings and not verdict["passed"] and DETACHED_LINE.fullmatch(verdict["failure"])


def two_workers(tmp_path, *flags: str) -> list[tuple[int, str, str]]:
    """Two workers on 127.0.0.1, each started by hand with its TF_CONFIG: their status and output."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    workers = [
        start(
            *flags,
            "--check_regularizers",
            f"--logdir={tmp_path}",
            "--run_name=r",
            *QUICK,
            env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})},
        )
        for index in range(2)
    ]
    return [finish(worker, timeout=300) for worker in workers]


@pytest.mark.slow
def test_two_workers_pass_with_l2_and_the_chief_alone_prints_the_table(tmp_path):
    ended = two_workers(tmp_path, "--l2=0.001", "--epochs=1")
    assert [status for status, _, _ in ended] == [0, 0], [stderr[-2000:] for _, _, stderr in ended]
    (_, chief, _), (_, other, _) = ended
    assert chief.count("check_regularizers: 6 trainable weights, 3 regularized:") == 1
    assert chief.count("check_regularizers: passed in") == 1
    assert "check_regularizers" not in other
    verdict = json.loads((tmp_path / "r" / "result.json").read_text())["decided"]["check_regularizers"]
    assert verdict["passed"] and [row["regularizer"] for row in verdict["weights"]].count("L2(0.001)") == 3


@pytest.mark.slow
def test_a_check_failed_on_one_worker_stops_both_with_status_70(tmp_path):
    """Worker 1's detached penalty (tests/check_models.py:detached_on_worker_1) fails there alone:
    the chief, which passed that part, stops too instead of waiting for worker 1 in the proof."""
    ended = two_workers(tmp_path, "--l2=0.001", f"--model={DETACHED}_on_worker_1")
    assert [status for status, _, _ in ended] == [70, 70], [stderr[-2000:] for _, _, stderr in ended]
    lines = [[line for line in stderr.splitlines() if line.startswith("train_loop:")] for _, _, stderr in ended]
    assert lines[0] == [
        "train_loop: error: check_regularizers: failed on another worker of the cluster (its line names the layer)."
    ]
    [line] = lines[1]
    assert DETACHED_LINE.fullmatch(line.removeprefix("train_loop: error: ")), line
    assert os.listdir(tmp_path / "r") == ["settings.json"]  # The chief's alone.
    verdict = json.loads((tmp_path / "r" / "settings.json").read_text())["decided"]["check_regularizers"]
    assert (verdict["passed"], verdict["failure"]) == (False, lines[0][0].removeprefix("train_loop: error: "))


def test_a_regularizer_counted_once_per_micro_batch_is_caught():
    """The replica math with the regularization's share forced to 1 at K=2: the keras#19990
    pitfall, each micro-batch adding the whole weight term."""
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    config, state, sample = digits_state(strategy, model="linear", l2=1e-3, accumulation_steps=2)
    before = [variable.numpy() for variable in state.model.variables + state.optimizer.variables]
    assert check_regularizers(config, strategy, state, sample, say=lambda line: None)["passed"]
    verdict = check_regularizers(config, strategy, state, sample, say=lambda line: None, regularization_share=1.0)
    assert not verdict["passed"]
    assert re.search(r"dense/kernel \(L2\(0.001\)\).*counted 2 times per update", verdict["failure"])
    after = [variable.numpy() for variable in state.model.variables + state.optimizer.variables]
    assert all(np.array_equal(old, new) for old, new in zip(before, after))


def test_a_regularization_not_divided_by_the_replicas_is_caught(monkeypatch):
    """The classic scaling bug (keras-team/keras#7178): each replica adds the whole weight term,
    as the step's regularization would without `tf.nn.scale_regularization_loss`."""
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    config, state, sample = digits_state(strategy, model="linear", l2=1e-3)
    monkeypatch.setattr(
        losses, "regularization", lambda model: tf.add_n(model.losses) if model.losses else tf.constant(0.0)
    )
    verdict = check_regularizers(config, strategy, state, sample, say=lambda line: None)
    assert re.search(r"dense/kernel \(L2\(0.001\)\).*counted once per replica \(2 times\)", verdict["failure"])


def test_a_regularization_a_layer_adds_again_itself_is_caught():
    """tests/user_models.py:build_own_l2_twice adds its kernel's L2 with add_loss on top of its
    kernel_regularizer: twice on one device too, so the equivalence check passes it
    (test_check_equivalence), and the proof with and without the regularizers sees one; this names it."""
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    config, state, sample = digits_state(strategy, model="tests/user_models.py:build_own_l2_twice")
    verdict = check_regularizers(config, strategy, state, sample, say=lambda line: None)
    assert re.fullmatch(
        r"check_regularizers: hidden/kernel \(L2\(0\.01\)\): its regularization \(\S+\) is counted 2 times per "
        r"update: layer hidden adds it itself \(add_loss\) on top of the term Keras adds for its regularizer; keep "
        r"one of the two\.",
        verdict["failure"],
    ), verdict["failure"]


def test_a_user_model_with_every_kind_of_term_passes_on_two_replicas_with_accumulation():
    """tests/user_models.py: kernel L2, bias L1, an activity regularizer and an add_loss term in a
    nested encoder; the activity and add_loss gradients, the same with and without the weights'
    regularizers, drop out of the proof."""
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    config, state, sample = digits_state(strategy, model="tests/user_models.py:build", accumulation_steps=2)
    verdict = check_regularizers(config, strategy, state, sample, say=lambda line: None)
    assert verdict["passed"], verdict["failure"]
    assert {row["weight"]: row["regularizer"] for row in verdict["weights"] if row["regularizer"] != "-"} == {
        "encoder/hidden/kernel": "L2(0.002)",
        "encoder/hidden/bias": "L1(0.001)",
        "logits/kernel": "L1L2(l1=0.0001, l2=0.001)",
    }
    assert {row["weight"]: row["activity"] for row in verdict["weights"]}["encoder/hidden/kernel"] == "L2(0.001)"


def test_a_weight_a_subclassed_model_makes_on_itself_is_in_the_table_and_the_proof():
    """`self.add_weight` in a keras.Model's build, in no layer: --l2 misses it (warned of, under the
    model's name); given its own regularizer, its gradient is proved, and a share of 1 at K=2 caught."""
    strategy = tf.distribute.get_strategy()
    config, state, sample = digits_state(strategy, model="notebook:own_weight", l2=1e-3)
    verdict = check_regularizers(config, strategy, state, sample, say=lambda line: None)
    assert verdict["passed"], verdict["failure"]
    assert [(row["weight"], row["regularizer"]) for row in verdict["weights"]] == [
        ("dense/kernel", "L2(0.001)"),
        ("dense/bias", "-"),
        ("scaled/scale", "-"),
    ]
    assert verdict["weights"][2]["flag"].startswith("--l2 misses the ScaledLogits model's own scale: the flags reach")
    config, state, sample = digits_state(strategy, model="notebook:own_regularized_weight", accumulation_steps=2)
    assert check_regularizers(config, strategy, state, sample, say=lambda line: None)["passed"]
    verdict = check_regularizers(config, strategy, state, sample, say=lambda line: None, regularization_share=1.0)
    assert re.match(r"check_regularizers: scaled/scale \(L2\(0.01\)\): .* counted 2 times", verdict["failure"])


@pytest.mark.parametrize(
    "settings",
    [dict(l2=1e-3, warmup_steps=5), dict(l2=1e-3, warmup_steps=5, optimizer="adam"), dict(l2=1e-5, optimizer="sgd")],
    ids=["warmup-rmsprop", "warmup-adam", "sgd-small-l2"],
)
def test_an_update_that_moves_the_weight_too_little_to_see_passes(settings):
    """A warm-up's first rate is 0: the update judged is the next step's, the first that moves a
    weight. SGD at the rate 1e-3 moves a weight by 2e-8 of itself with an L2 of 1e-5, under
    float32's rounding: the update is judged with the regularization's gradient scaled up. Both
    failed as "does not move it"; the optimizer's step is put back."""
    strategy = tf.distribute.get_strategy()
    config, state, sample = digits_state(strategy, model="linear", **settings)
    verdict = check_regularizers(config, strategy, state, sample, say=lambda line: None)
    assert verdict["passed"], verdict["failure"]
    assert int(state.optimizer.iterations) == 0


def test_an_l2_a_unit_norm_constraint_undoes_fails():
    """tests/check_models.py:unit_norm with SGD: each update scales the kernel's columns back to
    norm 1, so its L2's step towards 0 moves it by rounding alone: the L2 does nothing."""
    strategy = tf.distribute.get_strategy()
    config, state, sample = digits_state(strategy, model="notebook:unit_norm", optimizer="sgd", learning_rate=0.1)
    failure = check_regularizers(config, strategy, state, sample, say=lambda line: None)["failure"]
    assert re.fullmatch(
        r"check_regularizers: dense/kernel \(L2\(0.01\)\): one update with its regularizer moves it \S+ against "
        r"its closed form, within float32's rounding of its values \(\S+\): the optimizer does not apply the "
        r"regularizer's gradient or its constraint \(UnitNorm\) undoes it\.",
        failure,
    ), failure


def test_a_task_without_targets_passes_in_float16():
    strategy = tf.distribute.get_strategy()
    config, state, sample = digits_state(
        strategy, task="tests/user_tasks.py:Autoencoder", l1=1e-4, l2=1e-3, precision="mixed_float16"
    )
    verdict = check_regularizers(config, strategy, state, sample, say=lambda line: None)
    assert verdict["passed"], verdict["failure"]
    assert [row["regularizer"] for row in verdict["weights"] if row["weight"].endswith("kernel")] == [
        "L1L2(l1=0.0001, l2=0.001)"
    ] * 2


def test_global_flags_that_reach_no_weight_fail_the_check():
    strategy = tf.distribute.get_strategy()
    config, state, sample = digits_state(strategy, model="notebook:embedding_only", l2=1e-3)
    verdict = check_regularizers(config, strategy, state, sample, say=lambda line: None)
    assert verdict["failure"].startswith(
        "check_regularizers: --l2=0.001 regularizes none of the model's weights (embed/embeddings)"
    )


def test_l2_exclude_takes_the_global_terms_off_the_weights_it_matches():
    config = Config(dataset="digits", l2=1e-3, bias_l2=1e-2, l2_exclude="conv2|dense/bias")
    model = models.build_model(config, (8, 8))
    weights = {path: np.asarray(weight, np.float64) for path, weight in models.named_weights(model)}
    expected = 1e-3 * sum(np.square(weights[path]).sum() for path in ("conv1/kernel", "dense/kernel"))
    expected += 1e-2 * np.square(weights["conv1/bias"]).sum()
    assert float(tf.add_n(model.losses)) == pytest.approx(expected, rel=1e-6)
    assert [path for path, weight in models.named_weights(model) if weight.regularizer] == [
        "conv1/kernel",
        "conv1/bias",
        "dense/kernel",
    ]
    assert model.get_layer("conv2").get_config()["kernel_regularizer"] is None


def test_weight_decay_exclude_exempts_what_keras_matches_in_the_names():
    strategy = tf.distribute.get_strategy()
    _, state, _ = digits_state(strategy, model="linear", weight_decay=0.1, weight_decay_exclude="bias")
    decayed = {weight.name: optimizers.decayed(state.optimizer, weight) for weight in state.model.trainable_variables}
    assert decayed == {"kernel": True, "bias": False}


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (("--l2=0.001", "--l2_exclude=(bias"), ("--l2_exclude='(bias'", "not a regular expression")),
        (("--l2_exclude=bias",), ("--l2_exclude='bias'", "does not use")),
        (("--l2=0.001", "--l2_exclude=gamma"), ("--l2_exclude='gamma'", "matches none", "conv1/kernel")),
        (("--weight_decay=0.1", "--weight_decay_exclude=[z"), ("--weight_decay_exclude='[z'", "not a regular")),
        (("--weight_decay=0.1", "--weight_decay_exclude=dense"), ("--weight_decay_exclude='dense'", "own name")),
    ],
)
@pytest.mark.slow
def test_a_bad_exclusion_is_one_line_and_writes_nothing(run_cli, tmp_path, flags, names):
    finished = run_cli(*flags, "--run_name=r", *QUICK)
    assert_one_line_error(finished, names)
    assert not (tmp_path / "logs" / "r").exists()


def test_a_run_resumes_only_with_the_same_exclusions(tmp_path):
    config = Config(dataset="digits", l2=1e-3, l2_exclude="bias", logdir=str(tmp_path))
    runs.create(str(tmp_path / "r"), config)
    runs.check_same_settings(str(tmp_path / "r"), config)
    with pytest.raises(UsageError, match=r"l2_exclude \(run has 'bias', flags say 'dense'\)"):
        runs.check_same_settings(str(tmp_path / "r"), dataclasses.replace(config, l2_exclude="dense"))


def test_a_pattern_that_does_not_compile_is_refused_where_the_config_is_built():
    with pytest.raises(UsageError, match="not a regular expression"):
        Config(l2=1e-3, l2_exclude="(")
