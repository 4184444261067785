"""The run's data either way it comes: arrays held in memory (`Splits`) or streamed (`Stream`);
what the wiring asks of it, answered for both."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from train_loop.configs import Config
from train_loop.data import inputs, sources, streams, tfrecords
from train_loop.data.arrays import Splits, given_indices, hold_out
from train_loop.errors import UsageError
from train_loop.model import loop_calls
from train_loop.model.state import TrainState
from train_loop.outputs.positions import WorkerPosition
from train_loop.outputs.stderr import filtered_stderr, quiet_stderr
from train_loop.settings import TFRECORD_PREFIX, check_stream_only, is_stream
from train_loop.training import distribute
from train_loop.training.console import DataSummary
from train_loop.training.evaluation import Evaluation, Evaluator, Weights
from train_loop.training.xla_choice import TimingBatch
from train_loop.user_code import load_function

Evaluate = Callable[[Weights], Evaluation]


class StepBatch(NamedTuple):
    """A step's batch, as consecutive per-replica parts from replica `first_replica` on (the
    global replica id), and its examples' indices in the training arrays as given (None: a stream)."""

    batch: object
    first_replica: int
    examples: np.ndarray | None


@dataclasses.dataclass
class RunData:
    """The arrays (`splits`) or the stream (`stream`) of a run: one of the two is None."""

    splits: Splits | None
    stream: streams.Stream | None
    # A stream's training input and its iterator, whose state is the data's position (`position`).
    _stream_input: tuple[inputs.ReplicaInput, Iterator] | None = None
    _iterator: Iterator | None = None  # The latest loop call's: what `skip_batch` pulls from.
    _traced: Callable[[object, tf.Tensor, tf.Tensor], dict[str, tf.Tensor]] | None = None

    @classmethod
    def read(
        cls,
        config: Config,
        *,
        arrays: Mapping[str, np.ndarray] | None = None,
        input_fn: streams.InputFunction | None = None,
        input_name: str = "",
        targets: str = "classes",
    ) -> RunData:
        """Reads and checks the data `config` names, or the user's `arrays` or `input_fn` (named
        `input_name` in messages: "--input=..." when not given); arrays' labels as the task's
        `targets` (see `tasks.Task`).

        Raises:
          UsageError: the data is missing, corrupt or unfit (one line naming what and where).
        """
        if input_fn is None and not is_stream(config):
            check_stream_only(config)
            loaded = sources.load_splits(config, arrays, targets=targets)
            return cls(hold_out(loaded, config.validation_split, seed=config.seed), None)
        if config.dataset.startswith(TFRECORD_PREFIX):
            # A damaged record is our one line; TensorFlow's C++ side logs it too, from the reader.
            with quiet_stderr():
                stream = tfrecords.open_folder(
                    config.dataset.removeprefix(TFRECORD_PREFIX),
                    validation_split=config.validation_split,
                    deterministic=config.deterministic,
                    targets=targets,
                )
        else:
            function = input_fn or load_function("input", config.input, role="an input file")
            stream = streams.open_input(input_name or f"--input={config.input}", function, targets=targets)
        return cls(None, stream)

    @property
    def summary(self) -> DataSummary:
        if self.stream is None:
            held_out = 0 if self.splits.x_validation is None else len(self.splits.x_validation)
            return DataSummary(self.splits.source, len(self.splits.x_train), held_out, len(self.splits.x_test))
        counts = self.stream.counts
        return DataSummary(self.stream.name, counts["train"], counts.get("validation", 0), counts["test"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.splits.x_train.shape[1:] if self.stream is None else self.stream.input_shape

    @property
    def num_classes(self) -> int:
        return self.splits.num_classes if self.stream is None else self.stream.num_classes

    @property
    def fingerprint(self) -> str:
        """A stream's fingerprint, which a resumed run must match ("" for arrays: their settings say it)."""
        return "" if self.stream is None else streams.fingerprint_digest(self.stream)

    def quiet_failed_reads(self) -> contextlib.AbstractContextManager[None]:
        """For the run, a stream's example that changed shape, or training label outside the classes,
        is one line of ours on stderr (`streams.read_errors`), without the line TensorFlow's C++ side
        logs as the traced call fails."""
        return filtered_stderr(streams.FAILED_CHECK_LOG) if self.stream else contextlib.nullcontext()

    def steps_per_epoch(self, config: Config) -> int:
        if self.stream is None:
            return inputs.steps_per_epoch(self.splits, config.batch_size)
        return streams.steps_per_epoch(self.stream, config.batch_size, config.steps_per_epoch)

    def sample_batch(self) -> tuple[tf.Tensor, ...]:
        """A few training examples as a batch: what a task is checked on before a step is traced."""
        if self.stream is None:
            return inputs.sample_batch(self.splits)
        fn = streams.train_dataset_fn(self.stream, global_batch_size=2, seed=0, shuffle_buffer=0)
        with streams.read_errors(self.stream):
            return next(iter(fn(tf.distribute.InputContext())))

    def timing_data(self, config: Config) -> Splits | TimingBatch:
        """What the XLA timing (`xla_choice`) feeds the step: the splits, or a stream's first
        global batch, of its own structure."""
        if self.stream is None:
            return self.splits
        fn = streams.train_dataset_fn(self.stream, global_batch_size=config.batch_size, seed=0, shuffle_buffer=0)
        with streams.read_errors(self.stream):
            batch = tf.nest.map_structure(np.asarray, next(iter(fn(tf.distribute.InputContext()))))
        return TimingBatch(batch, self.stream.input_shape, self.stream.num_classes)

    def position(self, config: Config, strategy: tf.distribute.Strategy) -> dict[str, object]:
        """The checkpoint's trackables of the data's position: a stream's training iterator, made
        here before the checkpoint is restored (and before the run folder is taken: a source
        that cannot feed the workers is refused first); none for arrays, whose position is the step."""
        if self.stream is None:
            return {}
        replica_input = self._stream_replica_input(config, strategy)
        self._stream_input = (replica_input, replica_input.iterator())
        return {"data_position": self._stream_input[1]}

    def worker_position(self, run_dir: str, strategy: tf.distribute.Strategy) -> WorkerPosition | None:
        """Under several workers, this worker's data position (made by `position` first), which
        the run's checkpoint cannot hold: it is saved beside it. None otherwise."""
        if self._stream_input is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return None
        context = inputs.worker_input_context(strategy)
        return WorkerPosition(
            run_dir, self._stream_input[1], index=context.input_pipeline_id, count=context.num_input_pipelines
        )

    def loop_call(
        self, config: Config, strategy: tf.distribute.Strategy, state: TrainState, *, jit_compile: bool
    ) -> Callable[[int, bool], dict[str, tf.Tensor]]:
        """The controller's loop call: `num_steps` traced steps, pulling from the training data where
        the restored state stands (arrays: from its step; a stream: its restored iterator). Called
        again after a restore (`training/divergence`), it pulls from there with the same trace."""
        if self.stream is None:
            replica_input = self._arrays_input(config, strategy, state)
            iterator = replica_input.iterator()
        else:
            replica_input, iterator = self._stream_input
        self._iterator = iterator
        # Traced once: a rollback's new iterator is of the same input, and the same trace takes it.
        self._traced = self._traced or loop_calls.make_config_loop_call(
            config, strategy, state, replica_input, jit_compile=jit_compile
        )
        loop_call = self._traced

        def call(num_steps: int, histograms: bool) -> dict[str, tf.Tensor]:
            with streams.read_errors(self.stream) if self.stream else contextlib.nullcontext():
                return loop_call(iterator, tf.constant(num_steps), tf.constant(histograms))

        return call

    def first_update_input(
        self, config: Config, strategy: tf.distribute.Strategy, state: TrainState
    ) -> tuple[Callable[[Iterator], object], Iterator]:
        """`next_batch` and an iterator of its own giving every replica its batch of the next update,
        for `--check_equivalence`: the run's own iterator stays where it is. Arrays: the batch of the
        step the state restored; a stream: its first batch (its restored position cannot be copied)."""
        if self.stream is None:
            replica_input = self._arrays_input(config, strategy, state)
        else:
            replica_input = self._stream_replica_input(config, strategy)
        return replica_input.next_batch, replica_input.iterator()

    def _arrays_input(self, config: Config, strategy: tf.distribute.Strategy, state: TrainState) -> inputs.ReplicaInput:
        """The training arrays from the step `state` restored."""
        dataset_fn = inputs.train_dataset_fn(
            self.splits,
            global_batch_size=config.batch_size,
            seed=config.seed,
            num_epochs=config.epochs,
            start_step=state.counters.step,
        )
        return inputs.ReplicaInput(strategy, dataset_fn)

    def _stream_replica_input(self, config: Config, strategy: tf.distribute.Strategy) -> inputs.ReplicaInput:
        dataset_fn = streams.train_dataset_fn(
            self.stream, global_batch_size=config.batch_size, seed=config.seed, shuffle_buffer=config.shuffle_buffer
        )
        return inputs.ReplicaInput(strategy, dataset_fn, checkpointable=True)

    def skip_batch(self) -> None:
        """Pulls the next step's batch out of the latest loop call's input untrained: a step that
        `--divergence_skip` skips."""
        with streams.read_errors(self.stream) if self.stream else contextlib.nullcontext():
            next(self._iterator)

    def step_batch(self, config: Config, step: int) -> StepBatch:
        """The batch of `step` (counted from 1) as this process's replicas take it (`StepBatch`).
        For arrays, the global batch, with its examples' indices in the training arrays as given;
        for a stream, whose examples have no index, the next batch of the latest loop call's input,
        which must stand right before `step`: under several workers, this worker's share."""
        if self.stream is not None:
            with streams.read_errors(self.stream):
                return StepBatch(next(self._iterator), self._stream_input[0].first_replica, None)
        epoch, position = divmod(step - 1, self.steps_per_epoch(config))
        order = inputs.epoch_order(len(self.splits.x_train), config.seed, epoch).numpy()
        rows = order[position * config.batch_size : (position + 1) * config.batch_size]
        batch = (self.splits.x_train[rows], self.splits.y_train[rows])
        return StepBatch(batch, 0, given_indices(self.splits, config.seed)[rows])

    def evaluations(self, evaluator: Evaluator, batch_size: int) -> tuple[Evaluate | None, Evaluate]:
        """The validation split's evaluation (None without one) and the test split's."""
        if self.stream is None:
            splits = self.splits
            validate = None if splits.x_validation is None else evaluator(splits.x_validation, splits.y_validation)
            return validate, evaluator(splits.x_test, splits.y_test)
        validate = self._stream_evaluation(evaluator, "validation", batch_size)
        return validate, self._stream_evaluation(evaluator, "test", batch_size)

    def _stream_evaluation(self, evaluator: Evaluator, split: str, batch_size: int) -> Evaluate | None:
        if not self.stream.counts.get(split):
            return None
        evaluate = evaluator.for_input(*streams.eval_dataset_fn(self.stream, split, batch_size))

        def evaluate_read(weights: Weights) -> Evaluation:
            with streams.read_errors(self.stream):
                return evaluate(weights)

        return evaluate_read


def restore_worker_position(worker: WorkerPosition, step: int, strategy: tf.distribute.Strategy) -> None:
    """This worker's data position at `step` (a resume's, or a divergence's restore). One that does
    not restore, on any worker, stops every worker with one line: the others would otherwise wait
    for it in their next collective. A collective: every worker calls it.

    Raises:
      UsageError: this worker's position, or another's, does not restore.
    """
    try:
        worker.restore(step)
    except UsageError:
        distribute.mean_over_workers(strategy, [1.0])
        raise
    (failed,) = distribute.mean_over_workers(strategy, [0.0])
    if failed:
        raise UsageError(
            f"another worker's data position at step {step} does not restore (that worker's own line names its "
            "file); pass a new --run_name to start over."
        )
