"""The command line of `train-loop`: the training flags (`training_flags`) by group for --helpshort,
parsed into a `Config`; user errors become one line on stderr and exit status 2."""

from __future__ import annotations

import copy
import signal
import sys
from collections.abc import Callable, Sequence

from absl import flags

from train_loop import (
    apps,
    configs,
    errors,
    orphans,
    startup,
    training_flags,  # noqa: F401  Defines the flags that this module reads.
)

FLAGS = flags.FLAGS

# The training flags by purpose, for --helpshort; every flag of `Config` is in one group (tested).
GROUPS = {
    "data": ("dataset", "data_dir", "validation_split", "batch_size", "epochs", "seed"),
    "streamed data": ("input", "shuffle_buffer", "steps_per_epoch"),
    "model": ("model", "dropout"),
    "objective": ("loss", "metrics", "task"),
    "regularization": ("l1", "l2", "bias_l1", "bias_l2", "l2_exclude", "weight_decay", "weight_decay_exclude"),
    "checks": ("check_regularizers", "check_equivalence"),
    "optimizer": ("optimizer", "learning_rate", "global_clipnorm", "ema"),
    "schedule": ("lr_schedule", "lr_decay_steps", "lr_decay_rate", "warmup_steps"),
    "divergence": ("on_divergence", "divergence_lr_factor", "divergence_skip", "max_rollbacks"),
    "evaluation": ("eval_every", "best_metric", "early_stopping_patience", "early_stopping_min_delta"),
    "distribution and speed": (
        "strategy",
        "cpu_replicas",
        "cluster_resolver",
        "tpu",
        "precision",
        "jit_compile",
        "steps_per_loop",
        "deterministic",
        "accumulation_steps",
    ),
    "outputs": (
        "logdir",
        "run_name",
        "summary_every",
        "histogram_every",
        "checkpoint_every",
        "export",
        "profile_steps",
    ),
}


def given_training_flags() -> list[str]:
    """The training flags set on this command line, as `--name=value`: for tools (study, launch)
    whose command lines accept them and pass them on."""
    return [FLAGS[name].serialize() for name in configs.Config.__dataclass_fields__ if FLAGS[name].present]


def config_from_args(args: Sequence[str]) -> configs.Config:
    """A `Config` from command-line flags given as a list (flagfiles included), as if they were
    the only ones: every other flag is at its default. Bad flags exit as `apps.parse_flags` does.

    They are parsed into copies of the training flags, so absl's `FLAGS` (this process's own
    command line) is left as it was: a study that turns each experiment's flag lines into a
    `Config` does not leave the last experiment's settings in it.
    """
    values = flags.FlagValues()
    for name in configs.Config.__dataclass_fields__:
        values[name] = copy.deepcopy(FLAGS[name])
        values[name].unparse()
    apps.parse_flags(["train_loop", *args], flag_values=values)
    return _config(values)


def config_from_flags() -> configs.Config:
    """The `Config` of this command line's flags."""
    return _config(FLAGS)


def _config(values: flags.FlagValues) -> configs.Config:
    """Every flag that `Config` has, by name: the two lists cannot drift apart."""
    return configs.Config(**{field: values[field].value for field in configs.Config.__dataclass_fields__})


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        apps.fail(f"unexpected arguments {' '.join(argv[1:])!r}: every setting is a --flag=value.")

    def train_from_flags() -> None:
        config = config_from_flags()
        startup.start_tensorflow(config.cpu_replicas, config.strategy)
        from train_loop.training.run import train  # Deferred: --help should not wait for TensorFlow.

        train(config)

    run_guarded(train_from_flags)


def run_guarded(work: Callable[[], None]) -> None:
    """Runs `work`: a user error becomes one line and exit 2; a run stopped on purpose or by a fault
    (divergence 3, full disk 74, SIGTERM 143, SIGINT 130) one line and its own status.

    Ctrl-C outside the training loop (start-up, the final save) lands here as KeyboardInterrupt:
    every file is written through a temporary name, so the run is left as it was and resumes.
    """
    try:
        work()
    except errors.UsageError as error:
        apps.fail(str(error))
    except errors.RunStopped as stopped:
        print(f"train_loop: {'error: ' if stopped.is_error else ''}{stopped}", file=sys.stderr)
        sys.exit(stopped.exit_status)
    except KeyboardInterrupt:
        print(
            "train_loop: stopped by SIGINT outside the training loop; the same command resumes (or starts) the run.",
            file=sys.stderr,
        )
        sys.exit(128 + signal.SIGINT)


USAGE = """Usage: train-loop [--flag=value ...]   (or: python -m train_loop [--flag=value ...])

Trains one model and writes the run to <logdir>/<run_name>/: TensorBoard logs, checkpoints,
model.keras and result.json. Started again with the same flags, it resumes the run.
Flags may also come from a file: --flagfile=PATH, one --flag=value per line.
"""


def run() -> None:
    """The console script `train-loop` and `python -m train_loop`."""
    orphans.end_with_parent()  # A child of `jobs` stops (with a checkpoint) when its parent dies.
    # Ctrl-C means KeyboardInterrupt (see `run_guarded`) even in a worker that the launcher
    # started with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    apps.run(main, usage=USAGE, groups=GROUPS)
