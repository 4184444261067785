"""The models: the study's networks, a user's model function, and naming their layers by path."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable

import keras
import tensorflow as tf

from train_loop.configs import MODELS, Config
from train_loop.data.inputs import global_positions
from train_loop.errors import UsageError
from train_loop.model.user_code import exits_refused

ModelFunction = Callable[[], keras.Model]
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
# The fix for a model whose call ends the process.
CALL_MUST_RETURN = "a model's call must return its logits, not end the process."
# |w| under this counts as (nearly) zero: what L1 produces and L2 does not. The TensorBoard
# `sparsity/<layer>` scalars, the study's table and its figures all count by it.
NEAR_ZERO = 1e-3


def build_model(
    config: Config, input_shape: tuple[int, ...], *, num_classes: int = 10, model_fn: ModelFunction | None = None
) -> keras.Model:
    """The model `config.model` names, with the regularizers the flags ask for; call in the strategy's scope.

    A user's model comes from `model_fn`, else from importing `config.model`; it is built on a
    batch of `input_shape` and must output `num_classes` logits.

    A user's layers may be frozen (`layer.trainable = False`): the step leaves their weights as
    they are (see `steps.make_train_step`).

    Raises:
      UsageError: the function cannot be imported, fails, returns no `keras.Model`, does not fit
        the data, has no trainable weight, or its layers carry regularizers while the flags ask
        for some too.
    """
    if config.model in MODELS:
        return _built_in(config, input_shape, num_classes)
    model = _call_model_function(config, model_fn or load_model_function(config.model))
    _check_outputs(model, config.model, input_shape, num_classes)
    if not model.trainable_variables:
        raise UsageError(
            f"--model={config.model}: every layer is frozen (trainable = False), so there is nothing to train; "
            "leave at least one layer trainable."
        )
    _apply_weight_regularizers(model, config)
    return model


def model_function_name(model_fn: ModelFunction) -> str:
    """`module:function` for a function given to `train_loop.train(model_fn=...)`: its run's setting."""
    name = model_fn.__name__ if getattr(model_fn, "__name__", "").isidentifier() else "model_fn"
    return f"{getattr(model_fn, '__module__', None) or 'python'}:{name}"


def load_model_function(spec: str) -> ModelFunction:
    """The function `PATH.py:FUNCTION` or `package.module:FUNCTION` names (a path is from the working folder).

    Raises:
      UsageError: the file or module cannot be imported, or holds no such function.
    """
    module_name, _, function_name = spec.rpartition(":")
    if module_name.endswith(".py") and not os.path.isfile(module_name):
        raise UsageError(f"--model={spec}: no file {module_name} (a path is taken from {os.getcwd()}).")
    with exits_refused(
        f"--model={spec}: {module_name}",
        during="when imported",
        fix='a model file must not exit; put its script code under `if __name__ == "__main__":`.',
    ):
        try:
            module = _import_file(module_name) if module_name.endswith(".py") else importlib.import_module(module_name)
        except Exception as error:  # The user's code: whatever stops its import is the same user problem.
            raise UsageError(f"--model={spec}: importing {module_name} failed ({_one_line(error)}).") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UsageError(f"--model={spec}: {module_name} has no function {function_name}.")
    return function


def _import_file(path: str) -> object:
    """Imports a .py file as a module named after it, registered so that its classes can be found;
    a file imported already (a notebook's, or a resumed run's in the same process) is reused."""
    name = os.path.basename(path).removesuffix(".py")
    loaded = sys.modules.get(name)
    if loaded is not None and os.path.realpath(getattr(loaded, "__file__", None) or "") == os.path.realpath(path):
        return loaded
    if loaded is not None:
        name = f"train_loop_model_{name}"  # Another module holds the name; do not displace it.
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _call_model_function(config: Config, model_fn: ModelFunction) -> keras.Model:
    """Calls `model_fn` with Keras' global seed and dtype policy set from the flags, so that unseeded
    initializers draw the same weights in every process and --precision applies to its layers."""
    keras.utils.set_random_seed(config.seed)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(config.precision)
    try:
        with exits_refused(
            f"--model={config.model}",
            during="while building the model",
            fix="a model function must return a keras.Model, not end the process.",
        ):
            model = model_fn()
    except UsageError:
        raise
    except Exception as error:  # The user's code: any failure is reported, not a traceback.
        raise UsageError(f"--model={config.model}: calling it raised {_one_line(error)}.") from None
    finally:
        keras.config.set_dtype_policy(previous)
    if not isinstance(model, keras.Model):
        raise UsageError(
            f"--model={config.model}: returned {type(model).__name__}, not a keras.Model; return the uncompiled model."
        )
    return model


def _check_outputs(model: keras.Model, name: str, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Calls the model on a batch of zeros (which builds a subclassed model's weights) and checks
    that it gives one logit per class."""
    with exits_refused(f"--model={name}: its model", during="on its first call", fix=CALL_MUST_RETURN):
        try:
            outputs = model(tf.zeros((2, *input_shape)), training=False)
        except Exception as error:  # The user's code, on the data's shape: any failure is a mismatch.
            shape = ", ".join(map(str, input_shape))
            raise UsageError(
                f"--model={name}: cannot take inputs of shape (N, {shape}) ({_one_line(error)})."
            ) from None
    if tuple(getattr(outputs, "shape", ())) != (2, num_classes):
        raise UsageError(
            f"--model={name}: outputs of shape {tuple(getattr(outputs, 'shape', ()))} for a batch of 2, "
            f"expected (2, {num_classes}): one logit per class of the labels 0..{num_classes - 1}."
        )


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


def _one_line(error: BaseException) -> str:
    """An exception as one line: Keras' terminal colours, its dumps of tensor values and its echo
    of the call's arguments cut."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split("Arguments received by")[0]
    text = re.sub(r"\[[][0-9.,eE+\-\s]{20,}\]", "<values>", " ".join(text.split()))
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def _built_in(config: Config, input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """The study's convnet or its linear baseline, returning logits (softmax lives in the loss).

    Layers have fixed names (`conv1`, `conv2`, `dense`) because TensorBoard tags and checkpoints
    are keyed by them; weights and dropout are seeded from `config.seed`.
    """
    if config.model == "convnet" and len(input_shape) != 3:
        raise UsageError(
            f"--model=convnet takes images of shape (N, H, W) or (N, H, W, C); --dataset={config.dataset} "
            f"holds inputs of shape (N, {', '.join(map(str, input_shape))}): use --model=linear or a model "
            "function."
        )
    seed, dtype = config.seed, config.precision  # A Keras policy name: float32 master weights.
    layers: list = [keras.Input(shape=input_shape)]
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


class ExampleDropout(keras.layers.Layer):
    """Dropout whose mask for an example depends only on the seed, the step and the example's
    place in the global batch.

    Keras' Dropout draws one mask per call from a seed generator whose state every replica
    shares: N replicas each drew the same [batch/N, ...] mask where one device drew one
    [batch, ...] mask, so the replica count changed the run (a digits run stopped early at step
    375 on two replicas, 555 on one). Here the mask of the whole global batch at step s is one
    stateless Philox draw keyed by (seed, s), and each replica keeps the rows of its examples:
    one op, as fast as Keras' own on one device (a draw per example, by `tf.map_fn`, took 2.4x
    as long without XLA and 20x with it), and N replicas draw what one device draws.
    The step is the optimizer's (`use_step`), which the checkpoint already holds: the layer has
    no state of its own, and a resumed run draws the masks an uninterrupted one would.

    Same rate and scaling as Keras' layer; saved models hold Keras' own Dropout (`plain_keras`).
    """

    def __init__(self, rate: float, *, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.seed = rate, seed
        self.supports_masking = True
        self.step: Callable[[], tf.Tensor] | None = None

    def call(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        if not training or not self.rate:
            return inputs
        if self.step is None:
            raise RuntimeError(f"{self.name} trains only with a step to key its masks by: call models.use_step.")
        # XLA's Philox gives other numbers than TensorFlow's kernels for a seed known only at run
        # time: compiled or not changes the masks (as it changes rounding), the replica count does not.
        key = tf.random.experimental.stateless_fold_in(tf.constant([self.seed, 0], tf.int32), self.step())

        rows, replicas = tf.shape(inputs)[0], tf.distribute.get_strategy().num_replicas_in_sync
        shape = tf.concat([[rows * replicas], tf.shape(inputs)[1:]], axis=0)
        uniform = tf.gather(tf.random.stateless_uniform(shape, seed=key, alg="philox"), _global_positions(rows))
        return tf.where(uniform >= self.rate, inputs / tf.cast(1.0 - self.rate, inputs.dtype), tf.zeros_like(inputs))

    def get_config(self) -> dict:
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


def _global_positions(rows: tf.Tensor) -> tf.Tensor:
    """This replica's examples' places in the global batch (`global_positions`); outside
    a strategy, its rows."""
    if not tf.distribute.has_strategy():
        return tf.range(rows)
    strategy = tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    # A strategy holds this worker's replicas; each worker has one input pipeline.
    pipelines = replicas // len(strategy.extended.worker_devices)
    replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
    return global_positions(rows, replica_id, replicas, pipelines)


def use_step(model: keras.Model, step: Callable[[], tf.Tensor]) -> None:
    """Keys the masks of `model`'s dropout layers by `step()` (the optimizer's `iterations`).

    A function rather than the variable: a Keras layer tracks a variable it holds, which would
    then count among the model's own variables and its checkpoint's.
    """
    for layer in model.layers:
        if isinstance(layer, ExampleDropout):
            layer.step = step


def plain_keras(model: keras.Model) -> keras.Model:
    """`model` with Keras' own Dropout layers, so that its saved file loads with Keras alone."""
    if not any(isinstance(layer, ExampleDropout) for layer in model.layers):
        return model  # A user's model, which cloning might not handle, or a built-in one without dropout.

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        kind = keras.layers.Dropout if isinstance(layer, ExampleDropout) else type(layer)
        return kind.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


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
