"""`python -m train_loop.bench`: train_loop against Keras `model.fit`, side by side, with a roofline.

Each contender trains the study's convnet (L2 0.001) on the same data, batch and optimizer in a
process of its own, one after another, and reports its steady-state speed (the first call,
which traces, left out) and its peak resident memory. Keras runs at its default and with
`jit_compile=False`, train_loop with XLA, without, and at `auto` (which measures both here, in a
cache of the bench's own). The chip's matmul peak is the best over several sizes, with and
without XLA, measured in the same run, so utilization = achieved FLOP/s / measured peak. The
CPU's model and instruction sets head the table: on another CPU the answers differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from absl import flags

from train_loop import apps

_STARTED = time.perf_counter()  # As near the process's start as this module gets.

_DATASET = flags.DEFINE_enum(
    "dataset",
    "fashion_mnist",
    ["fashion_mnist", "synthetic"],
    "Data to train on; synthetic is used when Fashion-MNIST is missing.",
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Global batch size.", lower_bound=1)
_PRECISION = flags.DEFINE_enum(
    "precision", "float32", ["float32", "mixed_bfloat16", "mixed_float16"], "Precision of every contender."
)
_STEPS = flags.DEFINE_integer("steps", 600, "Training steps each contender times.", lower_bound=20)
_QUICK = flags.DEFINE_bool("quick", False, "A smoke run under a minute: few steps, no whole-run timing.")
_ROUNDS = flags.DEFINE_integer(
    "rounds",
    None,
    "Rounds of every contender, run interleaved; each keeps its fastest round. Default: 1 with --quick, else 3.",
    lower_bound=1,
)
_WHOLE_RUN = flags.DEFINE_bool("whole_run", True, "Also time the study's whole one-epoch L2 run both ways.")
# The bench's own child processes take these; under a module name of their own, --helpshort leaves them out.
_INTERNAL = "train_loop.bench, internal"
_WORKER = flags.DEFINE_string("worker", "", "Internal: run one contender and print its JSON.", module_name=_INTERNAL)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "Internal: the folder holding the benchmark's npz.", module_name=_INTERNAL
)

CONTENDERS = {
    "keras_fit": "Keras 3 fit, default (jit_compile auto)",
    "keras_fit_nojit": "Keras 3 fit, jit_compile=False",
    "train_loop": "train_loop, defaults (XLA auto)",
    "train_loop_xla": "train_loop --jit_compile",
    "train_loop_noxla": "train_loop --nojit_compile",
    "train_loop_1": "train_loop, 1 step per call",
    "train_loop_cached": "train_loop step, cached batch",
    "train_loop_quiet": "train_loop, no periodic summaries",
}
QUICK = ("keras_fit", "keras_fit_nojit", "train_loop", "train_loop_xla", "train_loop_noxla")


def main(argv: list[str]) -> None:
    del argv
    if _WORKER.value:
        print(json.dumps(_run_worker(_WORKER.value)))
        return
    from train_loop import startup
    from train_loop.training import cpu, speed_cache

    startup.start_tensorflow()
    steps = 100 if _QUICK.value else _STEPS.value
    # --quick times the contenders the comparisons need; the diagnostics are skipped.
    contenders = QUICK if _QUICK.value else list(CONTENDERS)
    with tempfile.TemporaryDirectory() as folder:
        # A cache of the bench's own: `auto` measures afresh, and the whole run below reuses it.
        os.environ[speed_cache.CACHE_ENV] = os.path.join(folder, "speed.json")
        dataset = _write_subset(folder, steps)
        figures: dict[str, Any] = {
            "cpu": cpu.model(),
            "cpu_features": cpu.features(),
            "cores": os.cpu_count(),
            "dataset": dataset,
            "batch_size": _BATCH_SIZE.value,
            "precision": _PRECISION.value,
            "steps": steps,
        }
        rounds = _ROUNDS.value or (1 if _QUICK.value else 3)
        figures["rounds"] = rounds
        figures.update(_fastest_rounds(lambda: {name: _spawn(name, folder) for name in contenders}, rounds))
        if _WHOLE_RUN.value and not _QUICK.value and dataset == "fashion_mnist":
            times = [{name: _time_whole_run(name, folder) for name in ("keras", "train_loop")} for _ in range(rounds)]
            figures["whole_run_seconds"] = {name: min(each[name] for each in times) for name in times[0]}
    figures.update(_roofline(figures))
    _print_table(figures)
    print(json.dumps(figures))


def _fastest_rounds(one_round: Callable[[], dict[str, dict[str, Any]]], rounds: int) -> dict[str, dict[str, Any]]:
    """Each contender's fastest of `rounds` interleaved rounds, with every round's speed under "rounds".

    On a shared virtual machine a process can run a quarter slower than the one before it for no
    reason of its own (BENCHMARKS.md); interleaving spreads such spells over the contenders, and
    the fastest round, as `timeit` takes the fastest repeat, is the one least disturbed.
    """
    runs = [one_round() for _ in range(rounds)]
    fastest = {}
    for name in runs[0]:
        speeds = [each[name]["examples_per_second"] for each in runs]
        fastest[name] = {**runs[speeds.index(max(speeds))][name], "rounds": speeds}
    return fastest


def _write_subset(folder: str, steps: int) -> str:
    """The first `steps + warm-up` batches of the data set as an npz, so every contender sees the same."""
    import numpy as np

    from train_loop.configs import Config
    from train_loop.data import arrays, sources

    try:
        splits = sources.load_splits(Config(dataset=_DATASET.value))
        dataset = _DATASET.value
    except arrays.DataError:
        splits, dataset = sources.load_splits(Config(dataset="synthetic")), "synthetic"
    count = (steps + 20) * _BATCH_SIZE.value
    to_bytes = [(array[..., 0] * 255).round().astype(np.uint8) for array in (splits.x_train, splits.x_test)]
    np.savez(
        os.path.join(folder, "fashion_mnist.npz"),
        x_train=np.resize(to_bytes[0], (count, 28, 28)),
        y_train=np.resize(splits.y_train, count),
        x_test=to_bytes[1][:1000],
        y_test=splits.y_test[:1000],
    )
    return dataset


def _spawn(worker: str, folder: str) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "train_loop.bench",
        f"--worker={worker}",
        f"--data_dir={folder}",
        f"--batch_size={_BATCH_SIZE.value}",
        f"--precision={_PRECISION.value}",
    ]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode:
        raise SystemExit(f"bench: {worker} failed:\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def _config(folder: str, **settings: Any):
    from train_loop.configs import Config

    return Config(
        dataset="fashion_mnist",
        data_dir=folder,
        l2=0.001,
        batch_size=_BATCH_SIZE.value,
        precision=_PRECISION.value,
        logdir=os.path.join(folder, "logs"),
        **settings,
    )


def _run_worker(worker: str) -> dict[str, Any]:
    """One contender in this process: its steady-state speed and this process's peak memory."""
    from train_loop import startup

    startup.start_tensorflow()
    folder, figures = _DATA_DIR.value, {}
    if worker.startswith("keras_fit"):
        speed, figures["jit_compile"] = _keras_fit_speed(
            _config(folder), jit_compile="auto" if worker == "keras_fit" else False
        )
    elif worker == "train_loop_cached":
        speed = _cached_batch_speed(_config(folder))
    else:
        from train_loop.training.run import train

        settings = {
            "train_loop_1": {"steps_per_loop": 1},
            "train_loop": {},
            "train_loop_xla": {"jit_compile": True},
            "train_loop_noxla": {"jit_compile": False},
            "train_loop_quiet": {"summary_every": 10**9},
        }[worker]
        imported = time.perf_counter() - _STARTED
        result = train(_config(folder, run_name=worker, **settings))
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


def _time_whole_run(kind: str, folder: str) -> float:
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


def _training_flops_per_example(model) -> int:
    """Forward plus backward FLOPs of one example through `model`'s weighted layers, read from the
    built layers: each output element of a layer takes one multiply-add per kernel entry that feeds
    it (a `Conv2D`'s window, a `Dense` layer's inputs).

    Forward: 2 FLOPs per multiply-add. Backward: the gradient of the weights costs as much again,
    and the gradient of the layer's input too, except for the first layer, whose input needs none.
    """
    import math

    from train_loop.model import models

    forward = [
        2 * math.prod(layer.output.shape[1:-1]) * math.prod(layer.kernel.shape)
        for _, layer in models.weighted_layers(model)
    ]
    return sum(forward) + sum(2 * flops for flops in forward) - forward[0]


def _roofline(figures: dict[str, Any]) -> dict[str, Any]:
    """Achieved FLOP/s of the default train_loop, the measured matmul peaks, and their ratio."""
    import tensorflow as tf

    from train_loop.model import models

    flops = _training_flops_per_example(models.build_model(_config(""), (28, 28, 1)))
    achieved = flops * figures["train_loop"]["examples_per_second"]
    sizes = (512, 1024) if _QUICK.value else (512, 1024, 2048, 4096)
    peaks = {"float32": _matmul_peak(tf.float32, sizes)}
    if _has_bfloat16_matmul(tf):
        peaks["bfloat16"] = _matmul_peak(tf.bfloat16, sizes)
    compute = "bfloat16" if _PRECISION.value == "mixed_bfloat16" and "bfloat16" in peaks else "float32"
    return {
        "training_flops_per_example": flops,
        "achieved_flops_per_second": achieved,
        "peak_flops_per_second": peaks,
        "utilization": achieved / peaks[compute],
    }


def _matmul_peak(dtype, sizes: tuple[int, ...], repeats: int = 8) -> float:
    """The best FLOP/s of square matmul chains over `sizes`, compiled by XLA and not (the step
    may run either way, and either may be the faster library on a CPU): a peak never read low."""
    import tensorflow as tf

    best = 0.0
    for size in sizes:
        a = tf.cast(tf.random.uniform([size, size], dtype=tf.float32), dtype)
        for jit_compile in (True, False):

            @tf.function(jit_compile=jit_compile)
            def chain(x, a=a):
                for _ in range(repeats):
                    x = tf.matmul(x, a) * tf.constant(1e-3, dtype)
                return x

            float(tf.reduce_sum(tf.cast(chain(a), tf.float32)))
            for _ in range(2):
                started = time.perf_counter()
                float(tf.reduce_sum(tf.cast(chain(a), tf.float32)))
                best = max(best, 2 * size**3 * repeats / (time.perf_counter() - started))
    return best


def _has_bfloat16_matmul(tf) -> bool:
    """True where bfloat16 matmuls run natively: a GPU or TPU, or a CPU with AMX or AVX-512 bf16."""
    from train_loop.training import cpu

    if tf.config.list_physical_devices("GPU"):
        return True
    return bool({"amx_bf16", "avx512_bf16"} & set(cpu.features()))


def _print_table(figures: dict[str, Any]) -> None:
    keras_speed = figures["keras_fit"]["examples_per_second"]
    keras_best = max(keras_speed, figures["keras_fit_nojit"]["examples_per_second"])
    print(
        f"\n{figures['cpu']} ({', '.join(figures['cpu_features']) or 'no AVX2'}), {figures['cores']} cores; "
        f"{figures['dataset']}, batch {figures['batch_size']}, {figures['precision']}, "
        f"{figures['steps']} timed steps each, fastest of {figures['rounds']} interleaved round(s)"
    )
    print(f"| {'contender':36} | examples/s | vs Keras default | vs Keras best | peak RSS |")
    print(f"|{'-' * 38}|-----------:|-----------------:|--------------:|---------:|")
    for name, title in CONTENDERS.items():
        if name not in figures:
            continue
        if name == "keras_fit":
            title = f"Keras 3 fit, default (chose XLA {'on' if figures[name]['jit_compile'] else 'off'})"
        speed = figures[name]["examples_per_second"]
        print(
            f"| {title:36} | {speed:10,.0f} | {speed / keras_speed:15.2f}x | {speed / keras_best:12.2f}x | "
            f"{figures[name]['peak_rss_bytes'] / 2**30:6.2f} GB |"
        )
    if figures["rounds"] > 1:
        shortfalls = [
            1 - min(figures[name]["rounds"]) / max(figures[name]["rounds"]) for name in CONTENDERS if name in figures
        ]
        print(
            f"each contender's slowest round ran {100 * min(shortfalls):.0f}-{100 * max(shortfalls):.0f}% below "
            "its fastest: this machine's noise between processes"
        )
    default = figures["train_loop"]
    xla, no_xla = (figures[name]["examples_per_second"] for name in ("train_loop_xla", "train_loop_noxla"))
    print(
        f"auto chose XLA {'on' if default['jit_compile'] else 'off'}; the forced runs found XLA "
        f"{'on' if xla > no_xla else 'off'} faster ({max(xla, no_xla):,.0f} vs {min(xla, no_xla):,.0f} examples/s); "
        f"auto's own run: {default['examples_per_second'] / max(xla, no_xla):.2f}x the faster"
    )
    print(
        "time to the first training step (process start, imports, data, tracing): "
        f"{default['seconds_to_first_step']:.1f} s; the default run's phases: "
        + ", ".join(f"{name} {value:.2f} s" for name, value in default["seconds"].items())
    )
    seconds = default["seconds"]
    print(
        f"summaries and histograms at the default cadence: {100 * seconds['summaries'] / seconds['training']:.1f}% "
        "of training time"
    )
    if "train_loop_quiet" in figures:
        quiet = figures["train_loop_quiet"]["examples_per_second"]
        cached = figures["train_loop_cached"]["examples_per_second"]
        speed = default["examples_per_second"]
        print(
            f"summaries + histograms cost {100 * (quiet / speed - 1):.1f}% of training time; "
            f"the input pipeline {100 * (cached / speed - 1):.1f}%"
        )
    print(
        f"training FLOPs per example {figures['training_flops_per_example'] / 1e6:.1f} M; achieved "
        f"{figures['achieved_flops_per_second'] / 1e9:.1f} GFLOP/s; measured matmul peak "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in figures["peak_flops_per_second"].items())
        + f"; utilization {100 * figures['utilization']:.0f}%"
    )
    if "whole_run_seconds" in figures:
        whole = figures["whole_run_seconds"]
        print(
            f"whole one-epoch L2 run: Keras script {whole['keras']:.1f} s, python -m train_loop "
            f"{whole['train_loop']:.1f} s ({whole['keras'] / whole['train_loop']:.2f}x)"
        )


USAGE = """Usage: train-loop-bench [--quick] [--steps=N]   (or: python -m train_loop.bench ...)

Times train_loop against Keras model.fit on the same model and data, one process each, and
prints a table with the measured matmul peak of this machine. Takes several minutes.
"""


def run() -> None:
    """The console script `train-loop-bench` and `python -m train_loop.bench`."""
    apps.run(
        main,
        usage=USAGE,
        groups={"bench": ("quick", "rounds", "steps", "whole_run", "dataset", "batch_size", "precision")},
    )


if __name__ == "__main__":
    run()
