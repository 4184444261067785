"""Records what a checkout's runs write, to show that a change of structure changed no number.

    python tests/same_outputs.py record CHECKOUT OUT.json   # trains the runs below with CHECKOUT's code
    python tests/same_outputs.py read LOGDIR OUT.json       # the same, for runs already trained
    python tests/same_outputs.py check BEFORE.json AFTER.json

It trains a digits run, a Fashion-MNIST run (when Debian's files are there), a two-replica run
and a two-experiment study, each with a fixed seed, XLA off and op determinism on, then keeps
every number of each `result.json` and every scalar of its event files, read back by
TensorBoard's loader, except those that measure time. `check` prints each difference and exits 1
when there is one. Not a test: it takes minutes and compares two checkouts.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile

# Seconds and speeds differ between any two runs; nothing else may.
_TIMED = ("seconds", "examples_per_second", "seconds_to_first_step", "decided")
_COMMON = ("--jit_compile=false", "--deterministic", "--seed=3", "--export=none")
_RUNS = {
    "digits": ("--dataset=digits", "--epochs=2", "--l2=0.001", "--summary_every=10", "--histogram_every=20"),
    "digits-features": (
        "--dataset=digits",
        "--epochs=2",
        "--l1=1e-4",
        "--dropout=0.2",
        "--ema=0.9",
        "--best_metric=validation/accuracy",
        "--global_clipnorm=1.0",
        "--lr_schedule=cosine",
        "--lr_decay_steps=80",
        "--warmup_steps=5",
        "--weight_decay=1e-4",
        "--eval_every=20",
    ),
    "two-replicas": ("--dataset=digits", "--epochs=1", "--l2=0.001", "--strategy=mirrored", "--cpu_replicas=2"),
    "fashion_mnist": ("--dataset=fashion_mnist", "--epochs=1", "--l2=0.001"),
}
_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def record(checkout: str, out: str) -> None:
    logdir = tempfile.mkdtemp(prefix="same-outputs-")
    env = {**os.environ, "PYTHONPATH": checkout, "TRAIN_LOOP_OFFLINE": "1", "TRAIN_LOOP_CACHE": "off"}
    for name, flags in _RUNS.items():
        if name == "fashion_mnist" and not os.path.isdir(_FASHION_MNIST):
            continue
        _run(
            [sys.executable, "-m", "train_loop", f"--logdir={logdir}", f"--run_name={name}", *_COMMON, *flags],
            checkout,
            env,
        )
    _run(
        [
            sys.executable,
            "-m",
            "train_loop.study",
            f"--logdir={logdir}",
            "--study_name=study",
            "--experiments=baseline,l2",
            f"--extra_flags=--dataset=digits --epochs=1 {' '.join(_COMMON)}",
        ],
        checkout,
        env,
    )
    read(logdir, out)


def read(logdir: str, out: str) -> None:
    """Keeps the numbers of every run under `logdir` in `out`."""
    runs = sorted(
        os.path.dirname(path) for path in glob.glob(os.path.join(logdir, "**", "result.json"), recursive=True)
    )
    outputs = {
        os.path.relpath(run, logdir): {
            "result": _untimed(_read(os.path.join(run, "result.json"))),
            "scalars": _scalars(run),
        }
        for run in runs
    }
    with open(out, "w") as stream:
        json.dump(outputs, stream, indent=1, sort_keys=True)
    print(f"{len(outputs)} runs recorded in {out} (from {logdir})")


def _run(command: list[str], cwd: str, env: dict[str, str]) -> None:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def _read(path: str) -> dict:
    with open(path) as stream:
        return json.load(stream)


def _untimed(result: dict) -> dict:
    return {key: value for key, value in result.items() if key not in _TIMED}


def _scalars(run_dir: str) -> dict[str, dict[str, float]]:
    """Every scalar of every writer under `run_dir`, as "<writer>/<tag>" -> {step: value}."""
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    scalars = {}
    for writer in ("train", "validation", "test"):
        folder = os.path.join(run_dir, writer)
        if not os.path.isdir(folder):
            continue
        accumulator = event_accumulator.EventAccumulator(folder, size_guidance={event_accumulator.TENSORS: 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["tensors"]:
            if tag == "examples_per_second":
                continue
            events = accumulator.Tensors(tag)
            first = tf.make_ndarray(events[0].tensor_proto) if events else None
            if first is not None and first.ndim == 0 and first.dtype.kind == "f":
                scalars[f"{writer}/{tag}"] = {
                    str(event.step): float(tf.make_ndarray(event.tensor_proto)) for event in events
                }
    return scalars


def check(before_path: str, after_path: str) -> None:
    before, after = _read(before_path), _read(after_path)
    differences = list(_differences(before, after, ""))
    for difference in differences:
        print(difference)
    print(f"{len(differences)} difference(s) in {len(before)} runs")
    sys.exit(1 if differences else 0)


def _differences(before: object, after: object, where: str):
    if isinstance(before, dict) and isinstance(after, dict):
        for key in sorted(set(before) | set(after)):
            if key not in before or key not in after:
                yield f"{where}/{key}: only {'after' if key in after else 'before'}"
            else:
                yield from _differences(before[key], after[key], f"{where}/{key}")
    elif before != after:
        yield f"{where}: {before!r} -> {after!r}"


if __name__ == "__main__":
    {"record": record, "read": read, "check": check}[sys.argv[1]](*sys.argv[2:])
