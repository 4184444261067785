"""What goes to TensorBoard's train writer after a loop call: the interval's means and each
layer's measurements, the weights' and gradients' histograms, and the flush before a checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from train_loop.configs import Config
from train_loop.model import measurements, optimizers
from train_loop.model.state import TrainState
from train_loop.outputs.summaries import Summaries
from train_loop.training.actions.base import Action, Moment, Periodic
from train_loop.training.console import Console
from train_loop.training.timing import Stopwatch


@dataclasses.dataclass
class TrainSummaries(Periodic):
    """The train writer's scalars (the interval's means, the regularization's ratio to the data
    terms' sum, the learning rate, each layer's terms, norms and sparsity, the decoupled decay's
    penalty) and the console's progress (the epoch's means so far)."""

    config: Config
    state: TrainState
    summaries: Summaries
    console: Console
    means: Callable[[], dict[str, float]]  # The means since the last summary (`controller.Interval`).
    stopwatch: Stopwatch  # Timed as "summaries" (within training time), so the bench shows what logging costs.

    def begin(self) -> None:
        """Step 0: each layer's measurements of the initial weights, the regularizers' starting point."""
        layers = self.state.layer_measurements()
        prefix = measurements.layer_tag(measurements.LAYER_REGULARIZATION, "")
        initial_term = sum(value for tag, value in layers.items() if tag.startswith(prefix))
        self.summaries.write_scalars("train", 0, {**layers, self.state.table.tag("regularization"): initial_term})

    def run(self, at: Moment) -> None:
        with self.stopwatch.phase("summaries"):
            self._write(at)

    def _write(self, at: Moment) -> None:
        means, state = self.means(), self.state
        if not means:
            return  # No step was trained since the last summary: a skipped one alone.
        data = sum(means[term] for term in state.table.terms)
        self.summaries.write_scalars(
            "train",
            at.step,
            {
                **state.table.tagged(means),
                "regularization_ratio": means["regularization"] / data,
                "learning_rate": optimizers.applied_learning_rate(
                    self.config, state.optimizer, state.learning_rate_factor
                ),
                **({"loss_scale": float(state.loss_scale.scale.numpy())} if state.loss_scale else {}),
                **state.layer_measurements(),
                **(
                    {
                        f"weight_decay/{path}": term
                        for path, term in optimizers.layer_decay_terms(
                            state.model, self.config.weight_decay, optimizer=state.optimizer
                        ).items()
                    }
                    if self.config.weight_decay
                    else {}
                ),
            },
        )
        # The epoch's means so far, which its line gives at its end: the bar agrees with it. Off a
        # terminal no bar is drawn, and the means' variable reads are skipped.
        if self.console.draws_progress:
            self.console.progress(at.step, state.counters.epoch_means())


@dataclasses.dataclass
class Histograms(Periodic):
    """Every trainable weight's histogram, and each weighted layer's kernel gradient's (of the
    whole batch, before clipping: "gradient/<layer path>"), at `--histogram_every`."""

    state: TrainState
    summaries: Summaries
    stopwatch: Stopwatch  # Timed as "summaries", as `TrainSummaries`.

    def wants_histograms(self, step: int) -> bool:
        return self.cadence.due_at(step)

    def begin(self) -> None:
        self.summaries.write_histograms(0, self.state.weight_values())

    def run(self, at: Moment) -> None:
        with self.stopwatch.phase("summaries"):
            self.summaries.write_histograms(at.step, {**self.state.weight_values(), **at.histograms})


@dataclasses.dataclass
class Flush(Action):
    """Writes the events so far to disk, after every loop call: before the checkpoint, so a run
    resumed from it keeps every event up to its step."""

    summaries: Summaries

    def begin(self) -> None:
        self.summaries.flush()

    def run(self, at: Moment) -> None:
        self.summaries.flush()
