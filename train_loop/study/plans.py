"""The study's plan: which runs `--experiments`, `--seeds` and `--sweep` make, each as the
training flags that make it, so one run is trained the same in this process or in another."""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import pathlib
from collections.abc import Sequence

from train_loop import configs, settings
from train_loop.errors import UsageError

EXPERIMENTS = ("baseline", "dropout", "l1", "l2", "l1l2")  # The study's own flagfiles, in flags/.
# The strengths a sweep may vary: the regularizers the study is about (bias factors aside).
SWEEPABLE = ("l1", "l2", "dropout", "weight_decay")
SEEDS_FLAG = "seeds"  # The study's flag of several seeds, named where a one-seed study says it would help.


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One flag and the strengths to try it at, each an experiment on top of the reference."""

    flag: str
    values: tuple[float, ...]

    def experiment(self, reference: str, value: float) -> str:
        return f"{reference}-{self.flag}={value:g}"


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One training of the study: an experiment at a seed, and the flags that train it."""

    experiment: str
    seed: int
    run_name: str
    args: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every run of a study. The first experiment is the reference: the others are compared with
    it seed by seed, and a sweep varies it."""

    folder: str
    experiments: tuple[str, ...]
    seeds: tuple[int, ...]
    sweep: Sweep | None
    runs: tuple[PlannedRun, ...]
    reference_strength: float = 0.0  # The swept flag's value in the reference: the path's first point.

    @property
    def reference(self) -> str:
        return self.experiments[0]

    def run_dirs(self) -> dict[str, dict[int, str]]:
        """Run folders by experiment, then seed."""
        found: dict[str, dict[int, str]] = {name: {} for name in self.experiments}
        for run in self.runs:
            found[run.experiment][run.seed] = os.path.join(self.folder, run.run_name)
        return found

    def sweep_experiments(self) -> dict[str, float]:
        """The sweep's experiments by name, with the strength each one sets."""
        if self.sweep is None:
            return {}
        return {self.sweep.experiment(self.reference, value): value for value in self.sweep.values}


def make_plan(
    experiment_flags: dict[str, Sequence[str]],
    *,
    folder: str,
    seeds: Sequence[int] | None,
    sweep: Sweep | None,
    reference_strength: float = 0.0,
) -> Plan:
    """The runs, seed by seed (every experiment at the first seed, then at the next), so that a
    study stopped early has whole seeds to compare.

    Args:
      experiment_flags: each experiment's training flags, the reference first.
      folder: the study's folder, made absolute here (as `Config` makes its logdir) so that a model
        function that changes the working folder moves neither the later runs nor `study.md`.
      seeds: `--seeds`, or None for the one seed the flags give; run folders are then named by
        experiment alone, as a study before `--seeds` named them.
    """
    folder = os.path.abspath(folder)
    experiments = dict(experiment_flags)
    reference = next(iter(experiments))
    for value in sweep.values if sweep else ():
        experiments[sweep.experiment(reference, value)] = [*experiments[reference], f"--{sweep.flag}={value!r}"]
    runs = []
    for seed in seeds or [None]:
        for name, flags in experiments.items():
            run_name = name if seed is None else f"{name}-seed={seed}"
            seed_flag = [] if seed is None else [f"--seed={seed}"]
            runs.append(
                PlannedRun(name, seed, run_name, (*flags, *seed_flag, f"--logdir={folder}", f"--run_name={run_name}"))
            )
    return Plan(folder, tuple(experiments), tuple(seeds or [None]), sweep, tuple(runs), reference_strength)


def experiment_flags(
    experiments: Sequence[str], extra_flags: Sequence[str], flags_dir: str = ""
) -> dict[str, list[str]]:
    """Each experiment's training flags: its flagfile (from `flags_dir`, or the package's own),
    then the extra flags.

    Raises:
      UsageError: an unknown experiment, or none at all.
    """
    if not experiments:
        raise UsageError(f"--experiments is empty: name one or more of {', '.join(EXPERIMENTS)}.")
    if len(set(experiments)) != len(experiments):
        raise UsageError(f"--experiments={','.join(experiments)} names an experiment twice: name each once.")
    # A user's folder or the package's own: both read through the same Traversable interface.
    folder = pathlib.Path(flags_dir) if flags_dir else importlib.resources.files("train_loop").joinpath("flags")
    found = {}
    for name in experiments:
        # as_file: a real path for absl's --flagfile (the package's own folder is one, see pyproject.toml).
        with importlib.resources.as_file(folder.joinpath(f"{name}.cfg")) as path:
            if not path.is_file():
                known = (
                    sorted(entry.name[:-4] for entry in folder.iterdir() if entry.name.endswith(".cfg"))
                    if folder.is_dir()
                    else []
                )
                raise UsageError(
                    f"--experiments: no flagfile {path} for {name!r}; known: {', '.join(known) or 'none'}."
                )
            found[name] = [f"--flagfile={path}", *extra_flags]
    return found


def parse_seeds(values: Sequence[str] | None) -> list[int] | None:
    """`--seeds=0,1,2` as integers; None when the flag was not given.

    Raises:
      UsageError: empty, not integers, repeated, or outside the seeds' range.
    """
    if values is None:
        return None
    fix = "give distinct integers, e.g. --seeds=0,1,2"
    if not values:
        raise UsageError(f"--seeds is empty: {fix}.")
    try:
        seeds = [int(value) for value in values]
    except ValueError:
        raise UsageError(f"--seeds={','.join(values)} holds a value that is not an integer: {fix}.") from None
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds={','.join(values)} repeats a seed, which would train the same run twice: {fix}.")
    if not all(0 <= seed <= settings.MAX_SEED for seed in seeds):
        raise UsageError(f"--seeds={','.join(values)}: every seed must be in [0, {settings.MAX_SEED}].")
    return seeds


def parse_sweep(text: str) -> Sweep | None:
    """`--sweep=l2=1e-5,1e-4` as a Sweep; None for an empty flag.

    Raises:
      UsageError: no `flag=values` form, a flag that is not one of SWEEPABLE, no values, values
        that are not numbers, repeated, negative, or (for dropout) 1 or more.
    """
    if not text:
        return None
    flag, equals, listed = text.partition("=")
    fix = f"give --sweep=FLAG=V1,V2,... with FLAG one of {', '.join(SWEEPABLE)}, e.g. --sweep=l2=1e-5,1e-4,1e-3"
    if not equals:
        raise UsageError(f"--sweep={text!r} has no '=': {fix}.")
    if flag not in SWEEPABLE:
        known = (
            "a training flag that is not a strength"
            if flag in configs.Config.__dataclass_fields__
            else "not a training flag"
        )
        raise UsageError(f"--sweep: {flag!r} cannot be swept ({known}): {fix}.")
    values = [value.strip() for value in listed.split(",") if value.strip()]
    if not values:
        raise UsageError(f"--sweep={text!r} lists no values: {fix}.")
    return Sweep(flag, _strengths(flag, values, fix))


def _strengths(flag: str, values: list[str], fix: str) -> tuple[float, ...]:
    try:
        strengths = tuple(float(value) for value in values)
    except ValueError:
        raise UsageError(f"--sweep={flag}={','.join(values)} holds a value that is not a number: {fix}.") from None
    if len(set(strengths)) != len(strengths):
        raise UsageError(
            f"--sweep={flag}={','.join(values)} repeats a value, which would train the same "
            "experiment twice: list each strength once."
        )
    upper = 1.0 if flag == "dropout" else math.inf
    for strength in strengths:
        if not (math.isfinite(strength) and 0.0 <= strength < upper):
            allowed = "in [0, 1)" if flag == "dropout" else "a finite number >= 0"
            raise UsageError(
                f"--sweep={flag}={','.join(values)}: {strength:g} is not a strength; each must be {allowed}."
            )
    return strengths
