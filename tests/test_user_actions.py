"""A user's periodic actions (`train_loop.train(actions=[...])`): cadence, what they are given, the
summaries they write, and a failing one."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf
from helpers import events

import train_loop
from train_loop.errors import ActionFailed
from train_loop.outputs.events import scalar_series

DIGITS = dict(dataset="digits", model="linear", jit_compile=False)
STEPS_PER_EPOCH = 40  # digits' 1,293 training examples in batches of 32, the remainder dropped


@pytest.mark.slow
def test_actions_run_at_their_cadence_with_the_loop_calls_measurements(tmp_path):
    """Every N steps, at epoch ends, at the last step; the measurements are the loop call's means,
    here equal to the logged ones (one loop call a summary interval, past the first call)."""
    seen: dict[str, list] = {"every": [], "epochs": [], "measured": []}

    def every(context: train_loop.ActionContext) -> None:
        seen["every"].append((context.step, context.epoch_end, context.last))
        seen["measured"].append((context.step, dict(context.measurements)))

    def epochs(context: train_loop.ActionContext) -> None:
        seen["epochs"].append(context.step)

    result = train_loop.train(
        logdir=str(tmp_path),
        run_name="r",
        epochs=2,
        steps_per_loop=5,
        summary_every=5,
        actions=[
            train_loop.PeriodicAction(every, every=15, at_last=True),
            train_loop.PeriodicAction(epochs),
        ],
        **DIGITS,
    )
    total = result["steps"]
    assert total == 2 * STEPS_PER_EPOCH
    expected = [(step, step % STEPS_PER_EPOCH == 0, False) for step in range(15, total, 15)] + [(total, True, True)]
    assert seen["every"] == expected
    assert seen["epochs"] == [STEPS_PER_EPOCH, total]
    logged = {tag: scalar_series(str(tmp_path / "r"), "train", tag) for tag in ("loss/total", "accuracy")}
    for step, measured in seen["measured"]:
        assert {"cross_entropy", "regularization", "total", "accuracy", "gradient_norm"} <= set(measured)
        assert "non_finite_gradients" not in measured
        assert measured["total"] == pytest.approx(logged["loss/total"][step], rel=1e-6), step
        assert measured["accuracy"] == pytest.approx(logged["accuracy"][step], rel=1e-6), step


@pytest.mark.slow
def test_an_action_writes_its_own_summaries_through_the_runs_writer(tmp_path):
    """An image of the model's predictions and a scalar, written with `tf.summary` alone, read back
    from the train writer's event file at the action's steps, pixel for pixel."""
    images, drawn = tf.random.stateless_uniform([2, 8, 8, 1], seed=[1, 2]), {}

    def samples(context: train_loop.ActionContext) -> None:
        probabilities = tf.nn.softmax(context.model(images, training=False))
        drawn[context.step] = tf.reshape(tf.tile(probabilities, [1, 10]), [2, 10, 10, 1]).numpy()
        tf.summary.image("samples", drawn[context.step], max_outputs=2)
        tf.summary.scalar("mine/weight_sum", float(tf.reduce_sum(context.model.trainable_variables[0])))

    train_loop.train(
        logdir=str(tmp_path), run_name="r", actions=[train_loop.PeriodicAction(samples, every=20)], **DIGITS
    )
    written = events(str(tmp_path / "r"), "train").Tensors("samples")
    assert [event.step for event in written] == list(drawn) == [20, 40]
    for event in written:
        width, height, *pngs = tf.make_ndarray(event.tensor_proto)
        assert (int(width), int(height), len(pngs)) == (10, 10, 2)
        pixels = np.stack([tf.io.decode_png(png).numpy() for png in pngs]) / 255.0
        np.testing.assert_allclose(pixels, drawn[event.step], atol=1 / 255)
    assert list(scalar_series(str(tmp_path / "r"), "train", "mine/weight_sum")) == [20, 40]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("failure", "said"),
    [
        (ValueError("no samples\nsecond line"), "raised ValueError: no samples at step 20"),
        (SystemExit(0), "SystemExit"),
    ],
    ids=["exception", "sys-exit"],
)
def test_a_raising_action_stops_the_run_after_a_checkpoint_and_the_run_resumes(tmp_path, failure, said):
    """One line naming the action and the step; a checkpoint of that step; exit status 2 (as a
    failing model function's); the same call without the fault resumes there and finishes."""

    def flaky(context: train_loop.ActionContext) -> None:
        raise failure

    settings = dict(logdir=str(tmp_path), run_name="r", epochs=2, **DIGITS)
    with pytest.raises(ActionFailed) as stopped:
        train_loop.train(actions=[train_loop.PeriodicAction(flaky, every=20)], **settings)
    message = str(stopped.value)
    assert "\n" not in message and stopped.value.exit_status == 2 and stopped.value.is_error
    assert message.startswith(f"action {flaky.__qualname__} ") and said in message, message
    assert os.path.exists(tmp_path / "r" / "checkpoints" / "ckpt-20.index")
    assert not os.path.exists(tmp_path / "r" / "result.json")

    resumed_at: list[int] = []
    result = train_loop.train(
        actions=[train_loop.PeriodicAction(lambda context: resumed_at.append(context.step), every=20)], **settings
    )
    assert result["steps"] == 2 * STEPS_PER_EPOCH and resumed_at == [40, 60, 80]


def test_bad_actions_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(train_loop.UsageError, match=r"every=-1\) must be a whole number of steps"):
        train_loop.PeriodicAction(print, every=-1)
    with pytest.raises(train_loop.UsageError, match="takes a function of an ActionContext, not a str"):
        train_loop.PeriodicAction("samples")
    with pytest.raises(train_loop.UsageError, match=r"got <built-in function print>: wrap a function"):
        train_loop.train(logdir=str(tmp_path), actions=[print], **DIGITS)
    assert not os.listdir(tmp_path)


def test_the_measurements_exclude_what_is_not_logged():
    from train_loop.model.measurements import for_task
    from train_loop.training.controller import call_means

    measured = {"recon": 3.0, "total": 6.0, "non_finite_gradients": 0.0, "gradient_norm": 2.0, "gradient_norm/d": 1.0}
    means = call_means(measured, 3, table=for_task(("recon",), ()))
    assert means == {"recon": 1.0, "total": 2.0, "gradient_norm": 2.0, "gradient_norm/d": 1.0}
