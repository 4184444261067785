"""train_loop: a hand-written TensorFlow 2 training loop that shows every term of its loss."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from train_loop.configs import Config
from train_loop.errors import UsageError
from train_loop.settings import ARRAYS_PREFIX
from train_loop.user_actions import ActionContext, PeriodicAction, checked_actions

# The one place the version is written: pyproject.toml reads it from here.
__version__ = "0.1.0"


def train(
    config: Config | None = None,
    *,
    model_fn: Callable[[], Any] | str | None = None,
    data: Mapping[str, Any] | str | None = None,
    task: Any = None,
    actions: Sequence[PeriodicAction] = (),
    input_fn: Callable[[str, Any], Any] | None = None,
    **settings,
) -> dict:
    """Trains one run and returns its result: what `result.json` holds, and "run_dir", the run
    folder's absolute path (the name actually taken: `<run_name>-2` when `<run_name>` was).

    Pass a `Config`, or its fields as keywords: `train_loop.train(dataset="digits", l2=1e-3)`.
    `model_fn` is a function of no arguments returning an uncompiled `keras.Model` that outputs
    logits; it is called inside the strategy's scope, which is why it is a function and not a
    model. `data` is a mapping of the arrays `x_train`, `y_train`, `x_test`, `y_test`, or a path
    to an .npz holding them. A run records the function as `module:name` and the arrays by a
    fingerprint of their bytes, so that a resumed run is checked against both. `task` is what the
    run minimizes, an object (or class) giving `model()` and `loss_terms(batch, outputs)` (see
    `train_loop.model.tasks.UserTask`), or its `PATH.py:NAME`; a task object is recorded by its
    class's `module:name`. `actions` are
    your own `PeriodicAction`s: functions the run calls as it calls its own summaries, with the
    step, the last loop call's measurements and the model (see `PeriodicAction`).
    `input_fn(split, context)` streams the data instead (see `--input` and docs/streams.md): it
    returns a `tf.data.Dataset` of unbatched examples for "train", "validation" (or None) and
    "test"; the run records it as `module:name`.
    TensorFlow is imported on the first call, not on `import train_loop`, and quietly, as the
    tools start it (`startup`), unless it was imported before.
    """
    config = config if config is not None else Config(**settings)
    user_actions = checked_actions(actions)
    _start_tensorflow(config.cpu_replicas, config.strategy)
    from train_loop.data.arrays import fingerprint
    from train_loop.training.run import train as train_config  # Deferred: importing TensorFlow takes seconds.
    from train_loop.user_code import function_name

    function = model_fn if callable(model_fn) else None
    arrays = data if isinstance(data, Mapping) else None
    changes = {}
    if model_fn is not None:
        changes["model"] = function_name(function, "model_fn") if function else model_fn
    if data is not None:
        changes["dataset"] = ARRAYS_PREFIX + fingerprint(arrays) if arrays is not None else data
    task_object = task if task is not None and not isinstance(task, str) else None
    if task is not None:
        # A task is recorded by its class: `module:Name`.
        task_class = task_object if isinstance(task_object, type) else type(task_object)
        changes["task"] = function_name(task_class, "task") if task_object else task
    if input_fn is not None:
        changes["input"] = function_name(input_fn, "input_fn")
    return train_config(
        dataclasses.replace(config, **changes),
        model_fn=function,
        arrays=arrays,
        task=task_object,
        user_actions=user_actions,
        input_fn=input_fn,
    )


def load(run_dir: str) -> Any:
    """The trained `keras.Model` of a finished run: its `model.keras`, which holds the best
    weights where the run kept them (`best_metric`), else their moving average (`ema`), else the
    last ones. A run of your own model function imports its module first, for the layers it
    registers. TensorFlow is imported on the first call, as by `train`.

    Raises:
      UsageError: `run_dir` is not a finished run, or its model cannot be read.
    """
    _start_tensorflow()
    from train_loop.outputs.exports import load_model  # Deferred: importing TensorFlow takes seconds.

    return load_model(run_dir)


def _start_tensorflow(cpu_replicas: int = 0, strategy: str = "one_device") -> None:
    """TensorFlow's start without its start-up lines (on a machine without a GPU, an `E0000 ...
    cuInit` error), as the tools start it; a process that imported it already has them behind it."""
    if "tensorflow" not in sys.modules:
        from train_loop import startup

        startup.start_tensorflow(cpu_replicas, strategy)


__all__ = ["ActionContext", "Config", "PeriodicAction", "UsageError", "__version__", "load", "train"]
