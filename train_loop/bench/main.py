"""`python -m train_loop.bench`: train_loop against Keras `model.fit`, side by side, with a roofline.

Each contender trains the study's convnet (L2 0.001) on the same data, batch and optimizer in a
process of its own, one after another, and reports its steady-state speed (the first call,
which traces, left out) and its peak resident memory. Keras runs at its default and with
`jit_compile=False`, train_loop with XLA, without, and at `auto` (which measures both here, in a
cache of the bench's own). Two rows are ratios to train_loop's default run, the speed targets of
issues 21 and 20: the same data streamed from TFRecord shards (written here, untimed), and
`--accumulation_steps=4`. The chip's matmul peak is the best over several sizes, with and
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
from typing import Any

from absl import flags

from train_loop import apps
from train_loop.bench import contenders, roofline, rounds, table
from train_loop.bench.contenders import CONTENDERS, QUICK

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
_STEPS = flags.DEFINE_integer(
    "steps", 600, "Training steps each contender times; with --quick, 100 unless given.", lower_bound=20
)
_QUICK = flags.DEFINE_bool("quick", False, "A smoke run under a minute: few steps, no whole-run timing.")
_ROUNDS = flags.DEFINE_integer(
    "rounds",
    None,
    "Rounds of every contender, run interleaved; each keeps its fastest round. Default: 1 with --quick, else 3.",
    lower_bound=1,
)
_CONTENDERS = flags.DEFINE_list(
    "contenders",
    None,
    f"The contenders to time, by name (keras_fit and train_loop, the baselines, among them); default: all, or with "
    f"--quick those the comparisons need. Names: {', '.join(CONTENDERS)}.",
)
flags.register_validator(
    "contenders",
    lambda names: names is None or (set(names) <= set(CONTENDERS) and {"keras_fit", "train_loop"} <= set(names)),
    message=f"--contenders takes names of {', '.join(CONTENDERS)}, keras_fit and train_loop among them",
)
_WHOLE_RUN = flags.DEFINE_bool("whole_run", True, "Also time the study's whole one-epoch L2 run both ways.")
# The bench's own child processes take these; under a module name of their own, --helpshort leaves them out.
_INTERNAL = "train_loop.bench, internal"
_WORKER = flags.DEFINE_string("worker", "", "Internal: run one contender and print its JSON.", module_name=_INTERNAL)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "Internal: the folder holding the benchmark's npz.", module_name=_INTERNAL
)


def main(argv: list[str]) -> None:
    del argv
    if _WORKER.value:
        worker = contenders.run_worker(
            _WORKER.value,
            folder=_DATA_DIR.value,
            batch_size=_BATCH_SIZE.value,
            precision=_PRECISION.value,
            started=_STARTED,
        )
        print(json.dumps(worker))
        return
    from train_loop import startup
    from train_loop.training import cpu, speed_cache

    startup.start_tensorflow()
    steps = 100 if _QUICK.value and not _STEPS.present else _STEPS.value
    # --quick times the contenders the comparisons need; the diagnostics are skipped.
    chosen = _CONTENDERS.value or (QUICK if _QUICK.value else list(CONTENDERS))
    with tempfile.TemporaryDirectory() as folder:
        # A cache of the bench's own: `auto` measures afresh, and the whole run below reuses it.
        os.environ[speed_cache.CACHE_ENV] = os.path.join(folder, "speed.json")
        dataset = _write_subset(folder, steps, shards="train_loop_streamed" in chosen)
        skipped = _skipped(chosen, dataset)
        timed = [name for name in chosen if name not in skipped]
        figures: dict[str, Any] = {
            "cpu": cpu.model(),
            "cpu_features": cpu.features(),
            "cores": os.cpu_count(),
            "dataset": dataset,
            "batch_size": _BATCH_SIZE.value,
            "precision": _PRECISION.value,
            "steps": steps,
            "skipped": skipped,
        }
        repeats = _ROUNDS.value or (1 if _QUICK.value else 3)
        figures["rounds"] = repeats
        figures.update(rounds.fastest_rounds(lambda: {name: _spawn(name, folder) for name in timed}, repeats))
        if _WHOLE_RUN.value and not _QUICK.value and dataset == "fashion_mnist":
            times = [
                {name: contenders.time_whole_run(name, folder) for name in ("keras", "train_loop")}
                for _ in range(repeats)
            ]
            figures["whole_run_seconds"] = {name: min(each[name] for each in times) for name in times[0]}
    config = contenders.bench_config("", batch_size=_BATCH_SIZE.value, precision=_PRECISION.value)
    figures.update(roofline.roofline(figures, config=config, quick=_QUICK.value))
    table.print_table(figures)
    print(json.dumps(figures))


def _skipped(chosen: list[str], dataset: str) -> dict[str, str]:
    """The chosen contenders this run cannot time, each with the reason the table gives."""
    skipped = {}
    if "train_loop_streamed" in chosen and dataset != "fashion_mnist":
        skipped["train_loop_streamed"] = (
            "it streams Fashion-MNIST, whose files are missing (apt-get install dataset-fashion-mnist)"
            if _DATASET.value == "fashion_mnist"
            else "it streams Fashion-MNIST, and --dataset=synthetic was given"
        )
    if "train_loop_accumulation" in chosen and _BATCH_SIZE.value % contenders.ACCUMULATION_STEPS:
        skipped["train_loop_accumulation"] = (
            f"--batch_size={_BATCH_SIZE.value} does not split into {contenders.ACCUMULATION_STEPS} micro-batches"
        )
    return skipped


def _write_subset(folder: str, steps: int, *, shards: bool) -> str:
    """The first `steps + warm-up` batches of the data set as an npz, so every contender sees the
    same; with `shards`, Fashion-MNIST's also as TFRecord shards (the streamed row's, written here
    so that writing them is not timed)."""
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
    subset = {
        "x_train": np.resize(to_bytes[0], (count, 28, 28)),
        "y_train": np.resize(splits.y_train, count),
        "x_test": to_bytes[1][:1000],
        "y_test": splits.y_test[:1000],
    }
    np.savez(os.path.join(folder, "fashion_mnist.npz"), **subset)
    if shards and dataset == "fashion_mnist":
        from train_loop.data import tfrecords

        for split in ("train", "test"):
            tfrecords.write_shards(
                os.path.join(folder, contenders.SHARDS),
                split,
                subset[f"x_{split}"],
                subset[f"y_{split}"],
                num_shards=4 if split == "train" else 1,
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


USAGE = """Usage: train-loop-bench [--quick] [--steps=N]   (or: python -m train_loop.bench ...)

Times train_loop against Keras model.fit on the same model and data, one process each, and
prints a table with the measured matmul peak of this machine. Takes several minutes.
"""


def run() -> None:
    """The console script `train-loop-bench` and `python -m train_loop.bench`."""
    apps.run(
        main,
        usage=USAGE,
        groups={"bench": ("quick", "contenders", "rounds", "steps", "whole_run", "dataset", "batch_size", "precision")},
    )
