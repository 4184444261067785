"""The controller and its periodic actions, each run on its own without training: the one rule
for "due", the loop calls' sizes, and what each action writes, saves or decides."""

from __future__ import annotations

import glob
import json
import math
import os
import signal

import numpy as np
import pytest
import tensorflow as tf
from helpers import events

from train_loop import Config
from train_loop.errors import DivergedError, Interrupted
from train_loop.model import measurements
from train_loop.model.state import build_state
from train_loop.outputs.checkpoints import make_manager
from train_loop.outputs.events import scalar_series
from train_loop.outputs.metrics_file import MetricsFile
from train_loop.outputs.summaries import Summaries
from train_loop.training.actions import (
    Cadence,
    Checkpoint,
    CountTraining,
    EpochEnd,
    Histograms,
    Moment,
    Periodic,
    Profiling,
    Signals,
    TrainSummaries,
    Validation,
)
from train_loop.training.console import Console
from train_loop.training.controller import Controller, Interval
from train_loop.training.evaluation import Evaluation
from train_loop.training.preemption import SignalStop
from train_loop.training.timing import Stopwatch, Throughput

STEPS_PER_EPOCH = 10


def moment(step: int, **settings) -> Moment:
    return Moment(step=step, epoch_end=step % STEPS_PER_EPOCH == 0, **settings)


@pytest.mark.parametrize(
    ("cadence", "due_steps"),
    [
        (Cadence(6, STEPS_PER_EPOCH), [6, 12, 18, 24, 30]),
        (Cadence(0, STEPS_PER_EPOCH), [10, 20, 30]),  # 0: at each epoch's end
        (Cadence(6, STEPS_PER_EPOCH, at_epoch_end=True), [6, 10, 12, 18, 20, 24, 30]),
        (Cadence(7, STEPS_PER_EPOCH, at_last=True), [7, 14, 21, 28, 30]),
    ],
    ids=["every-6", "each-epoch", "every-6-and-epoch-ends", "every-7-and-last"],
)
def test_one_rule_says_when_an_action_is_due_and_which_step_ends_the_next_call(cadence, due_steps):
    total = 3 * STEPS_PER_EPOCH
    assert [step for step in range(1, total + 1) if cadence.due(moment(step, last=step == total))] == due_steps
    # From every step, the next due step by count (the controller ends a call at the last step anyway).
    for step in range(total):
        assert min(cadence.next_due(step), total) == min(due for due in due_steps if due > step), step


class Recorder(Periodic):
    """Notes the moments it ran at."""

    def __init__(self, cadence: Cadence):
        super().__init__(cadence)
        self.ran: list[Moment] = []

    def run(self, at: Moment) -> None:
        self.ran.append(at)


class Calls:
    """A stand-in loop call (the controller is under test, not the step): it notes the steps and
    histograms asked for, measures `value` for each step and the step count as the gradient."""

    def __init__(self, value: float = 0.5):
        self.sizes: list[int] = []
        self.histograms: list[bool] = []
        self.value = value

    def __call__(self, num_steps: int, histograms: bool) -> dict[str, tf.Tensor]:
        self.sizes.append(num_steps)
        self.histograms.append(histograms)
        return {
            **{name: tf.constant(self.value * num_steps) for name in measurements.CLASSIFIER.per_epoch},
            "non_finite_gradients": tf.constant(0.0),
            "gradient_norm": tf.constant(1.0),
            "gradient/dense": tf.fill([2, 3], float(num_steps) if histograms else 0.0),
        }


def controller(calls: Calls, actions: list, **settings) -> Controller:
    state = build_state(Config(dataset="digits", model="linear"), tf.distribute.get_strategy(), (8, 8, 1))
    return Controller(
        loop_call=calls,
        counters=state.counters,
        table=state.table,
        steps_per_epoch=STEPS_PER_EPOCH,
        total_steps=3 * STEPS_PER_EPOCH,
        steps_per_loop=4,
        batch_size=32,
        actions=actions,
        **settings,
    )


class HistogramRecorder(Recorder):
    def wants_histograms(self, step: int) -> bool:
        return self.cadence.due_at(step)


def test_each_loop_call_ends_where_an_action_is_due_and_is_at_most_steps_per_loop():
    periodic, epochs = HistogramRecorder(Cadence(6, STEPS_PER_EPOCH)), Recorder(Cadence(0, STEPS_PER_EPOCH))
    calls = Calls()
    run = controller(calls, [periodic, epochs])
    run.run()
    # The first call is one step (it traces, and is timed apart); then up to 4, cut at 6, 10, 12, ...
    assert calls.sizes == [1, 4, 1, 4, 2, 4, 2, 2, 4, 4, 2]
    # Histograms are asked for by the calls that end where the action wanting them is due, and given to it.
    assert calls.histograms == [False, False, True, False, True, False, True, False, True, False, True]
    assert [at.histograms["gradient/dense"][0, 0] for at in periodic.ran] == [1, 2, 2, 4, 2]
    assert all(at.histograms == {} for at in epochs.ran if at.step % 6)
    assert [at.step for at in periodic.ran] == [6, 12, 18, 24, 30]
    assert [(at.step, at.epoch_end, at.last) for at in epochs.ran] == [
        (10, True, False),
        (20, True, False),
        (30, True, True),
    ]
    assert run.counters.step == 30


def test_an_early_stop_ends_the_run_and_is_its_last_step():
    stop_at = 12
    decider = Recorder(Cadence(6, STEPS_PER_EPOCH))
    after = Recorder(Cadence(6, STEPS_PER_EPOCH))
    run = controller(Calls(), [decider, after], stopping=lambda: bool(decider.ran) and decider.ran[-1].step >= stop_at)
    run.run()
    assert run.counters.step == stop_at
    # Asked again after the deciding action: the one after it sees the run's last step.
    assert [at.last for at in decider.ran] == [False, False] and [at.last for at in after.ran] == [False, True]


def test_divergence_stops_the_controller_and_ends_every_action(tmp_path):
    profiling = Profiling((0, 20), str(tmp_path))
    run = controller(Calls(value=math.nan), [profiling])
    with pytest.raises(DivergedError, match="cross_entropy became nan between steps 1 and 1"):
        run.run()
    assert not profiling.running and glob.glob(str(tmp_path / "plugins/profile/*/*.xplane.pb"))


def test_interval_means_sum_over_calls_and_keep_the_latest_gradient_norm():
    interval = Interval()
    interval.add({"total": 3.0, "gradient_norm": 2.0}, 3, examples=96, seconds=0.5)
    interval.add({"total": 1.0, "gradient_norm": 5.0}, 1, examples=32, seconds=0.5)
    assert interval.pop_means() == {"total": 1.0, "gradient_norm": 5.0, "examples_per_second": 128.0}
    interval.add({"total": 2.0}, 2, examples=64, seconds=1.0)
    assert interval.pop_means() == {"total": 1.0, "examples_per_second": 64.0}


@pytest.fixture
def state():
    config = Config(
        dataset="digits",
        model="linear",
        l2=0.001,
        weight_decay=0.01,
        best_metric="validation/accuracy",
        early_stopping_patience=2,
    )
    return config, build_state(config, tf.distribute.get_strategy(), (8, 8, 1))


def test_train_summaries_write_the_intervals_means_and_each_layers_terms(tmp_path, state, capsys):
    config, train_state = state
    summaries, interval = Summaries(str(tmp_path)), Interval()
    interval.add(
        {
            "cross_entropy": 4.0,
            "regularization": 2.0,
            "total": 6.0,
            "accuracy": 1.0,
            "non_finite_gradients": 0.0,
            "gradient_norm": 3.0,
            "gradient_norm/dense": 2.0,
        },
        4,
        examples=128,
        seconds=2.0,
    )
    stopwatch = Stopwatch()
    train_state.counters.advance(dict.fromkeys(measurements.CLASSIFIER.per_epoch, 2.0), 4)  # The epoch's sums so far.
    action = TrainSummaries(
        Cadence(5, STEPS_PER_EPOCH, at_epoch_end=True),
        config=config,
        state=train_state,
        summaries=summaries,
        console=Console(steps_per_epoch=10, num_epochs=1, interactive=True),
        means=interval.pop_means,
        stopwatch=stopwatch,
    )
    action.run(moment(4))
    summaries.close()
    assert list(stopwatch.seconds) == ["summaries"] and stopwatch.seconds["summaries"] > 0
    assert set(events(str(tmp_path), "train").Tags()["tensors"]) == {
        "loss/cross_entropy",
        "loss/regularization",
        "loss/total",
        "accuracy",
        "learning_rate",
        "examples_per_second",
        "gradient_norm",
        "gradient_norm/dense",
        "regularization/dense",
        "weight_norm/dense",
        "weight_decay/dense",
        "sparsity/dense",
        "regularization_ratio",
    }
    assert scalar_series(str(tmp_path), "train", "loss/cross_entropy") == {4: 1.0}
    assert scalar_series(str(tmp_path), "train", "regularization_ratio") == {4: 0.5}
    assert scalar_series(str(tmp_path), "train", "examples_per_second") == {4: 64.0}
    kernel, bias = (np.asarray(weight, np.float64) for weight in train_state.model.get_weights())
    assert scalar_series(str(tmp_path), "train", "weight_decay/dense")[4] == pytest.approx(
        0.01 / 2 * (np.square(kernel).sum() + np.square(bias).sum()), rel=1e-6
    )
    assert scalar_series(str(tmp_path), "train", "sparsity/dense")[4] == pytest.approx(np.mean(np.abs(kernel) < 1e-3))
    # The bar shows the epoch's means so far, which its line will give, not the interval's.
    assert "step  4/10 [========............] | train cross_entropy 0.5000 regularization 0.5000 " in (
        capsys.readouterr().out
    )


def test_histograms_hold_each_trainable_weight_and_the_gradients_given_by_layer_path(tmp_path, state):
    _, train_state = state
    summaries, stopwatch = Summaries(str(tmp_path)), Stopwatch()
    action = Histograms(Cadence(0, STEPS_PER_EPOCH), state=train_state, summaries=summaries, stopwatch=stopwatch)
    assert [step for step in range(1, 21) if action.wants_histograms(step)] == [10, 20]
    gradient = np.arange(640, dtype=np.float32).reshape(64, 10)
    action.run(moment(10, histograms={"gradient/dense": gradient}))
    summaries.close()
    accumulator = events(str(tmp_path), "train")
    assert set(accumulator.Tags()["tensors"]) == {"kernel/dense", "bias/dense", "gradient/dense"}
    (logged,) = accumulator.Tensors("gradient/dense")
    buckets = tf.make_ndarray(logged.tensor_proto)
    assert (logged.step, buckets[0, 0], buckets[-1, 1], buckets[:, 2].sum()) == (10, 0, 639, 640)
    assert list(stopwatch.seconds) == ["summaries"]


def evaluation(accuracy: float) -> Evaluation:
    return Evaluation({"cross_entropy": 1 - accuracy, "accuracy": accuracy}, np.eye(10, dtype=np.int64))


def test_validation_keeps_the_best_and_stops_after_patience_validations_without_gain(tmp_path, state, capsys):
    _, train_state = state
    scores, saved = iter([0.5, 0.7, 0.6, 0.65]), []
    summaries = Summaries(str(tmp_path))
    action = Validation(
        Cadence(5, STEPS_PER_EPOCH, at_last=True),
        state=train_state,
        validate=lambda: evaluation(next(scores)),
        summaries=summaries,
        console=Console(steps_per_epoch=10, num_epochs=2, interactive=False),
        save_best=lambda: saved.append(train_state.counters.step),
    )
    for step in (5, 10, 15, 20):
        assert not train_state.best.stop
        action.run(moment(step))
    summaries.close()
    assert train_state.best.stop and (train_state.best.step, float(train_state.best.value.numpy())) == (10, 0.7)
    assert len(saved) == 2 and action.latest.metrics["accuracy"] == 0.65
    assert scalar_series(str(tmp_path), "validation", "accuracy") == pytest.approx({5: 0.5, 10: 0.7, 15: 0.6, 20: 0.65})
    assert (
        "stopping early at step 20: validation/accuracy has not improved by more than 0 in 2 validations; "
        "the best, 0.7000, was at step 10" in capsys.readouterr().out
    )


def test_epoch_end_counts_the_epoch_and_starts_new_sums_but_the_last_keeps_them(tmp_path, state, capsys):
    """Each epoch's line on the console and in metrics.jsonl; the validation in metrics.jsonl only
    where it was validated (here at step 20, not 10), the latest on the console."""
    config, train_state = state
    counters, throughput = train_state.counters, Throughput(examples=320, seconds=2.0)
    console = Console(steps_per_epoch=10, num_epochs=2, interactive=False)
    validation = Validation(
        Cadence(20, STEPS_PER_EPOCH),
        state=train_state,
        validate=lambda: evaluation(0.75),
        summaries=Summaries(None),
        console=console,
        latest=evaluation(0.5),
    )
    action = EpochEnd(
        Cadence(0, STEPS_PER_EPOCH),
        config=config,
        state=train_state,
        console=console,
        metrics_file=MetricsFile(str(tmp_path)),
        throughput=throughput,
        validation=validation,
    )
    action.before_call(0)
    counters.advance(dict.fromkeys(measurements.CLASSIFIER.per_epoch, 5.0), 10)
    action.run(moment(10))
    assert int(counters.epoch) == 1 and counters.epoch_means() == dict.fromkeys(measurements.CLASSIFIER.per_epoch, 0.0)
    assert capsys.readouterr().out.splitlines() == [
        "Epoch 1/2",
        "epoch 1/2: train cross_entropy 0.5000 regularization 0.5000 total 0.5000 accuracy 0.5000 | "
        "validation cross_entropy 0.5000 accuracy 0.5000 | 160 examples/s",
    ]
    action.before_call(10)
    counters.advance(dict.fromkeys(measurements.CLASSIFIER.per_epoch, 2.0), 10)
    validation.run(moment(20, last=True))
    action.run(moment(20, last=True))
    assert int(counters.epoch) == 2 and counters.epoch_means() == dict.fromkeys(measurements.CLASSIFIER.per_epoch, 0.2)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line.pop("wall_time") > 0 for line in lines] == [True, True]
    train = {f"train/{name}": 0.5 for name in measurements.CLASSIFIER.per_epoch}
    common = {"learning_rate": config.learning_rate, "examples_per_second": 160.0}
    assert lines == [
        {"step": 10, "epoch": 1, **train, **common},
        {
            "step": 20,
            "epoch": 2,
            **{key: 0.2 for key in train},
            "validation/cross_entropy": 0.25,
            "validation/accuracy": 0.75,
            **common,
        },
    ]


def test_count_training_times_calls_after_the_first_apart():
    throughput = Throughput()
    action = CountTraining(throughput, 32)
    for num_steps in (1, 4, 4):
        throughput.start()
        action.run(moment(num_steps, num_steps=num_steps))
    assert throughput.first[0] == 32 and throughput.examples == 256 and throughput.seconds > 0


def test_checkpoint_saves_at_its_step_and_a_signal_saves_and_stops(tmp_path, state):
    _, train_state = state
    manager = make_manager(tf.train.Checkpoint(**train_state.trackables()), str(tmp_path))
    Checkpoint(Cadence(5, STEPS_PER_EPOCH, at_last=True), manager, Stopwatch()).run(moment(5))
    stop = SignalStop(tf.distribute.get_strategy())
    action = Signals(stop, manager)
    with stop.catching():
        action.run(moment(6))  # No signal: nothing happens.
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Interrupted, match="stopped by SIGTERM at step 7 with a checkpoint"):
            action.run(moment(7))
    assert sorted(os.path.basename(path) for path in glob.glob(str(tmp_path / "ckpt-*.index"))) == [
        "ckpt-5.index",
        "ckpt-7.index",
    ]


def test_profiling_traces_the_calls_from_start_to_end(tmp_path):
    action = Profiling((2, 4), str(tmp_path))
    assert [action.next_due(step) for step in (0, 2, 3, 4)] == [2, 4, 4, None]
    action.before_call(1)
    assert not action.running
    action.before_call(2)
    assert action.running and not action.due(moment(3)) and action.due(moment(4))
    action.run(moment(4))
    assert not action.running and glob.glob(str(tmp_path / "plugins/profile/*/*.xplane.pb"))
