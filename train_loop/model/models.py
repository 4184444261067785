"""The models: the study's built-in networks with the regularizers the flags ask for, a user's
model (`user_models`) regularized the same way, and naming their layers by path."""

from __future__ import annotations

import re

import keras
import tensorflow as tf

from train_loop.configs import Config
from train_loop.errors import UsageError
from train_loop.model.dropout import ExampleDropout
from train_loop.model.user_models import ModelFunction, build_user_model
from train_loop.settings import MODELS

# The layers whose `kernel` and `bias` --l1/--l2/--bias_l1/--bias_l2 regularize and the logs show.
KERNEL_LAYERS = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)
# |w| under this counts as (nearly) zero: what L1 produces and L2 does not. The TensorBoard
# `sparsity/<layer>` scalars, the study's table and its figures all count by it.
NEAR_ZERO = 1e-3


def build_model(
    config: Config,
    input_shape: tuple[int, ...],
    *,
    num_classes: int | None = 10,
    model_fn: ModelFunction | None = None,
    flag: str = "",
    targets: str = "classes",
) -> keras.Model:
    """The model `config.model` names, with the regularizers the flags ask for; call in the strategy's scope.

    A user's model comes from `model_fn` (a task's, named `flag` in errors), else from importing
    `config.model`; it is built on a batch of `input_shape` and must output `num_classes` values
    (logits of classes or one per target value, as `targets` says; None: anything, a task's model).

    A user's layers may be frozen (`layer.trainable = False`): the step leaves their weights as
    they are (see `steps.make_train_step`).

    Raises:
      UsageError: the function cannot be imported, fails, returns no `keras.Model`, does not fit
        the data, has no trainable weight, its layers carry regularizers while the flags ask for
        some too, or --l2_exclude matches none of its weights.
    """
    if model_fn is None and config.model in MODELS:
        model = _built_in(config, input_shape, num_classes)
    else:
        model = build_user_model(
            config, input_shape, num_classes=num_classes, model_fn=model_fn, flag=flag, targets=targets
        )
        _apply_weight_regularizers(model, config)
    _exclude_weights(model, config, flag or f"--model={config.model}")
    return model


def _exclude_weights(model: keras.Model, config: Config, flag: str) -> None:
    """Takes the global regularizers off the weights --l2_exclude matches. With the global flags on,
    every regularizer of the model is theirs (a user's model may carry none then), so all go.

    Raises:
      UsageError: the pattern matches no weight of the model: a typo would otherwise exempt nothing.
    """
    if not config.l2_exclude:
        return
    matched = excluded_weights(model, config.l2_exclude)
    if not matched:
        some = ", ".join(path for path, _ in named_weights(model)[:4])
        raise UsageError(
            f"--l2_exclude={config.l2_exclude!r} matches none of {flag}'s weights ({some}, ...): it is searched "
            "in <layer path>/<weight name>; fix the pattern, or drop --l2_exclude."
        )
    for weight in matched.values():
        weight.regularizer = None
    for _, layer in weighted_layers(model):  # What model.keras records of the layer.
        if layer.kernel.regularizer is None:
            layer.kernel_regularizer = None
        if layer.bias is not None and layer.bias.regularizer is None:
            layer.bias_regularizer = None


def excluded_weights(model: keras.Model, pattern: str) -> dict[str, keras.Variable]:
    """The weights `pattern` (--l2_exclude) is found in (`re.search`), by `<layer path>/<weight name>`."""
    return {path: weight for path, weight in named_weights(model) if pattern and re.search(pattern, path)}


def named_weights(model: keras.Model) -> list[tuple[str, keras.Variable]]:
    """Every weight (a frozen layer's too) by `<layer path>/<weight name>` (`conv1/kernel`)."""
    return [(f"{path}/{weight.name}", weight) for path, _, weight in held_weights(model)]


def held_weights(
    model: keras.Model, *, trainable: bool = False
) -> list[tuple[str, keras.layers.Layer, keras.Variable]]:
    """Every weight with the layer that holds it and that layer's path: each layer's, in the order
    of `named_layers`, then the ones a model made on itself (`self.add_weight` in a subclassed
    model's `build`), which no layer holds: that model holds them, under its path (its name at the
    top). `trainable`: the weights training moves alone (a frozen layer's are not)."""
    found = [
        (path, layer, weight)
        for path, layer in named_layers(model)
        for weight in (layer.trainable_weights if trainable else layer.weights)
    ]
    for path, inner in _models(model):
        held = {id(weight) for layer in inner.layers for weight in layer.weights}
        owned = inner.trainable_weights if trainable else inner.weights
        found += [(path, inner, weight) for weight in owned if id(weight) not in held]
    return found


def _models(model: keras.Model, path: str = "") -> list[tuple[str, keras.Model]]:
    """`model` (by its name at the top) and every model nested in it, by path."""
    nested = [
        entry
        for layer in model.layers
        if isinstance(layer, keras.Model)
        for entry in _models(layer, f"{path}/{layer.name}" if path else layer.name)
    ]
    return [(path or model.name, model), *nested]


def _apply_weight_regularizers(model: keras.Model, config: Config) -> None:
    """--l1/--l2 on every kernel and --bias_l1/--bias_l2 on every bias of the KERNEL_LAYERS
    (a frozen layer's too, where, as Keras does, they count for nothing: see `losses.regularization`).

    Raises:
      UsageError: the flags ask for regularizers and some weight carries one already.
    """
    kernel, bias = make_regularizer(config.l1, config.l2), make_regularizer(config.bias_l1, config.bias_l2)
    if kernel is None and bias is None:
        return
    carrying = [weight.path for weight in model.weights if getattr(weight, "regularizer", None)]
    if carrying:
        raise UsageError(
            f"--model={config.model}: its weights already carry regularizers ({', '.join(carrying[:3])}): "
            "leave --l1, --l2, --bias_l1 and --bias_l2 at 0, or remove them from the model."
        )
    for _, layer in weighted_layers(model):
        # The variables hold the regularizer Keras applies; the attributes, what model.keras records.
        layer.kernel.regularizer = layer.kernel_regularizer = kernel
        if layer.bias is not None:
            layer.bias.regularizer = layer.bias_regularizer = bias


def _built_in(config: Config, input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """The study's convnet or its linear baseline, returning logits (softmax lives in the loss).

    Layers have fixed names (`conv1`, `conv2`, `dense`) because TensorBoard tags and checkpoints
    are keyed by them; weights and dropout are seeded from `config.seed`.
    """
    if config.model == "convnet" and len(input_shape) not in (2, 3):
        raise UsageError(
            f"--model=convnet takes images of shape (N, H, W) or (N, H, W, C); --dataset={config.dataset} "
            f"holds inputs of shape (N, {', '.join(map(str, input_shape))}): use --model=linear or a model "
            "function."
        )
    seed, dtype = config.seed, config.precision  # A Keras policy name: float32 master weights.
    layers: list = [keras.Input(shape=input_shape)]
    if config.model == "convnet" and len(input_shape) == 2:  # Float (N, H, W) images: uint8 ones have the axis.
        layers.append(keras.layers.Reshape((*input_shape, 1), name="channel", dtype=dtype))
    if config.model == "convnet":
        for index, filters in enumerate((32, 16), start=1):
            layers.append(
                keras.layers.Conv2D(
                    filters,
                    3,
                    padding="same",
                    activation="relu",
                    name=f"conv{index}",
                    dtype=dtype,
                    **_weights(config, seed + index),
                )
            )
            if config.dropout:
                layers.append(
                    ExampleDropout(config.dropout, seed=seed + 10 + index, name=f"dropout{index}", dtype=dtype)
                )
    layers.append(keras.layers.Flatten(name="flatten", dtype=dtype))
    layers.append(keras.layers.Dense(num_classes, name="dense", dtype=dtype, **_weights(config, seed + 3)))
    return keras.Sequential(layers, name=config.model)


def _weights(config: Config, seed: int) -> dict:
    """Seeded initializers and the regularizers `--l1/--l2/--bias_l1/--bias_l2` ask for."""
    return {
        "kernel_initializer": keras.initializers.GlorotUniform(seed=seed),
        "bias_initializer": "zeros",
        "kernel_regularizer": make_regularizer(config.l1, config.l2),
        "bias_regularizer": make_regularizer(config.bias_l1, config.bias_l2),
    }


def make_regularizer(l1: float, l2: float) -> keras.regularizers.Regularizer | None:
    """Keras' own L1, L2 or L1L2 (`l1 * sum(|w|) + l2 * sum(w**2)`), or None when both are 0."""
    if l1 and l2:
        return keras.regularizers.L1L2(l1=l1, l2=l2)
    if l1:
        return keras.regularizers.L1(l1)
    if l2:
        return keras.regularizers.L2(l2)
    return None


def weighted_layers(model: keras.Model) -> list[tuple[str, keras.layers.Layer]]:
    """The KERNEL_LAYERS by path: the ones with a kernel (and a bias) to log and regularize."""
    return [(path, layer) for path, layer in named_layers(model) if isinstance(layer, KERNEL_LAYERS)]


def near_zero_share(kernel: tf.Tensor) -> float:
    """The share of `kernel`'s entries with |w| < NEAR_ZERO: how sparse a regularizer made it."""
    return float(tf.reduce_mean(tf.cast(tf.abs(kernel) < NEAR_ZERO, tf.float64)))


def named_layers(model: keras.Model, prefix: str = "") -> list[tuple[str, keras.layers.Layer]]:
    """Every layer that is not itself a model, by its path of layer names (`encoder/dense`).

    Paths, not names, tell apart the layers of nested sub-models (a name is unique in its model
    only); a layer shared between models is listed once, under its first path.
    """
    found: dict[int, tuple[str, keras.layers.Layer]] = {}
    for layer in model.layers:
        path = prefix + layer.name
        inner = named_layers(layer, f"{path}/") if isinstance(layer, keras.Model) else [(path, layer)]
        for entry in inner:
            found.setdefault(id(entry[1]), entry)
    return list(found.values())
