"""A user's model: importing the function `--model=PATH.py:FUNCTION` names, calling it, and
checking that what it returns can be trained on the data; every failure of the user's code is
one `UsageError` line."""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from train_loop.configs import Config
from train_loop.errors import UsageError
from train_loop.user_code import exits_refused, load_function, one_line

ModelFunction = Callable[[], keras.Model]
# The fix for a model whose call ends the process.
CALL_MUST_RETURN = "a model's call must return its logits, not end the process."


def build_user_model(
    config: Config,
    input_shape: tuple[int, ...],
    *,
    num_classes: int | None,
    model_fn: ModelFunction | None,
    flag: str = "",
    targets: str = "classes",
) -> keras.Model:
    """The model of `model_fn`, else of the function `config.model` names, checked to take inputs
    of `input_shape`, to output `num_classes` values (any outputs when None: a task's model, whose
    terms `tasks.checked_names` checks) and to have a weight to train. `flag` names it in errors
    (default: `--model=...`); `targets` says what the outputs stand for there (see `tasks.Task`).

    Raises:
      UsageError: the function cannot be imported, fails, returns no `keras.Model`, does not fit
        the data, or has no trainable weight.
    """
    flag = flag or f"--model={config.model}"
    model = _call_model_function(config, model_fn or load_model_function(config.model), flag)
    _check_outputs(model, flag, input_shape, num_classes, targets)
    if not model.trainable_variables:
        raise UsageError(
            f"{flag}: every layer is frozen (trainable = False), so there is nothing to train; "
            "leave at least one layer trainable."
        )
    return model


def load_model_function(spec: str) -> ModelFunction:
    """The function `PATH.py:FUNCTION` or `package.module:FUNCTION` names (a path is from the working folder).

    Raises:
      UsageError: the file or module cannot be imported, or holds no such function.
    """
    return load_function("model", spec, role="a model file")


def _call_model_function(config: Config, model_fn: ModelFunction, flag: str) -> keras.Model:
    """Calls `model_fn` with Keras' global seed and dtype policy set from the flags, so that unseeded
    initializers draw the same weights in every process and --precision applies to its layers."""
    keras.utils.set_random_seed(config.seed)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(config.precision)
    try:
        with exits_refused(
            flag,
            during="while building the model",
            fix="a model function must return a keras.Model, not end the process.",
        ):
            model = model_fn()
    except UsageError:
        raise
    except Exception as error:  # The user's code: any failure is reported, not a traceback.
        raise UsageError(f"{flag}: calling it raised {one_line(error)}.") from None
    finally:
        keras.config.set_dtype_policy(previous)
    if not isinstance(model, keras.Model):
        raise UsageError(f"{flag}: returned {type(model).__name__}, not a keras.Model; return the uncompiled model.")
    return model


def _check_outputs(
    model: keras.Model, flag: str, input_shape: tuple[int, ...], num_classes: int | None, targets: str
) -> None:
    """Calls the model on a batch of zeros (which builds a subclassed model's weights) and checks
    that it gives one logit per class, or one output per target value."""
    with exits_refused(f"{flag}: its model", during="on its first call", fix=CALL_MUST_RETURN):
        try:
            outputs = model(tf.zeros((2, *input_shape)), training=False)
        except Exception as error:  # The user's code, on the data's shape: any failure is a mismatch.
            shape = ", ".join(map(str, input_shape))
            raise UsageError(f"{flag}: cannot take inputs of shape (N, {shape}) ({one_line(error)}).") from None
    if num_classes is not None and tuple(getattr(outputs, "shape", ())) != (2, num_classes):
        raise UsageError(
            f"{flag}: outputs of shape {tuple(getattr(outputs, 'shape', ()))} for a batch of 2, "
            f"expected (2, {num_classes}): {_one_output_each(num_classes, targets)}."
        )


def _one_output_each(count: int, targets: str) -> str:
    if targets == "classes":
        return f"one logit per class of the labels 0..{count - 1}"
    return f"one output per target value (the targets hold {count} per example)"
