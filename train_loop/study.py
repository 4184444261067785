"""`python -m train_loop.study`: the regularization study, one run per experiment in `flags/`.

Every experiment is a flagfile (`flags/<experiment>.cfg`) trained with the same `--extra_flags`
and seed into `<logdir>/<study>/<experiment>`, one after another; finished runs are reused, so
a study stopped half-way picks up where it was. The table goes to `<study>/study.md` and stdout.

Each run folder is owned by the process training it (see `runs.owned`): a second study started
on the same folder reuses what the first has finished and stops, in one line naming the other
process, at the experiment the first is training; no experiment is trained twice.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shlex
from collections.abc import Sequence

from absl import app, flags

from train_loop import cli, runs, startup
from train_loop.configs import Config
from train_loop.errors import UsageError

EXPERIMENTS = ("baseline", "dropout", "l1", "l2", "l1l2")
TABLE_FILE = "study.md"
_FLAGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flags")

_EXPERIMENTS = flags.DEFINE_list("experiments", list(EXPERIMENTS),
                                 "Experiments to run, in order: names of flagfiles in --flags_dir.")
_EXTRA_FLAGS = flags.DEFINE_string("extra_flags", "",
                                   "Training flags for every experiment, e.g. '--dataset=fashion_mnist --epochs=10'.")
_STUDY_NAME = flags.DEFINE_string("study_name", "",
                                  "Folder under --logdir; default study-<dataset>-<date>. Reusing a name "
                                  "reuses its finished runs.")
_FLAGS_DIR_FLAG = flags.DEFINE_string("flags_dir", _FLAGS_DIR, "Folder holding the <experiment>.cfg flagfiles.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {' '.join(argv[1:])!r}: every setting is a --flag=value.")
    # Training flags given to the study itself apply to every experiment, like --extra_flags.
    given = cli.given_training_flags()
    cli.run_guarded(lambda: study(
        _EXPERIMENTS.value, [*given, *shlex.split(_EXTRA_FLAGS.value)], logdir=cli.FLAGS.logdir,
        study_name=_STUDY_NAME.value, flags_dir=_FLAGS_DIR_FLAG.value))


def study(experiments: Sequence[str], extra_flags: Sequence[str], *, logdir: str,
          study_name: str = "", flags_dir: str = _FLAGS_DIR) -> str:
    """Trains each experiment not yet finished, then writes and prints the table.

    Every experiment's flags are checked before the first one trains, so a typo costs nothing.

    Returns:
      The study's folder.
    """
    configs = experiment_configs(experiments, extra_flags, flags_dir)
    dataset = next(iter(configs.values())).dataset_name
    folder = os.path.join(logdir, study_name or f"study-{dataset}-{datetime.date.today().isoformat()}")
    configs = {name: _in_folder(config, folder, name) for name, config in configs.items()}
    for config in configs.values():
        runs.check_same_settings(os.path.join(folder, config.run_name), config,
                                 fix="pass another --study_name, or the same flags to reuse it")

    first = next(iter(configs.values()))
    startup.start_tensorflow(first.cpu_replicas, first.strategy)
    from train_loop import loop, report, summaries

    summaries.write_study_experiment(folder)

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


def experiment_configs(experiments: Sequence[str], extra_flags: Sequence[str], flags_dir: str) -> dict[str, Config]:
    """Each experiment's flagfile, then the extra flags, as a `Config`.

    Raises:
      UsageError: an unknown experiment, or none at all.
    """
    if not experiments:
        raise UsageError(f"--experiments is empty: name one or more of {', '.join(EXPERIMENTS)}.")
    configs = {}
    for name in experiments:
        path = os.path.join(flags_dir, f"{name}.cfg")
        if not os.path.isfile(path):
            known = sorted(file[:-4] for file in os.listdir(flags_dir) if file.endswith(".cfg")) \
                if os.path.isdir(flags_dir) else []
            raise UsageError(f"--experiments: no flagfile {path} for {name!r}; known: {', '.join(known) or 'none'}.")
        configs[name] = cli.config_from_args([f"--flagfile={path}", *extra_flags])
    return configs


def _in_folder(config: Config, folder: str, name: str) -> Config:
    return dataclasses.replace(config, logdir=folder, run_name=name)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
