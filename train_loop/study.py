"""`python -m train_loop.study`: the regularization study, one run per experiment in `flags/`.

Every experiment is a flagfile (`flags/<experiment>.cfg`, shipped in the package) trained with
the same `--extra_flags` and seed into `<logdir>/<study>/<experiment>`, one after another; finished runs are reused, so
a study stopped half-way picks up where it was. The table goes to `<study>/study.md` and stdout.

Each run folder is owned by the process training it (see `runs.owned`): a second study started
on the same folder reuses what the first has finished and stops, in one line naming the other
process, at the experiment the first is training; no experiment is trained twice.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.resources
import logging
import os
import pathlib
import shlex
from collections.abc import Sequence

from absl import flags

from train_loop import apps, cli, runs, startup
from train_loop.configs import Config
from train_loop.errors import UsageError

EXPERIMENTS = ("baseline", "dropout", "l1", "l2", "l1l2")
TABLE_FILE = "study.md"

_EXPERIMENTS = flags.DEFINE_list("experiments", list(EXPERIMENTS),
                                 "Experiments to run, in order: names of flagfiles in --flags_dir.")
_EXTRA_FLAGS = flags.DEFINE_string("extra_flags", "",
                                   "Training flags for every experiment, e.g. '--dataset=fashion_mnist --epochs=10'.")
_STUDY_NAME = flags.DEFINE_string("study_name", "",
                                  "Folder under --logdir; default study-<dataset>-<the settings the shared "
                                  "flags change>-<date>, e.g. study-fashion_mnist-epochs=10-2026-11-28. "
                                  "Reusing a name reuses its finished runs.")
_FLAGS_DIR = flags.DEFINE_string("flags_dir", "",
                                 "Folder holding the <experiment>.cfg flagfiles; default: the study's own, "
                                 "shipped in the package (the source's flags/ folder).")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {' '.join(argv[1:])!r}: every setting is a --flag=value.")
    # Training flags given to the study itself apply to every experiment, like --extra_flags.
    given = cli.given_training_flags()
    cli.run_guarded(lambda: study(
        _EXPERIMENTS.value, [*given, *shlex.split(_EXTRA_FLAGS.value)], logdir=cli.FLAGS.logdir,
        study_name=_STUDY_NAME.value, flags_dir=_FLAGS_DIR.value))


def study(experiments: Sequence[str], extra_flags: Sequence[str], *, logdir: str,
          study_name: str = "", flags_dir: str = "") -> str:
    """Trains each experiment not yet finished, then writes and prints the table.

    Every experiment's flags are checked before the first one trains, so a typo costs nothing.

    Returns:
      The study's folder.
    """
    configs = experiment_configs(experiments, extra_flags, flags_dir)
    folder = os.path.join(logdir, study_name or default_study_name(extra_flags))
    configs = {name: _in_folder(config, folder, name) for name, config in configs.items()}
    for config in configs.values():
        runs.check_same_settings(os.path.join(folder, config.run_name), config,
                                 fix="pass another --study_name, or the same flags to reuse it")

    first = next(iter(configs.values()))
    startup.start_tensorflow(first.cpu_replicas, first.strategy)
    from train_loop import loop, report

    logging.getLogger("tensorflow").addFilter(_ExpectedRetracing())

    for name, config in configs.items():
        run_dir = os.path.join(folder, name)
        if runs.is_finished(run_dir):
            runs.read_result(run_dir)  # A damaged one is refused now, not after the other experiments.
            print(f"{name}: reusing the finished run {run_dir}", flush=True)
        else:
            print(f"{name}: training", flush=True)
            loop.train(config)
    table = report.table([os.path.join(folder, name) for name in configs]).markdown()
    with open(os.path.join(folder, TABLE_FILE), "w") as stream:
        stream.write(table)
    print(f"\n{table}\nwritten to {os.path.join(folder, TABLE_FILE)}", flush=True)
    return folder


def experiment_configs(experiments: Sequence[str], extra_flags: Sequence[str],
                       flags_dir: str = "") -> dict[str, Config]:
    """Each experiment's flagfile (from `flags_dir`, or the package's own), then the extra flags,
    as a `Config`.

    Raises:
      UsageError: an unknown experiment, or none at all.
    """
    if not experiments:
        raise UsageError(f"--experiments is empty: name one or more of {', '.join(EXPERIMENTS)}.")
    # A user's folder or the package's own: both read through the same Traversable interface.
    folder = pathlib.Path(flags_dir) if flags_dir else importlib.resources.files("train_loop").joinpath("flags")
    configs = {}
    for name in experiments:
        # as_file: a real path for absl's --flagfile, even where the package is imported from a zip.
        with importlib.resources.as_file(folder.joinpath(f"{name}.cfg")) as path:
            if not path.is_file():
                known = sorted(entry.name[:-4] for entry in folder.iterdir() if entry.name.endswith(".cfg")) \
                    if folder.is_dir() else []
                raise UsageError(
                    f"--experiments: no flagfile {path} for {name!r}; known: {', '.join(known) or 'none'}.")
            configs[name] = cli.config_from_args([f"--flagfile={path}", *extra_flags])
    return configs


def default_study_name(extra_flags: Sequence[str]) -> str:
    """`study-<dataset>[-<model>][-<settings>]-<date>`: named by what the shared flags change, so
    a study with `--epochs=10` does not collide with the same study at 1 epoch on the same day."""
    shared = cli.config_from_args(extra_flags)
    model = [shared.model_name] if shared.model != Config().model else []
    changed = [part for part in shared.changed_settings() if not part.startswith("dataset=")]
    return "-".join(["study", shared.dataset_name, *model, *changed, datetime.date.today().isoformat()])


class _ExpectedRetracing(logging.Filter):
    """Drops TensorFlow's warning that a function "triggered tf.function retracing": each experiment
    builds its own model and so its own traced steps, traced once each, which TensorFlow counts
    as the same code retraced from the fifth experiment on. Nothing is retraced within a run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def _in_folder(config: Config, folder: str, name: str) -> Config:
    return dataclasses.replace(config, logdir=folder, run_name=name)


USAGE = """Usage: train-loop-study [--experiments=a,b] [training flags]   (or: python -m train_loop.study ...)

Trains the regularization study: one run per experiment flagfile (baseline, dropout, l1, l2,
l1l2), each with the training flags given here, then prints and saves the comparison table.
Example: train-loop-study --dataset=fashion_mnist --epochs=10
"""


def run() -> None:
    """The console script `train-loop-study` and `python -m train_loop.study`."""
    apps.run(main, usage=USAGE, flag_modules=[__name__, cli.__name__], flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
