"""The step and the loop: loss components, distribution, results, resumption, saved models."""

from __future__ import annotations

import dataclasses
import json

import fine_tuning_models
import keras
import numpy as np
import pytest
import tensorflow as tf
import user_models
from helpers import numpy_regularization

import train_loop
from train_loop import Config
from train_loop.data import inputs, sources
from train_loop.data.arrays import hold_out
from train_loop.model import loop_calls, measurements, models, optimizers, steps
from train_loop.model.state import LossScale, build_state
from train_loop.outputs.events import scalar_series
from train_loop.training import distribute
from train_loop.training.run import train

# Every optimizer feature at once; short enough a decay and warm-up to show in a digits epoch.
OPTIMIZER_FEATURES = dict(
    global_clipnorm=0.5, weight_decay=0.01, ema=0.9, lr_schedule="cosine", lr_decay_steps=30, warmup_steps=5
)

REGULARIZED = [
    dict(l2=0.001),
    dict(l1=0.001),
    dict(l1=0.002, l2=0.001),
    dict(bias_l1=0.01),
    dict(bias_l2=0.02),
    dict(l2=0.001, bias_l1=0.003, bias_l2=0.004),
]


def one_step(config: Config, strategy: tf.distribute.Strategy | None = None, *, model_out: list | None = None):
    """Builds the model in the strategy's scope and runs one real training step on digits.

    `model_out`, if given, receives the model and its weights before the step.
    """
    strategy = strategy or tf.distribute.get_strategy()
    splits = sources.load_splits(config)
    state = build_state(config, strategy, splits.x_train.shape[1:])
    model, optimizer = state.model, state.optimizer
    # Biases start at zero; give them values so that the bias terms are tested too.
    rng = np.random.default_rng(1)
    for _, layer in models.weighted_layers(model):
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype(np.float32))
    initial = numpy_regularization(model, config)
    if model_out is not None:
        model_out.extend([model, [w.copy() for w in model.get_weights()]])
    images, labels = splits.x_train[: config.batch_size], splits.y_train[: config.batch_size]
    gradients = steps.make_replica_gradients(model, config.batch_size)
    train_step = tf.function(
        steps.make_train_step(strategy, model, optimizer, gradients, global_clipnorm=config.global_clipnorm)
    )
    measured = train_step(
        strategy.experimental_distribute_values_from_function(lambda context: _replica_slice(images, labels, context))
        if strategy.num_replicas_in_sync > 1
        else (images, labels),
        tf.constant(True),
        tf.constant(True),
    )
    return initial, {name: float(value) if value.shape.rank == 0 else value.numpy() for name, value in measured.items()}


def _replica_slice(images: np.ndarray, labels: np.ndarray, context: tf.distribute.ValueContext) -> tuple:
    """Replica i's consecutive share of the global batch, as the run's input deals it."""
    size = len(images) // context.num_replicas_in_sync
    start = context.replica_id_in_sync_group * size
    return tf.constant(images[start : start + size]), tf.constant(labels[start : start + size])


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


@pytest.mark.parametrize("replicas", [1, 2])
def test_gradient_histograms_hold_the_whole_batchs_kernel_gradients(replicas):
    """ "gradient/<layer>" is the gradient of the batch's total loss (TensorFlow's, recomputed here
    on the weights the step started from) before clipping, on any replica count; its norm is
    the logged "gradient_norm/<layer>"."""
    strategy = distribute.mirrored_strategy([f"/cpu:{index}" for index in range(replicas)])
    config = Config(dataset="digits", l2=0.001, global_clipnorm=1e-3)
    built: list = []
    _, measured = one_step(config, strategy, model_out=built)
    model, initial = built
    model.set_weights(initial)
    splits = sources.load_splits(config)
    images, labels = splits.x_train[: config.batch_size], splits.y_train[: config.batch_size]
    with tf.GradientTape() as tape:
        logits = model(images, training=True)
        total = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)) + tf.add_n(model.losses)
    layers = models.weighted_layers(model)
    expected = tape.gradient(total, [layer.kernel for _, layer in layers])
    assert {name for name in measured if name.startswith("gradient/")} == {f"gradient/{path}" for path, _ in layers}
    for (path, _), gradient in zip(layers, expected):
        np.testing.assert_allclose(measured[f"gradient/{path}"], gradient.numpy(), rtol=1e-4, atol=1e-6)
        assert np.linalg.norm(measured[f"gradient/{path}"]) == pytest.approx(
            measured[f"gradient_norm/{path}"], rel=1e-5
        )


def test_step_without_regularizers_has_exactly_zero():
    initial, measured = one_step(Config(dataset="digits", dropout=0.2))
    assert initial == 0.0 and measured["regularization"] == 0.0
    assert measured["total"] == measured["cross_entropy"] > 0


# Half batches round differently from whole ones: on the digits less their validation split, a
# ReLU input near 0 at step 20 flips, and with these regularizers RMSprop carries the difference
# to 1e-3 in the weights by the epoch's end. On the whole training split, no flip happens.
WHOLE_TRAIN_SPLIT = dict(validation_split=0.0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "tags", "jit_compile"),
    [
        (
            dict(l2=0.001, bias_l2=0.01, **WHOLE_TRAIN_SPLIT),
            ("gradient_norm", "gradient_norm/conv1", "weight_norm/dense"),
            True,
        ),
        (
            dict(l2=0.001, bias_l2=0.01, **WHOLE_TRAIN_SPLIT),
            ("gradient_norm", "gradient_norm/conv1", "weight_norm/dense", "sparsity/conv1", "regularization_ratio"),
            False,
        ),
        # Kernel, bias and activity regularizers, an add_loss term and a nested sub-model.
        (
            dict(model_fn=user_models.build),
            (
                "loss/regularization",
                "regularization/encoder/hidden",
                "gradient_norm/encoder/hidden",
                "weight_norm/logits",
            ),
            False,
        ),
        # Clipping (of the summed gradient), decoupled decay, the weights' average and a schedule.
        (
            dict(l2=0.001, **OPTIMIZER_FEATURES),
            ("clipped_share", "weight_decay/conv1", "learning_rate", "gradient_norm"),
            False,
        ),
        # Fine-tuning: a frozen Conv2D and Dense (tests/fine_tuning_models.py), decayed and clipped.
        (
            dict(model_fn=fine_tuning_models.frozen, weight_decay=0.01, global_clipnorm=0.5),
            ("gradient_norm", "gradient_norm/logits", "weight_norm/features", "loss/regularization"),
            False,
        ),
        # Synchronized BatchNorm: its moving statistics, updated on every replica, end as one device's.
        # With SGD: RMSprop's first steps divide by a tiny mean square, and BatchNorm's division
        # by the batch's deviation adds to it, which made rounding differences of 1e-5.
        (
            dict(model_fn=fine_tuning_models.batch_norm, optimizer="sgd"),
            ("loss/total", "gradient_norm/conv", "weight_norm/conv", "weight_norm/logits"),
            False,
        ),
    ],
    ids=["convnet-xla", "convnet", "user-model", "clip-decay-ema-schedule", "frozen-layers", "batch-norm"],
)
def test_mirrored_over_two_cpus_matches_one_device(tmp_path, model, tags, jit_compile):
    """Same seed and data: 2 replicas give one device's loss components, accuracy and weights.

    XLA is forced one way for both: `auto` measures per replica count and may pick either.
    """
    settings = dict(
        dataset="digits", logdir=str(tmp_path), steps_per_loop=7, summary_every=11, jit_compile=jit_compile, **model
    )
    one = train_loop.train(strategy="one_device", run_name="one", **settings)
    two = train_loop.train(strategy="mirrored", cpu_replicas=2, run_name="two", **settings)
    assert (one["replicas"], two["replicas"]) == (1, 2)
    for split in ("train", "validation", "test"):
        for name, value in (one[split] or {}).items():
            assert two[split][name] == pytest.approx(value, rel=1e-5), (split, name)
    for tag in tags:
        one_series, two_series = (scalar_series(str(tmp_path / name), "train", tag) for name in ("one", "two"))
        assert list(two_series) == list(one_series) and len(one_series) > 1, tag
        np.testing.assert_allclose(list(two_series.values()), list(one_series.values()), rtol=1e-5, err_msg=tag)
    weights = [keras.models.load_model(tmp_path / name / "model.keras").get_weights() for name in ("one", "two")]
    for first, second in zip(*weights):
        np.testing.assert_allclose(second, first, rtol=1e-5, atol=1e-7)
    if "learning_rate" in tags:
        check_logged_features(str(tmp_path / "one"))


def check_logged_features(run_dir: str) -> None:
    """`learning_rate` is the rate each logged step applied (Keras' schedule one update back), and
    the clipped share is a share of steps, some clipped with this clip norm."""
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0,
        OPTIMIZER_FEATURES["lr_decay_steps"],
        warmup_target=Config().learning_rate,
        warmup_steps=OPTIMIZER_FEATURES["warmup_steps"],
    )
    logged = scalar_series(run_dir, "train", "learning_rate")
    for step, rate in logged.items():
        assert rate == pytest.approx(float(schedule(step - 1)), rel=1e-5), step
    shares = list(scalar_series(run_dir, "train", "clipped_share").values())
    assert all(0.0 <= share <= 1.0 for share in shares) and max(shares) > 0


def test_loop_call_is_traced_once_and_returns_named_measurements():
    config = Config(dataset="digits", l2=0.001)
    strategy = tf.distribute.get_strategy()
    splits = sources.load_splits(config)
    state = build_state(config, strategy, splits.x_train.shape[1:])
    replica_input = inputs.ReplicaInput(
        strategy, inputs.train_dataset_fn(splits, global_batch_size=32, seed=0, num_epochs=1, start_step=0)
    )
    loop_call = loop_calls.make_loop_call(strategy, state, replica_input.next_batch, global_batch_size=32)
    iterator = replica_input.iterator()
    histograms = (False, True, False)
    measured = [loop_call(iterator, tf.constant(n), tf.constant(h)) for n, h in zip((3, 5, 7), histograms)]
    assert loop_call.experimental_get_tracing_count() == 1
    layers = ("conv1", "conv2", "dense")
    # "clipped" only with --global_clipnorm.
    assert set(measured[0]) == {
        *measurements.CLASSIFIER.summed,
        "gradient_norm",
        *(f"gradient{kind}/{layer}" for layer in layers for kind in ("_norm", "")),
    } - {"clipped"}
    for sums, num_steps, histogram in zip(measured, (3, 5, 7), histograms):
        # Sums over the call's steps: each step's accuracy is a share of its batch.
        assert 0 < float(sums["accuracy"]) <= num_steps and np.isfinite(float(sums["total"]))
        assert float(sums["gradient_norm"]) > 0
        # The kernels' gradients only when asked for (zeros otherwise), of the last step, as its norms.
        for layer in layers:
            norm = np.linalg.norm(sums[f"gradient/{layer}"])
            assert norm == (pytest.approx(float(sums[f"gradient_norm/{layer}"]), rel=1e-5) if histogram else 0.0)


def scaled_step(initial_scale: float, strategy: tf.distribute.Strategy):
    """A mixed_float16 model and one loss-scaled step on a digits batch; returns what changed."""
    config = Config(dataset="digits", precision="mixed_float16", l2=0.001)
    splits = sources.load_splits(config)
    with strategy.scope():
        model = models.build_model(config, splits.x_train.shape[1:])
        optimizer = optimizers.build_optimizer(config)
        optimizer.build(model.trainable_variables)
        loss_scale = LossScale(initial=initial_scale)
    before = [w.copy() for w in model.get_weights()]
    gradients = steps.make_replica_gradients(model, 32, loss_scale=loss_scale)
    train_step = tf.function(steps.make_train_step(strategy, model, optimizer, gradients, loss_scale=loss_scale))
    measured = train_step((splits.x_train[:32], splits.y_train[:32]), tf.constant(True), tf.constant(True))
    changed = any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    return (
        float(loss_scale.scale.numpy()),
        int(loss_scale.good_steps.numpy()),
        changed,
        np.concatenate([np.ravel(value) for value in measured.values()]),
    )


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
    initial, measured = one_step(config)
    # The regularization is the float32 weights' (NumPy's), the total its sum with the data term,
    # and the cross-entropy float32's up to bfloat16's rounding (8 bits of mantissa).
    _, exact = one_step(dataclasses.replace(config, precision="float32"))
    assert measured["regularization"] == pytest.approx(initial, rel=1e-6)
    assert measured["total"] == pytest.approx(measured["cross_entropy"] + measured["regularization"], rel=1e-6)
    assert measured["cross_entropy"] == pytest.approx(exact["cross_entropy"], rel=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings", [dict(jit_compile=True), dict(precision="mixed_float16", global_clipnorm=1.0)], ids=str
)
def test_mirrored_runs_with_xla_and_float16(tmp_path, settings):
    """Both put control flow or a compiled function around the step: under two replicas they must
    compute what one device computes (up to float16's rounding, which the replicas' halves of the
    batch round apart)."""
    one, two = (
        train(Config(dataset="digits", logdir=str(tmp_path / name), strategy=name, **settings, **devices))
        for name, devices in (("one_device", {}), ("mirrored", {"cpu_replicas": 2}))
    )
    assert (one["replicas"], two["replicas"]) == (1, 2)
    # float16: the losses within 0.3%, the accuracies within two of the 144 validation examples.
    float16 = settings.get("precision") == "mixed_float16"
    for split in ("train", "validation", "test"):
        for name, value in one[split].items():
            expected = (
                pytest.approx(value, abs=0.015)
                if float16 and name == "accuracy"
                else pytest.approx(value, rel=3e-3 if float16 else 1e-5)
            )
            assert two[split][name] == expected, (split, name)


@pytest.mark.parametrize("replicas", [1, 2])
def test_clipping_bounds_the_summed_gradients_norm_on_any_replica_count(replicas):
    """SGD at rate 1 moves the weights by the applied gradient: its global norm is the clip norm
    exactly, on one device and on two replicas (Keras' own clipping would clip each half)."""
    strategy = distribute.mirrored_strategy([f"/cpu:{index}" for index in range(replicas)])
    config = Config(dataset="digits", optimizer="sgd", learning_rate=1.0, global_clipnorm=0.05, l2=0.001)
    built: list = []
    _, measured = one_step(config, strategy, model_out=built)
    model, before = built
    moved = np.sqrt(
        sum(np.sum(np.square(after - first, dtype=np.float64)) for after, first in zip(model.get_weights(), before))
    )
    assert measured["gradient_norm"] > 0.05, "the norm is logged before clipping"
    assert moved == pytest.approx(0.05, rel=1e-4)
    assert measured["clipped"] == 1.0
    _, unclipped = one_step(Config(dataset="digits", optimizer="sgd", global_clipnorm=1e6), strategy)
    assert unclipped["clipped"] == 0.0


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop", "adam"])
def test_decoupled_weight_decay_step_equals_numpy(optimizer):
    """The decay is not in the gradient: a step with it lands `learning_rate * λ * w` below the
    same step without it, whatever the optimizer does to the gradient."""
    rate, decay, results = 0.01, 0.1, []
    for weight_decay in (0.0, decay):
        built: list = []
        one_step(
            Config(dataset="digits", optimizer=optimizer, learning_rate=rate, weight_decay=weight_decay),
            model_out=built,
        )
        results.append(built)
    (plain, initial), (decayed, _) = results
    for start, without, with_decay in zip(initial, plain.get_weights(), decayed.get_weights()):
        np.testing.assert_allclose(with_decay - without, -rate * decay * start, rtol=1e-4, atol=1e-7)
    terms = optimizers.layer_decay_terms(decayed, decay)
    for path, layer in models.weighted_layers(decayed):
        expected = decay / 2 * sum(np.square(w.astype(np.float64)).sum() for w in layer.get_weights())
        assert terms[path] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "schedule",
    [
        dict(lr_schedule="cosine", lr_decay_steps=40, warmup_steps=8),
        dict(lr_schedule="step", lr_decay_steps=10, lr_decay_rate=0.5, warmup_steps=5),
        dict(lr_schedule="constant", warmup_steps=4),
    ],
    ids=lambda s: s["lr_schedule"],
)
def test_learning_rate_schedules_equal_keras_schedules(schedule):
    """Warm-up then decay, against Keras' CosineDecay with its own warm-up, ExponentialDecay
    shifted past the warm-up, and a linear ramp."""
    config = Config(learning_rate=0.02, **schedule)
    built = optimizers.learning_rate_schedule(config)
    warmup, keras_schedules = config.warmup_steps, keras.optimizers.schedules
    oracle = {
        "cosine": lambda step: keras_schedules.CosineDecay(
            0.0, config.lr_decay_steps, warmup_target=0.02, warmup_steps=warmup
        )(step),
        "step": lambda step: (
            0.02 * step / warmup
            if step < warmup
            else keras_schedules.ExponentialDecay(0.02, config.lr_decay_steps, 0.5, staircase=True)(step - warmup)
        ),
        "constant": lambda step: 0.02 * min(step / warmup, 1.0),
    }[config.lr_schedule]
    for step in (0, 1, warmup - 1, warmup, warmup + 1, warmup + 9, warmup + 10, warmup + 39, warmup + 45):
        assert float(built(step)) == pytest.approx(float(oracle(step)), rel=1e-6, abs=1e-12), step


def test_ema_of_the_weights_follows_numpy_over_consecutive_checkpoints(tmp_path):
    """Checkpoints hold the weights and their averages; the average of step k+1 is
    m * average_k + (1 - m) * weights_(k+1), and model.keras holds the last average."""
    config = Config(
        dataset="digits",
        model="linear",
        ema=0.9,
        checkpoint_every=1,
        steps_per_loop=1,
        logdir=str(tmp_path),
        run_name="ema",
        jit_compile=False,
    )
    result = train(config)
    saved = []
    for step in (result["steps"] - 1, result["steps"]):
        state = build_state(config, tf.distribute.get_strategy(), (8, 8, 1))
        tf.train.Checkpoint(**state.trackables()).restore(
            str(tmp_path / "ema" / "checkpoints" / f"ckpt-{step}")
        ).expect_partial()
        averages = [v.numpy() for v in state.optimizer.variables if v.name.endswith("_average")]
        saved.append((state.model.get_weights(), averages))
    (_, previous), (weights, averages) = saved
    assert len(averages) == len(weights) == 2
    for average, last, current in zip(averages, previous, weights):
        np.testing.assert_allclose(average, 0.9 * last + 0.1 * current, rtol=1e-5, atol=1e-7)
        assert not np.allclose(average, current), "the average is not the weights themselves"
    for kept, average in zip(keras.models.load_model(tmp_path / "ema" / "model.keras").get_weights(), averages):
        np.testing.assert_array_equal(kept, average)


def test_validation_every_n_steps_and_the_test_split_once_at_the_end(tmp_path):
    """`--eval_every` validates at its multiples and the last step; the test split is scored once.
    Both equal the saved model's predictions on the held-out and the test examples."""
    config = Config(
        dataset="digits", model="linear", epochs=2, eval_every=15, logdir=str(tmp_path), run_name="r", jit_compile=False
    )
    result = train(config)
    run_dir, total = str(tmp_path / "r"), result["steps"]
    validation = scalar_series(run_dir, "validation", "accuracy")
    assert list(validation) == sorted({*range(15, total + 1, 15), total})
    assert list(scalar_series(run_dir, "test", "accuracy")) == [total]
    splits = hold_out(sources.load_splits(config), 0.1, seed=0)
    model = keras.models.load_model(tmp_path / "r" / "model.keras")
    for split, images, labels in (
        ("validation", splits.x_validation, splits.y_validation),
        ("test", splits.x_test, splits.y_test),
    ):
        predicted = np.argmax(model.predict(images, verbose=0), axis=-1)
        assert result[split]["accuracy"] == pytest.approx(np.mean(predicted == labels), abs=1e-6), split
    assert validation[total] == pytest.approx(result["validation"]["accuracy"], abs=1e-6)


def test_best_model_early_stopping_and_export_on_a_run_that_overfits(tmp_path):
    """A linear model at a high rate soon stops improving on the validation split. The run keeps
    the weights of the lowest validation cross-entropy (the averaged weights that scored it),
    stops `patience` validations after it, checkpoints the step it stopped at, and exports the
    kept model for serving."""
    patience, every = 3, 10
    config = Config(
        dataset="digits",
        model="linear",
        learning_rate=0.05,
        epochs=30,
        eval_every=every,
        ema=0.5,
        best_metric="validation/cross_entropy",
        early_stopping_patience=patience,
        logdir=str(tmp_path),
        run_name="r",
        jit_compile=False,
    )
    result = train(config)
    run_dir = tmp_path / "r"
    series = scalar_series(str(run_dir), "validation", "loss/cross_entropy")
    steps_logged = list(series)
    best_step = min(series, key=lambda step: (series[step], step))
    assert result["stopped_early"] and result["best_step"] == best_step
    assert result["steps"] == steps_logged[-1] == best_step + patience * every < 30 * 40
    assert all(series[step] >= series[best_step] for step in steps_logged[steps_logged.index(best_step) :])
    assert tf.train.latest_checkpoint(str(run_dir / "checkpoints")).endswith(f"-{result['steps']}")

    splits = hold_out(sources.load_splits(config), 0.1, seed=0)
    kept = keras.models.load_model(run_dir / "model.keras")
    best = keras.models.load_model(run_dir / "best" / "model.keras")
    for first, second in zip(kept.get_weights(), best.get_weights()):
        np.testing.assert_array_equal(first, second)
    logits = kept.predict(splits.x_validation, verbose=0)
    numpy_cross_entropy = -np.mean(
        logits[np.arange(len(logits)), splits.y_validation] - np.log(np.exp(logits).sum(axis=1))
    )
    assert numpy_cross_entropy == pytest.approx(series[best_step], rel=1e-5)
    assert result["validation"]["cross_entropy"] == pytest.approx(series[best_step], rel=1e-6)

    exported = tf.saved_model.load(str(run_dir / "saved_model"))  # Held: its functions need its variables.
    served = exported.serve(tf.constant(splits.x_test))
    np.testing.assert_allclose(served.numpy(), kept.predict(splits.x_test, verbose=0), rtol=1e-5, atol=1e-6)
    predicted = np.argmax(served.numpy(), axis=-1)
    assert result["test"]["accuracy"] == pytest.approx(np.mean(predicted == splits.y_test), abs=1e-6)


@pytest.mark.slow
def test_a_schedule_without_decay_steps_decays_over_the_run(tmp_path):
    """As Hugging Face's and Lightning's: cosine over every step after the warm-up, to 0 at the end."""
    result = train(Config(dataset="digits", epochs=2, lr_schedule="cosine", warmup_steps=10, logdir=str(tmp_path)))
    total = result["steps"]
    run_dir = tmp_path / "convnet-dataset=digits-epochs=2-lr_schedule=cosine-lr_decay_steps=70-warmup_steps=10"
    settings = json.loads((run_dir / "settings.json").read_text())
    assert (total, settings["lr_decay_steps"]) == (80, 70)
    # The rate of the run's last update (step 80, counted from 1): cosine at step 69 of 70 after the
    # warm-up, computed in float32 by Keras (hence 1e-4).
    expected = 0.001 * 0.5 * (1 + np.cos(np.pi * 69 / 70))
    assert scalar_series(str(run_dir), "train", "learning_rate")[total] == pytest.approx(expected, rel=1e-4)
