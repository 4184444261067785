"""A user's model: importing the function `--model=PATH.py:FUNCTION` names, calling it, and
checking that what it returns can be trained on the data; every failure of the user's code is
one `UsageError` line."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable

import keras
import tensorflow as tf

from train_loop.configs import Config
from train_loop.errors import UsageError
from train_loop.model.user_code import exits_refused

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


def model_function_name(model_fn: ModelFunction) -> str:
    """`module:function` for a function given to `train_loop.train(model_fn=...)`: its run's setting."""
    name = model_fn.__name__ if getattr(model_fn, "__name__", "").isidentifier() else "model_fn"
    return f"{getattr(model_fn, '__module__', None) or 'python'}:{name}"


def load_model_function(spec: str) -> ModelFunction:
    """The function `PATH.py:FUNCTION` or `package.module:FUNCTION` names (a path is from the working folder).

    Raises:
      UsageError: the file or module cannot be imported, or holds no such function.
    """
    function = load_user_object(spec, flag="--model", kind="model")
    if not callable(function):
        module_name, _, function_name = spec.rpartition(":")
        raise UsageError(f"--model={spec}: {module_name} has no function {function_name}.")
    return function


def load_user_object(spec: str, *, flag: str, kind: str) -> object:
    """What `PATH.py:NAME` or `package.module:NAME` names: a `kind` of the user's (a model function,
    a task), given as `flag`; a path is from the working folder.

    Raises:
      UsageError: the file or module cannot be imported, or holds no such name.
    """
    module_name, _, name = spec.rpartition(":")
    if module_name.endswith(".py") and not os.path.isfile(module_name):
        raise UsageError(f"{flag}={spec}: no file {module_name} (a path is taken from {os.getcwd()}).")
    with exits_refused(
        f"{flag}={spec}: {module_name}",
        during="when imported",
        fix=f'a {kind} file must not exit; put its script code under `if __name__ == "__main__":`.',
    ):
        try:
            module = _import_file(module_name) if module_name.endswith(".py") else importlib.import_module(module_name)
        except Exception as error:  # The user's code: whatever stops its import is the same user problem.
            raise UsageError(f"{flag}={spec}: importing {module_name} failed ({one_line(error)}).") from None
    found = getattr(module, name, None)
    if found is None:
        raise UsageError(f"{flag}={spec}: {module_name} has no {'function' if kind == 'model' else kind} {name}.")
    return found


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


def one_line(error: BaseException) -> str:
    """An exception as one line: Keras' terminal colours, its dumps of tensor values and its echo
    of the call's arguments cut."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split("Arguments received by")[0]
    text = re.sub(r"\[[][0-9.,eE+\-\s]{20,}\]", "<values>", " ".join(text.split()))
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__
