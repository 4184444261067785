"""The step and the loop: loss components, distribution, results, resumption, saved models."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import user_models
from helpers import numpy_regularization, scalar_series

import train_loop
from train_loop import Config, distribute, inputs, models, sources, steps
from train_loop.loop import train

REGULARIZED = [
    dict(l2=0.001),
    dict(l1=0.001),
    dict(l1=0.002, l2=0.001),
    dict(bias_l1=0.01),
    dict(bias_l2=0.02),
    dict(l2=0.001, bias_l1=0.003, bias_l2=0.004),
]


def one_step(config: Config, strategy: tf.distribute.Strategy | None = None):
    """Builds the model in the strategy's scope and runs one real training step on digits."""
    strategy = strategy or tf.distribute.get_strategy()
    splits = sources.load_splits(config)
    with strategy.scope():
        model = models.build_model(config, splits.x_train.shape[1:])
        optimizer = steps.build_optimizer(config)
        optimizer.build(model.trainable_variables)
    # Biases start at zero; give them values so that the bias terms are tested too.
    rng = np.random.default_rng(1)
    for _, layer in models.weighted_layers(model):
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype(np.float32))
    initial = numpy_regularization(model, config)
    images, labels = splits.x_train[: config.batch_size], splits.y_train[: config.batch_size]
    gradients = steps.make_replica_gradients(model, config.batch_size)
    train_step = tf.function(steps.make_train_step(strategy, model, optimizer, gradients))
    sums, norms = train_step((images, labels), tf.constant(True))
    names = (*steps.STEP_MEASUREMENTS, *steps.gradient_norm_names(model))
    return initial, dict(zip(names, np.concatenate([sums, norms]).tolist()))


def test_convnet_has_the_studys_parameter_count():
    assert models.build_model(Config(), (28, 28, 1)).count_params() == 130_394
    assert models.build_model(Config(model="linear"), (28, 28, 1)).count_params() == 7_850


@pytest.mark.parametrize("settings", REGULARIZED, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_step_regularization_equals_numpy_on_initial_weights(settings):
    """The step's regularization term is Keras' definition on the weights it started from."""
    config = Config(dataset="digits", **settings)
    initial, measured = one_step(config)
    assert initial > 0
    assert measured["regularization"] == pytest.approx(initial, rel=1e-6)
    assert measured["total"] == pytest.approx(measured["cross_entropy"] + measured["regularization"], rel=1e-6)


def test_step_without_regularizers_has_exactly_zero():
    initial, measured = one_step(Config(dataset="digits", dropout=0.2))
    assert initial == 0.0 and measured["regularization"] == 0.0
    assert measured["total"] == measured["cross_entropy"] > 0


@pytest.mark.parametrize(("model", "tags", "jit_compile"), [
    (dict(l2=0.001, bias_l2=0.01), ("gradient_norm", "gradient_norm/conv1", "weight_norm/dense"), True),
    (dict(l2=0.001, bias_l2=0.01), ("gradient_norm", "gradient_norm/conv1", "weight_norm/dense"), False),
    # Kernel, bias and activity regularizers, an add_loss term and a nested sub-model.
    (dict(model_fn=user_models.build), ("loss/regularization", "regularization/encoder/hidden",
                                        "gradient_norm/encoder/hidden", "weight_norm/logits"), False),
], ids=["convnet-xla", "convnet", "user-model"])
def test_mirrored_over_two_cpus_matches_one_device(tmp_path, model, tags, jit_compile):
    """Same seed and data: 2 replicas give one device's loss components, accuracy and weights.

    XLA is forced one way for both: `auto` measures per replica count and may pick either.
    """
    settings = dict(dataset="digits", logdir=str(tmp_path), steps_per_loop=7, summary_every=11,
                    jit_compile=jit_compile, **model)
    one = train_loop.train(strategy="one_device", run_name="one", **settings)
    two = train_loop.train(strategy="mirrored", cpu_replicas=2, run_name="two", **settings)
    assert (one["replicas"], two["replicas"]) == (1, 2)
    for split in ("train", "eval"):
        for name, value in one[split].items():
            assert two[split][name] == pytest.approx(value, rel=1e-5), (split, name)
    for tag in tags:
        one_series, two_series = (scalar_series(str(tmp_path / name), "train", tag) for name in ("one", "two"))
        assert list(two_series) == list(one_series) and len(one_series) > 1, tag
        np.testing.assert_allclose(list(two_series.values()), list(one_series.values()), rtol=1e-5, err_msg=tag)
    weights = [keras.models.load_model(tmp_path / name / "model.keras").get_weights() for name in ("one", "two")]
    for first, second in zip(*weights):
        np.testing.assert_allclose(second, first, rtol=1e-5, atol=1e-7)


def test_train_loop_is_traced_once_across_calls():
    config = Config(dataset="digits", l2=0.001)
    strategy = tf.distribute.get_strategy()
    splits = sources.load_splits(config)
    model = models.build_model(config, splits.x_train.shape[1:])
    optimizer = steps.build_optimizer(config)
    optimizer.build(model.trainable_variables)
    replica_input = inputs.ReplicaInput(strategy, inputs.train_dataset_fn(
        splits, global_batch_size=32, seed=0, num_epochs=1, start_step=0))
    train_step = steps.make_train_step(strategy, model, optimizer, steps.make_replica_gradients(model, 32))
    loop = steps.make_train_loop(train_step, steps.gradient_norm_names(model), replica_input.next_batch)
    iterator = replica_input.iterator()
    sums = [loop(iterator, tf.constant(n)) for n in (3, 5, 7)]
    assert loop.experimental_get_tracing_count() == 1
    assert all(np.isfinite(float(s["total"])) for s in sums)


def scaled_step(initial_scale: float, strategy: tf.distribute.Strategy):
    """A mixed_float16 model and one loss-scaled step on a digits batch; returns what changed."""
    config = Config(dataset="digits", precision="mixed_float16", l2=0.001)
    splits = sources.load_splits(config)
    with strategy.scope():
        model = models.build_model(config, splits.x_train.shape[1:])
        optimizer = steps.build_optimizer(config)
        optimizer.build(model.trainable_variables)
        loss_scale = steps.LossScale(initial=initial_scale)
    before = [w.copy() for w in model.get_weights()]
    gradients = steps.make_replica_gradients(model, 32, loss_scale=loss_scale)
    train_step = tf.function(steps.make_train_step(strategy, model, optimizer, gradients, loss_scale=loss_scale))
    sums, norms = train_step((splits.x_train[:32], splits.y_train[:32]), tf.constant(True))
    changed = any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    return float(loss_scale.scale.numpy()), int(loss_scale.good_steps.numpy()), changed, np.concatenate([sums, norms])


@pytest.mark.parametrize("replicas", [1, 2])
def test_float16_loss_scaling_skips_overflowing_steps_and_halves_the_scale(replicas):
    strategy = distribute.mirrored_strategy([f"/cpu:{i}" for i in range(replicas)])
    scale, good_steps, changed, measured = scaled_step(3e38, strategy)  # total * scale overflows float32
    assert (scale, good_steps, changed) == (pytest.approx(1.5e38), 0, False)
    assert np.all(np.isfinite(measured)), "the logged losses are unscaled and finite"
    scale, good_steps, changed, _ = scaled_step(2.0**10, strategy)
    assert (scale, good_steps, changed) == (2.0**10, 1, True)


def test_mixed_precision_keeps_float32_weights_logits_and_losses():
    config = Config(dataset="digits", precision="mixed_bfloat16", l2=0.001)
    model = models.build_model(config, (8, 8, 1))
    assert {weight.dtype for weight in model.weights} == {"float32"}
    assert model.layers[0].compute_dtype == "bfloat16"
    _, measured = one_step(config)
    assert measured["regularization"] > 0 and np.isfinite(measured["total"])


@pytest.mark.parametrize("settings", [dict(jit_compile=True), dict(precision="mixed_float16")], ids=str)
def test_mirrored_runs_with_xla_and_float16(tmp_path, settings):
    """Both put control flow or a compiled function around the step: they must work under replicas."""
    result = train(Config(dataset="digits", strategy="mirrored", cpu_replicas=2, logdir=str(tmp_path), **settings))
    assert result["replicas"] == 2 and result["eval"]["accuracy"] > 0.5
