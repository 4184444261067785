"""The bench's contenders: what each runs in a process of its own (Keras' `fit`, train_loop's
`train` in several settings, its step on a cached batch), timed at steady state, with the
process's peak memory; and the whole one-epoch run, timed both ways."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from train_loop.settings import TFRECORD_PREFIX

CONTENDERS = {
    "keras_fit": "Keras 3 fit, default (jit_compile auto)",
    "keras_fit_nojit": "Keras 3 fit, jit_compile=False",
    "train_loop": "train_loop, defaults (XLA auto)",
    "train_loop_xla": "train_loop --jit_compile",
    "train_loop_noxla": "train_loop --nojit_compile",
    "train_loop_1": "train_loop, 1 step per call",
    "train_loop_cached": "train_loop step, cached batch",
    "train_loop_quiet": "train_loop, no periodic summaries",
    "train_loop_streamed": "train_loop, streamed from TFRecords",
    "train_loop_accumulation": "train_loop --accumulation_steps=4",
}
QUICK = (
    "keras_fit",
    "keras_fit_nojit",
    "train_loop",
    "train_loop_xla",
    "train_loop_noxla",
    "train_loop_streamed",
    "train_loop_accumulation",
)
ACCUMULATION_STEPS = 4  # The accumulation row's K, against the default run's K = 1 (issue 20's target).
SHARDS = "shards"  # The folder, in the bench's, of the streamed row's TFRecord shards.


def bench_config(folder: str, *, batch_size: int, precision: str, **settings: Any):
    """The study's convnet with L2 0.001 on the bench's npz in `folder` (or, with a `dataset` in
    `settings`, on that): every contender's settings."""
    from train_loop.configs import Config

    return Config(
        **{"dataset": "fashion_mnist", **settings},
        data_dir=folder,
        l2=0.001,
        batch_size=batch_size,
        precision=precision,
        logdir=os.path.join(folder, "logs"),
    )


def run_worker(worker: str, *, folder: str, batch_size: int, precision: str, started: float) -> dict[str, Any]:
    """One contender in this process: its steady-state speed and this process's peak memory;
    `started` is when this process started, as near as its first module saw it."""
    from train_loop import startup

    startup.start_tensorflow()
    figures = {}

    def config(**settings: Any):
        return bench_config(folder, batch_size=batch_size, precision=precision, **settings)

    if worker.startswith("keras_fit"):
        speed, figures["jit_compile"] = _keras_fit_speed(
            config(), jit_compile="auto" if worker == "keras_fit" else False
        )
    elif worker == "train_loop_cached":
        speed = _cached_batch_speed(config())
    else:
        from train_loop.training.run import train

        settings = {
            "train_loop_1": {"steps_per_loop": 1},
            "train_loop": {},
            "train_loop_xla": {"jit_compile": True},
            "train_loop_noxla": {"jit_compile": False},
            "train_loop_quiet": {"summary_every": 10**9},
            # The same examples as the npz's, read from shards written once per bench run.
            "train_loop_streamed": {"dataset": TFRECORD_PREFIX + os.path.join(folder, SHARDS)},
            "train_loop_accumulation": {"accumulation_steps": ACCUMULATION_STEPS},
        }[worker]
        imported = time.perf_counter() - started
        result = train(config(run_name=worker, **settings))
        figures["seconds_to_first_step"] = imported + result["seconds_to_first_step"]
        figures["seconds"] = {"imports": imported, **result["seconds"]}
        figures["jit_compile"] = result["decided"]["jit_compile"]
        speed = result["examples_per_second"]
    figures["examples_per_second"] = speed
    figures["peak_rss_bytes"] = _peak_rss_bytes()
    return figures


def _peak_rss_bytes() -> int:
    """This process's high-water mark (VmHWM); getrusage would report the parent's, kept over exec."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _keras_fit_speed(config, jit_compile: bool | str) -> tuple[float, bool]:
    """What a Keras user runs instead: compile + fit on the same model, data and optimizer. Also
    whether Keras compiled with XLA: its "auto" decides at `compile` (Keras 3.15 turns XLA off on a
    machine with no accelerator)."""
    import keras

    from train_loop.data import sources
    from train_loop.model import models, optimizers

    splits = sources.load_splits(config)
    model = models.build_model(config, splits.x_train.shape[1:])
    model.compile(
        optimizer=optimizers.build_optimizer(config),
        metrics=["accuracy"],
        jit_compile=jit_compile,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    warm = 20 * config.batch_size
    model.fit(splits.x_train[:warm], splits.y_train[:warm], batch_size=config.batch_size, verbose=0)
    started = time.perf_counter()
    model.fit(splits.x_train[warm:], splits.y_train[warm:], batch_size=config.batch_size, verbose=0, shuffle=False)
    return (len(splits.x_train) - warm) / (time.perf_counter() - started), bool(model.jit_compile)


def _cached_batch_speed(config) -> float:
    """train_loop's step fed one cached batch, XLA as `auto` decides: the speed with the input
    pipeline taken away."""
    import tensorflow as tf

    from train_loop.data import sources
    from train_loop.training import distribute, xla_choice

    splits = sources.load_splits(config)
    strategy = distribute.make_strategy(config)  # The run's, so `auto` finds its cached choice.
    decision = xla_choice.decide_jit_compile(config, strategy, splits, None)
    loop = xla_choice.cached_batch_loop_call(config, strategy, splits, jit_compile=decision.jit_compile)
    num_steps = len(splits.x_train) // config.batch_size - 20
    loop(tf.constant(20))
    started = time.perf_counter()
    float(loop(tf.constant(num_steps))["total"])
    return num_steps * config.batch_size / (time.perf_counter() - started)


def time_whole_run(kind: str, folder: str) -> float:
    """Start to evaluated model, as a user times it: the study's one-epoch L2 run on Fashion-MNIST."""
    if kind == "train_loop":
        command = [
            sys.executable,
            "-m",
            "train_loop",
            "--dataset=fashion_mnist",
            "--l2=0.001",
            f"--logdir={os.path.join(folder, 'whole')}",
        ]
    else:
        command = [sys.executable, "-c", _KERAS_SCRIPT]
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True)
    return time.perf_counter() - started


# The study's script as a Keras user writes it (data read by train_loop's reader, since Keras'
# own loader downloads): compile, fit one epoch, evaluate.
_KERAS_SCRIPT = """
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
import keras
from train_loop.model import models
from train_loop.data import sources
from train_loop.configs import Config
config = Config(dataset="fashion_mnist", l2=0.001)
splits = sources.load_splits(config)
model = models.build_model(config, (28, 28, 1))
model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
model.fit(splits.x_train, splits.y_train, epochs=1, verbose=0)
model.evaluate(splits.x_test, splits.y_test, verbose=0)
"""
