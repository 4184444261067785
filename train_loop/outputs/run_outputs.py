"""What a run writes into its folder: TensorBoard's events, `metrics.jsonl`, the best model,
`model.keras`, the export and `result.json`.

Only the chief writes. Every worker holds the same object; on the others it writes nothing,
so that the wiring and the actions need no `chief` branch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import keras

from train_loop import files
from train_loop.configs import Config
from train_loop.data import sources
from train_loop.model.measurements import CLASSIFIER, Table
from train_loop.outputs import exports, metrics_file, runs
from train_loop.outputs.events import drop_events_after
from train_loop.outputs.experiment import write_logdir_experiment
from train_loop.outputs.metrics_file import MetricsFile
from train_loop.outputs.summaries import Summaries

DIVERGENCE_FILE = "divergence.json"


@dataclasses.dataclass(frozen=True)
class RunOutputs:
    """The run's writers; as a context manager, they are closed however the run ends."""

    run_dir: str
    writes: bool  # False on a worker that is not the chief.
    summaries: Summaries
    metrics_file: MetricsFile

    @classmethod
    def open(
        cls,
        config: Config,
        run_dir: str,
        *,
        chief: bool,
        restored_step: int | None,
        decided: Mapping[str, Any],
        settings: Mapping[str, Any],
        table: Table = CLASSIFIER,
        source: str = "",
    ) -> RunOutputs:
        """The run folder's writers, after its settings are recorded (with what was `decided` on
        this machine, which a resumption reuses, and a streamed `source`'s fingerprint).

        Whatever the killed process logged after `restored_step` is dropped first, so a resumed
        run's curves and epochs continue without repeats; a fresh start (`restored_step` None)
        logs its `settings` for TensorBoard's HParams (and the Custom Scalars layout of the task's
        measurements, `table`) and renews the logdir's experiment.
        """
        if not chief:
            return cls(run_dir, False, Summaries(None), MetricsFile(None))
        runs.create(run_dir, config, decided=dict(decided), source=source)
        drop_events_after(run_dir, restored_step)
        metrics_file.drop_lines_after(run_dir, restored_step)
        summaries = Summaries(run_dir, class_names=sources.class_names(config.dataset))
        if restored_step is None:
            summaries.write_settings(os.path.basename(run_dir), settings, table)
            write_logdir_experiment(run_dir)  # Its HParams table shows what differs, this run's settings included.
        return cls(run_dir, True, summaries, MetricsFile(run_dir))

    def __enter__(self) -> RunOutputs:
        return self

    def __exit__(self, *_exception: object) -> None:
        self.summaries.close()

    @property
    def profile_dir(self) -> str | None:
        """Where `--profile_steps` writes its trace (TensorBoard reads it from the run's folder)."""
        return self.run_dir if self.writes else None

    def save_best(self, model: keras.Model) -> None:
        """`<run>/best/model.keras`, from the model as it is now."""
        if self.writes:
            exports.save_model(model, os.path.join(self.run_dir, runs.BEST_DIR))

    def save_model(self, model: keras.Model, *, export: str) -> None:
        """`<run>/model.keras`, and `<run>/saved_model/` when `export` is "saved_model"."""
        if self.writes:
            exports.save_model(model, self.run_dir)
            if export == "saved_model":
                exports.export_saved_model(model, self.run_dir)

    def rewind(self, step: int) -> None:
        """Drops what was logged after `step` (events, `metrics.jsonl`): a rollback to the
        checkpoint at `step` logs the steps after it again, as a resumed run does."""
        if self.writes:
            self.summaries.close()  # `drop_events_after` rewrites the files: none may be open.
            drop_events_after(self.run_dir, step)
            self.summaries.reopen()
            metrics_file.drop_lines_after(self.run_dir, step)

    def write_divergence(self, report: Mapping[str, Any]) -> None:
        """`<run>/divergence.json`: the latest divergence's report."""
        if self.writes:
            files.write_json(os.path.join(self.run_dir, DIVERGENCE_FILE), dict(report))

    def write_result(self, result: Mapping[str, Any]) -> None:
        """`<run>/result.json`, last: it marks the run finished."""
        if self.writes:
            files.write_json(os.path.join(self.run_dir, runs.RESULT_FILE), dict(result))
