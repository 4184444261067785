"""`python -m train_loop.study`: the regularization study, one run per experiment in `flags/`
and seed, plus one per strength of a sweep.

Every experiment is a flagfile (`flags/<experiment>.cfg`, shipped in the package) trained with
the same `--extra_flags` into `<logdir>/<study>/<experiment>` (`<experiment>-seed=<seed>` with
`--seeds`), one after another or `--jobs` at a time; finished runs are reused, so a study
stopped half-way picks up where it was. What the runs show goes to `<study>/study.md` (see
`writeup`) with figures beside it (see `figures`), and to stdout.

Each run folder is owned by the process training it (see `runs.owned`): a second study started
on the same folder reuses what the first has finished and stops, in one line naming the other
process, at the experiment the first is training; no experiment is trained twice.
"""

from __future__ import annotations

import datetime
import logging
import os
import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING

from absl import flags

from train_loop import apps, cli, startup
from train_loop.configs import Config
from train_loop.errors import UsageError
from train_loop.outputs import runs
from train_loop.study import plans
from train_loop.study.jobs import train_all

if TYPE_CHECKING:
    from train_loop.study import conclusions

TABLE_FILE = "study.md"

_EXPERIMENTS = flags.DEFINE_list(
    "experiments",
    list(plans.EXPERIMENTS),
    "Experiments to run, in order: names of flagfiles in --flags_dir. The first is "
    "the reference: the others are compared with it, and --sweep varies it.",
)
_EXTRA_FLAGS = flags.DEFINE_string(
    "extra_flags", "", "Training flags for every experiment, e.g. '--dataset=fashion_mnist --epochs=10'."
)
_STUDY_NAME = flags.DEFINE_string(
    "study_name",
    "",
    "Folder under --logdir; default study-<dataset>-<the settings the shared "
    "flags change>-<date>, e.g. study-fashion_mnist-epochs=10-2026-11-28. "
    "Reusing a name reuses its finished runs.",
)
apps.require_utf8(_STUDY_NAME.name)
_FLAGS_DIR = flags.DEFINE_string(
    "flags_dir",
    "",
    "Folder holding the <experiment>.cfg flagfiles; default: the study's own, "
    "shipped in the package (the source's flags/ folder).",
)
_SEEDS = flags.DEFINE_list(
    plans.SEEDS_FLAG,
    None,
    "Seeds to train every experiment with, e.g. 0,1,2: the table gives mean ± standard "
    "deviation and which differences from the reference exceed the seed-to-seed spread. "
    "Runs are then named <experiment>-seed=<seed>. Default: the one --seed.",
)
_SWEEP = flags.DEFINE_string(
    "sweep",
    "",
    f"FLAG=V1,V2,...: one more experiment per strength on top of the reference, FLAG "
    f"one of {', '.join(plans.SWEEPABLE)}, e.g. --sweep=l2=1e-5,1e-4,1e-3; study.md "
    "then has the regularization path.",
)
_JOBS = flags.DEFINE_integer(
    "jobs",
    1,
    "Trainings at once, each a process of its own with its share of the cores; 1: one after another, in this process.",
    lower_bound=1,
)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        apps.fail(f"unexpected arguments {' '.join(argv[1:])!r}: every setting is a --flag=value.")
    # Training flags given to the study itself apply to every experiment, like --extra_flags.
    given = cli.given_training_flags()
    cli.run_guarded(
        lambda: study(
            _EXPERIMENTS.value,
            [*given, *shlex.split(_EXTRA_FLAGS.value)],
            logdir=cli.FLAGS.logdir,
            study_name=_STUDY_NAME.value,
            flags_dir=_FLAGS_DIR.value,
            seeds=plans.parse_seeds(_SEEDS.value),
            sweep=plans.parse_sweep(_SWEEP.value),
            jobs=_JOBS.value,
        )
    )


def study(
    experiments: Sequence[str],
    extra_flags: Sequence[str],
    *,
    logdir: str,
    study_name: str = "",
    flags_dir: str = "",
    seeds: Sequence[int] | None = None,
    sweep: plans.Sweep | None = None,
    jobs: int = 1,
) -> str:
    """Trains each run not yet finished, then writes `study.md` and its figures and prints the tables.

    Every run's flags are checked before the first one trains, so a typo costs nothing.

    Returns:
      The study's folder.
    """
    plan, configs = _plan(
        experiments, extra_flags, logdir=logdir, study_name=study_name, flags_dir=flags_dir, seeds=seeds, sweep=sweep
    )
    first = next(iter(configs.values()))
    startup.start_tensorflow(first.cpu_replicas, first.strategy)
    from train_loop.outputs import experiment
    from train_loop.study import report

    logging.getLogger("tensorflow").addFilter(_ExpectedRetracing())
    pending = [run for run in plan.runs if not _reused(os.path.join(plan.folder, run.run_name))]
    if jobs > 1:
        train_all([(run.run_name, run.args) for run in pending], jobs=jobs)
        if pending:
            # Runs that started side by side may each have written the folder's HParams experiment: one stays.
            experiment.write_logdir_experiment(os.path.join(plan.folder, pending[-1].run_name))
    else:
        _train_here([configs[run.run_name] for run in pending])
    numbers = {
        name: {seed: report.read_run(run_dir) for seed, run_dir in by_seed.items()}
        for name, by_seed in plan.run_dirs().items()
    }
    _write_findings(plan, numbers)
    return plan.folder


def _plan(
    experiments: Sequence[str],
    extra_flags: Sequence[str],
    *,
    logdir: str,
    study_name: str,
    flags_dir: str,
    seeds: Sequence[int] | None,
    sweep: plans.Sweep | None,
) -> tuple[plans.Plan, dict[str, Config]]:
    """The study's runs and each one's `Config`, checked against what its folder already holds.

    Raises:
      UsageError: a bad flag in any run, --seed beside --seeds, a sweep value the reference has,
        no validation split to select by, or a folder whose run has other settings.
    """
    if seeds is not None and any(flag.startswith("--seed=") for flag in extra_flags):
        raise UsageError("--seed and --seeds both given: --seeds=0,1,2 sets every run's seed; leave --seed out.")
    flags_by_experiment = plans.experiment_flags(experiments, extra_flags, flags_dir)
    reference = cli.config_from_args(next(iter(flags_by_experiment.values())))
    folder = os.path.join(logdir, study_name or default_study_name(extra_flags))
    strength = getattr(reference, sweep.flag) if sweep else 0.0
    if sweep and strength in sweep.values:
        raise UsageError(
            f"--sweep: {sweep.flag}={strength:g} is the reference's own strength ({experiments[0]} has "
            "it), which the path already holds: leave it out of --sweep."
        )
    plan = plans.make_plan(flags_by_experiment, folder=folder, seeds=seeds, sweep=sweep, reference_strength=strength)
    configs = {run.run_name: cli.config_from_args(run.args) for run in plan.runs}
    for name, config in configs.items():
        if not config.validation_split:
            raise UsageError(
                f"{name}: --validation_split=0 holds nothing out, and the study ranks its experiments "
                "on the validation split (never the test split): leave --validation_split at 0.1."
            )
        runs.check_same_settings(
            os.path.join(plan.folder, name), config, fix="pass another --study_name, or the same flags to reuse it"
        )
    return plan, configs


def _reused(run_dir: str) -> bool:
    """Whether the run is finished; a damaged one is refused now, not after the others trained."""
    if not runs.is_finished(run_dir):
        return False
    runs.read_result(run_dir)
    print(f"{os.path.basename(run_dir)}: reusing the finished run {run_dir}", flush=True)
    return True


def _train_here(configs: Sequence[Config]) -> None:
    from train_loop.training.run import train

    for config in configs:
        print(f"{config.run_name}: training", flush=True)
        train(config)


def _write_findings(plan: plans.Plan, numbers: conclusions.Numbers) -> None:
    """`study.md` and the figures beside it; without matplotlib, the tables and one line saying so."""
    from train_loop.outputs.stderr import warn
    from train_loop.study import writeup  # Deferred with TensorFlow, which it needs: --help should not wait.

    try:
        from train_loop.study import figures
    except ImportError as missing:
        if missing.name != "matplotlib":
            raise
        warn(
            "matplotlib is not installed, so study.md has no figures: pip install 'train_loop[study]' and "
            "run the study again (it reuses every run) to draw them."
        )
        drawn = []
    else:
        drawn = figures.draw_all(plan, numbers)
    findings = writeup.markdown(plan, numbers, drawn)
    with open(os.path.join(plan.folder, TABLE_FILE), "w") as stream:
        stream.write(findings)
    print(f"\n{findings}\nwritten to {os.path.join(plan.folder, TABLE_FILE)}", flush=True)


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


USAGE = """Usage: train-loop-study [--experiments=a,b] [--seeds=0,1,2] [--sweep=l2=1e-4,1e-3] [--jobs=N]
       [training flags]   (or: python -m train_loop.study ...)

Trains the regularization study: one run per experiment flagfile (baseline, dropout, l1, l2,
l1l2) and seed, each with the training flags given here, then writes study.md (mean ± std over
seeds, differences from the baseline and the findings in sentences, the best by validation
cross-entropy) and its figures.
Example: train-loop-study --dataset=fashion_mnist --epochs=10 --seeds=0,1,2
"""


def run() -> None:
    """The console script `train-loop-study` and `python -m train_loop.study`."""
    apps.run(
        main,
        usage=USAGE,
        groups={
            "study": ("experiments", "seeds", "sweep", "extra_flags", "study_name", "flags_dir", "jobs"),
            **cli.GROUPS,
        },
    )
