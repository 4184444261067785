"""Speed settings decided by measuring this machine: whether XLA compiles the step (`--jit_compile=auto`).

Which way is faster is not a property of the code: XLA made the step 1.9x faster on an AVX2-only
AMD EPYC, 1.8x slower on an AVX-512/AMX Xeon and 2x slower on an AVX-512 AMD EPYC (BENCHMARKS.md).
So `auto` times both compiled steps here, on a throwaway copy of the model fed a real batch, and
remembers the answer per CPU and step in a small JSON cache (`speed_cache`): the second run of
a setting on a machine pays nothing. The run's own model, optimizer and random state are not
touched, so the run computes what a run forced to the same choice computes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from train_loop.configs import Config
from train_loop.data import arrays, inputs
from train_loop.model import loop_calls
from train_loop.model.state import build_state
from train_loop.model.tasks import Task
from train_loop.model.user_models import ModelFunction
from train_loop.training import cpu
from train_loop.training.distribute import is_multi_worker, mean_over_workers
from train_loop.training.speed_cache import SpeedCache

_ROUNDS = 3  # Alternating timed blocks per variant: drifts of a shared machine hit both alike.
_BLOCK_SECONDS = 0.2
_PROTOCOL = 1  # Bumped when the measurement changes, so older cached answers are measured again.


@dataclasses.dataclass(frozen=True)
class Decision:
    """Whether the step is compiled with XLA, and how that was decided (printed and recorded)."""

    jit_compile: bool
    by: str  # "flag", "resumed", "cached", "measured" or "tpu".
    examples_per_second: dict[str, float] | None = None  # {"xla": ..., "no_xla": ...} when measured.

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}

    def describe(self) -> str:
        """One line for the console: the choice and its evidence."""
        choice = f"XLA {'on' if self.jit_compile else 'off'}"
        if self.by == "flag":
            return f"{choice} (--{'' if self.jit_compile else 'no'}jit_compile)"
        if self.by == "resumed":
            return f"{choice}, as the run started (its settings.json)"
        if self.by == "tpu":
            return f"{choice}: a TPU always compiles"
        speeds = self.examples_per_second or {}
        evidence = f"{speeds.get('xla', 0):,.0f} examples/s with XLA, {speeds.get('no_xla', 0):,.0f} without"
        where = "measured on this CPU" if self.by == "measured" else "measured earlier on this CPU (cached)"
        return f"{choice}, {where}: {evidence} (--jit_compile or --nojit_compile forces it)"


@dataclasses.dataclass(frozen=True)
class TimingBatch:
    """What the timing feeds the step: one global batch of the run's own structure (a tuple, a
    dict, a single array: a stream's, whatever its function yields), as NumPy arrays, and what
    the throwaway model is built for."""

    batch: Any
    input_shape: tuple[int, ...]
    num_classes: int

    @classmethod
    def of(cls, data: arrays.Splits | TimingBatch, batch_size: int) -> TimingBatch:
        """`data` as it is, or arrays' first global batch, `(inputs, labels)`."""
        if isinstance(data, TimingBatch):
            return data
        return cls((data.x_train[:batch_size], data.y_train[:batch_size]), data.x_train.shape[1:], data.num_classes)


def decide_jit_compile(
    config: Config,
    strategy: tf.distribute.Strategy,
    splits: arrays.Splits | TimingBatch,
    saved_settings: dict[str, Any] | None,
    *,
    model_fn: ModelFunction | None = None,
    task: Task | None = None,
) -> Decision:
    """`config.jit_compile` when forced; else the resumed run's choice, the cached one, or a measurement.

    On a multi-worker cluster every worker measures and the averaged timings decide, so all workers
    compile alike (a cache could differ between machines and leave one worker out of a collective).
    """
    if isinstance(config.jit_compile, bool):
        return Decision(config.jit_compile, "flag")
    resumed = recorded_jit_compile(saved_settings)
    if resumed is not None:
        return Decision(resumed, "resumed")
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return Decision(True, "tpu")
    cache = None if is_multi_worker(strategy) else SpeedCache.open()
    key = step_key(config, strategy, TimingBatch.of(splits, config.batch_size).input_shape)
    cached = cache.get(key) if cache else None
    if cached is not None:
        return Decision(cached["jit_compile"], "cached", cached["examples_per_second"])
    speeds = measure_jit_compile(config, strategy, splits, model_fn=model_fn, task=task)
    decision = Decision(speeds["xla"] > speeds["no_xla"], "measured", speeds)
    if cache:
        cache.put(key, {"jit_compile": decision.jit_compile, "examples_per_second": speeds})
    return decision


def recorded_jit_compile(settings: dict[str, Any] | None) -> bool | None:
    """The choice a run recorded in its settings.json: its decision, or a forced flag of an older run."""
    if not settings:
        return None
    decided = settings.get("decided", {}).get("jit_compile") if isinstance(settings.get("decided"), dict) else None
    if isinstance(decided, bool):
        return decided
    return settings.get("jit_compile") if isinstance(settings.get("jit_compile"), bool) else None


def step_key(config: Config, strategy: tf.distribute.Strategy, input_shape: tuple[int, ...]) -> str:
    """What the step's speed depends on: the machine, the libraries and the settings of the step."""
    return json.dumps(
        {
            "protocol": _PROTOCOL,
            "cpu": cpu.model(),
            "features": cpu.features(),
            "cores": cpu.cores(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", ""),
            "devices": [device.split("/")[-1] for device in strategy.extended.worker_devices],
            "strategy": type(strategy).__name__,
            "replicas": strategy.num_replicas_in_sync,
            "model": config.model,
            "input_shape": list(input_shape),
            "dropout": config.dropout > 0,
            "regularizers": [name for name in ("l1", "l2", "bias_l1", "bias_l2") if getattr(config, name)],
            "batch_size": config.batch_size,
            "precision": config.precision,
            "optimizer": config.optimizer,
            # Each adds work to every step (an all-reduce, an update or an average of every weight).
            "optimizer_extras": [name for name in ("global_clipnorm", "weight_decay", "ema") if getattr(config, name)],
            "deterministic": config.deterministic,
            # Only when on, so that the choices measured before the setting existed still apply.
            **({"accumulation_steps": config.accumulation_steps} if config.accumulation_steps > 1 else {}),
        },
        sort_keys=True,
    )


def measure_jit_compile(
    config: Config,
    strategy: tf.distribute.Strategy,
    splits: arrays.Splits | TimingBatch,
    *,
    model_fn: ModelFunction | None = None,
    task: Task | None = None,
) -> dict[str, float]:
    """Examples per second of the train step with and without XLA, on a throwaway model.

    Both are traced and compiled first, then timed in alternating blocks of about 0.2 s; each
    keeps its best block. Averaged over workers on a cluster, so every worker gets the same answer.
    """
    loops = {
        name: cached_batch_loop_call(config, strategy, splits, jit_compile=jit, model_fn=model_fn, task=task)
        for name, jit in (("xla", True), ("no_xla", False))
    }
    num_steps = {name: _block_steps(strategy, loop) for name, loop in loops.items()}
    best = dict.fromkeys(loops, 0.0)
    for _ in range(_ROUNDS):
        for name, loop in loops.items():
            started = time.perf_counter()
            float(loop(tf.constant(num_steps[name]))["total"])
            best[name] = max(best[name], num_steps[name] * config.batch_size / (time.perf_counter() - started))
    return dict(zip(best, mean_over_workers(strategy, list(best.values()))))


def cached_batch_loop_call(
    config: Config,
    strategy: tf.distribute.Strategy,
    splits: arrays.Splits | TimingBatch,
    *,
    jit_compile: bool,
    model_fn: ModelFunction | None = None,
    task: Task | None = None,
) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    """`loop_call(num_steps)`: the run's loop call on a model and optimizer of its own, fed the first
    global batch over and over (the input pipeline taken away), of the data's own structure; what
    `auto` and the bench time."""
    timing = TimingBatch.of(splits, config.batch_size)
    state = build_state(
        config,
        strategy,
        timing.input_shape,
        num_classes=timing.num_classes,
        model_fn=model_fn,
        task=task,
        sample=tf.nest.map_structure(lambda array: tf.constant(array[:2]), timing.batch),
    )

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        size = context.get_per_replica_batch_size(config.batch_size)
        start = context.input_pipeline_id * size
        replica_batch = tf.nest.map_structure(lambda array: array[start : start + size], timing.batch)
        return inputs.with_options(tf.data.Dataset.from_tensors(replica_batch).repeat())

    replica_input = inputs.ReplicaInput(strategy, dataset_fn)
    loop_call = loop_calls.make_input_loop_call(config, strategy, state, replica_input, jit_compile=jit_compile)
    return lambda num_steps: loop_call(num_steps, tf.constant(False))


def _block_steps(strategy: tf.distribute.Strategy, loop: Callable[[tf.Tensor], dict[str, tf.Tensor]]) -> int:
    """Traces and compiles `loop`, then sizes a timed block to about `_BLOCK_SECONDS`.

    The size is agreed over workers (from their summed step times): a worker that ran more steps
    than another would wait for it in a collective forever.
    """
    float(loop(tf.constant(1))["total"])
    started = time.perf_counter()
    float(loop(tf.constant(2))["total"])
    per_step = (time.perf_counter() - started) / 2
    [per_step] = mean_over_workers(strategy, [per_step])
    return int(np.clip(_BLOCK_SECONDS / max(per_step, 1e-6), 2, 500))
