"""Streamed data: the `tf.data` datasets an input function gives for each split (a user's,
`--input=PATH.py:NAME`, or a TFRecord folder's, see `tfrecords`), checked once, then shuffled
with a seeded buffer, sharded, batched per replica and prefetched, never held whole in memory.

The training pipeline is read through one host iterator, which the run's checkpoint holds
(`inputs.ReplicaInput`, `checkpointable=True`): a resumed run continues from the example where
the killed one stopped, shuffle buffer and all.

Sharding, when a strategy reads with several input pipelines (one per worker): by example, so
that every pipeline reads the whole split, shuffles it alike and keeps every n-th example, which
makes the global batches those of one device; a source that shards itself by file says so
(`Stream.shards_by_file`), and its examples are then not sharded again. Validation and test are
always sharded by example, so that every pipeline runs the same number of batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import os
import re
from collections.abc import Callable, Iterator, Mapping

import tensorflow as tf

from train_loop.data.inputs import with_options
from train_loop.errors import UsageError
from train_loop.user_code import exits_refused, one_line

SPLITS = ("train", "validation", "test")
# `input_fn(split, context)`: a split's unbatched examples; None for a split it does not have.
InputFunction = Callable[[str, tf.distribute.InputContext], "tf.data.Dataset | None"]

_PREFETCH = 2  # Batches ahead of the step, as the in-memory pipelines (`inputs`).
# The tf.data classes that batch; `_UnbatchDataset` undoes them (the walk in `_is_batched`).
_BATCHING = {"_BatchDataset", "_ParallelBatchDataset", "_PaddedBatchDataset", "_DenseToRaggedDataset"}
# Mark the assertions that an example has the first example's shapes, and a training label is one
# of the classes, to tell their failures apart.
_SHAPE_CHANGED = "train_loop: an example changed shape"
_LABEL_OUTSIDE = "train_loop: a training label outside the classes"
# The line TensorFlow's C++ side logs when one of them fails in a traced call (its rendezvous
# aborts); `read_errors` says it in one line of ours, so the run's stderr drops it (`run_data`).
FAILED_CHECK_LOG = re.compile(
    rf"^W\d{{4}} .*local_rendezvous\.cc.*({re.escape(_SHAPE_CHANGED)}|{re.escape(_LABEL_OUTSIDE)})"
)


@dataclasses.dataclass(frozen=True)
class Stream:
    """A checked source of streamed splits.

    `counts` holds the examples of each split, None where unknown (an infinite or uncounted
    training split); a split missing from it has no examples (no validation). `shapes` is one
    example's structure of shapes, which every example is held to. `num_classes` is the classes
    of a classifier's labels, or the width of a target (values to predict); with `labels_unseen`,
    the classes were counted on the evaluated splits only, and each training label is held to them.
    """

    name: str  # How the source was given ("--input=x.py:fn"), for messages.
    input_fn: InputFunction
    counts: Mapping[str, int | None]
    shapes: object
    num_classes: int
    fingerprint: str
    shards_by_file: bool = False
    labels_unseen: bool = False

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input's shape, for the model: the first part of an (input, label) example."""
        return tuple(tf.nest.flatten(self.shapes)[0])

    def examples(self, split: str, context: tf.distribute.InputContext) -> tf.data.Dataset:
        """`split`'s examples as the function gives them for `context`, each held to `shapes`
        (checked one by one only where tf.data does not know them already: a decoded image's)."""
        dataset = call_input_fn(self.name, self.input_fn, split, context)
        if split == "train" and self.labels_unseen:
            dataset = dataset.map(self._check_label)
        specs = tf.nest.flatten(dataset.element_spec)
        if all(spec.shape == shape for spec, shape in zip(specs, tf.nest.flatten(self.shapes))):
            return dataset

        def check(*parts: tf.Tensor) -> object:
            example = parts if len(parts) > 1 else parts[0]
            checks = [
                tf.debugging.assert_equal(
                    tf.shape(tensor), tf.constant(shape.as_list(), tf.int32), message=f"{_SHAPE_CHANGED} ({split})"
                )
                for tensor, shape in zip(tf.nest.flatten(example), tf.nest.flatten(self.shapes))
            ]
            with tf.control_dependencies(checks):
                # Static shapes too (a decoded image has none), which the traced loop's shapes need.
                return tf.nest.map_structure(tf.ensure_shape, example, self.shapes)

        return dataset.map(check)

    def _check_label(self, *parts: tf.Tensor) -> object:
        """The example, once its label is one of the classes the evaluated splits' labels make."""
        example = parts if len(parts) > 1 else parts[0]
        label = tf.nest.flatten(example)[-1]
        inside = tf.reduce_all((label >= 0) & (tf.cast(label, tf.int64) < self.num_classes))
        with tf.control_dependencies([tf.debugging.Assert(inside, [_LABEL_OUTSIDE, label])]):
            return tf.nest.map_structure(tf.identity, example)


def open_input(name: str, input_fn: InputFunction, *, targets: str = "classes") -> Stream:
    """The `Stream` of a user's `input_fn`: every split called once, checked (a dataset, not
    batched, not empty), the validation and test splits counted. For a classifier (`targets`
    "classes", see `tasks.Task`) the labels are integers and the classes are 0 to the largest label
    of the validation and test splits (the training split is not read whole: its labels are checked
    as they are read); else a target's width is its number of values.

    Raises:
      UsageError: the function fails or exits, gives something else than unbatched examples, or
        float labels to a classifier.
    """
    context = tf.distribute.InputContext()
    datasets = {
        split: call_input_fn(name, input_fn, split, context, optional=split == "validation") for split in SPLITS
    }
    datasets = {split: dataset for split, dataset in datasets.items() if dataset is not None}
    shapes = first_shapes(name, datasets["train"], "train")
    counts = {"train": _known_length(datasets["train"])}
    largest = 0
    for split in ("validation", "test"):
        if split in datasets:
            counts[split], split_largest = _count(name, datasets[split], split)
            largest = max(largest, split_largest)
    if targets != "classes":
        return Stream(
            name, input_fn, counts, shapes, num_classes=_width(shapes), fingerprint=function_fingerprint(input_fn)
        )
    _check_integer_labels(name, datasets["train"])
    return Stream(
        name,
        input_fn,
        counts,
        shapes,
        num_classes=largest + 1,
        fingerprint=function_fingerprint(input_fn),
        labels_unseen=True,
    )


def _width(shapes: object) -> int:
    """A target's number of values: the last part of an example, one value per entry."""
    return int(tf.nest.flatten(shapes)[-1].num_elements() or 1)


def _check_integer_labels(name: str, dataset: tf.data.Dataset) -> None:
    """Raises UsageError unless the labels (an example's last part) are integers: float labels are
    targets to predict, and a classifier's classes cannot be taken from them."""
    label = tf.nest.flatten(dataset.element_spec)[-1]
    if not label.dtype.is_integer:
        raise UsageError(
            f"{name}: labels of type {label.dtype.name}: float labels are targets (values to predict), not classes, "
            "and the default classifier takes integer class indices 0..K-1; for values pass a loss that takes "
            "them (--loss=mean_squared_error, --loss=huber), or if these are classes give them as integers "
            "(tf.cast(label, tf.int32))."
        )


def call_input_fn(
    name: str, input_fn: InputFunction, split: str, context: tf.distribute.InputContext, *, optional: bool = False
) -> tf.data.Dataset | None:
    """`input_fn(split, context)`, refused in one line unless it is a dataset of unbatched examples
    (or None for an `optional` split).

    Raises:
      UsageError: the function raises or exits, or returns something else.
    """
    with exits_refused(name, during=f"for split {split!r}", fix="an input function must return a tf.data.Dataset."):
        try:
            dataset = input_fn(split, context)
        except UsageError:
            raise
        except Exception as error:  # The user's code: any failure is reported, not a traceback.
            raise UsageError(f"{name}: calling it for split {split!r} raised {one_line(error)}.") from None
    if dataset is None and optional:
        return None
    if not isinstance(dataset, tf.data.Dataset):
        raise UsageError(
            f"{name}: returned {type(dataset).__name__} for split {split!r}, not a tf.data.Dataset"
            f"{' (or None: no such split)' if optional else ''}."
        )
    if _is_batched(dataset):
        raise UsageError(
            f"{name}: the {split!r} dataset is already batched; return unbatched examples (train_loop batches "
            "them per replica): drop its .batch()."
        )
    return dataset


def function_fingerprint(input_fn: InputFunction) -> str:
    """The function's module and name, and its source file's size and modification time."""
    path = inspect.getsourcefile(input_fn) or ""
    stat = os.stat(path) if path and os.path.isfile(path) else None
    file_part = f"{path} {stat.st_size} {stat.st_mtime_ns}" if stat else "no source file"
    return f"{getattr(input_fn, '__module__', '?')}:{getattr(input_fn, '__qualname__', '?')} {file_part}\n"


def fingerprint_digest(stream: Stream) -> str:
    """What a run records of its source and a resumed run must match: a digest of the fingerprint."""
    return hashlib.sha256(stream.fingerprint.encode()).hexdigest()[:16]


def steps_per_epoch(stream: Stream, global_batch_size: int, steps: int) -> int:
    """`steps` (`--steps_per_epoch`) when given, else the whole global batches in one pass.

    Raises:
      UsageError: the training split's length is unknown or infinite and `steps` is 0, or the
        batch is larger than the split.
    """
    if steps:
        return steps
    count = stream.counts["train"]
    if count is None:
        raise UsageError(
            f"{stream.name}: the training split's length is unknown or infinite, so an epoch has no end: pass "
            "--steps_per_epoch=N, the steps of one epoch."
        )
    if count < global_batch_size:
        raise UsageError(
            f"--batch_size={global_batch_size} is larger than the {count} training examples of {stream.name}: "
            "use a smaller --batch_size."
        )
    return count // global_batch_size


def train_dataset_fn(
    stream: Stream, *, global_batch_size: int, seed: int, shuffle_buffer: int
) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """The training pipeline: examples shuffled with a `seed`ed buffer of `shuffle_buffer`
    (reshuffled each pass), sharded, batched per replica; whole batches only, and passes repeated
    without end (the run counts the steps). Its iterator's state is the data's position."""

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        examples = stream.examples("train", context)
        if shuffle_buffer:
            examples = examples.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        if not stream.shards_by_file:
            examples = examples.shard(context.num_input_pipelines, context.input_pipeline_id)
        batches = examples.batch(context.get_per_replica_batch_size(global_batch_size), drop_remainder=True)
        return with_options(batches.repeat().prefetch(_PREFETCH))

    return dataset_fn


def eval_dataset_fn(
    stream: Stream, split: str, global_batch_size: int
) -> tuple[Callable[[tf.distribute.InputContext], tf.data.Dataset], int]:
    """A split to evaluate as `(batch, weights)` (the same structure as a training batch, and a
    weight per example), padded to whole global batches with copies of its first example of
    weight 0, as the in-memory splits are (`inputs.eval_dataset_fn`).

    Returns:
      The dataset function and the number of batches each replica runs.
    """
    count = stream.counts[split]
    num_batches = -(-count // global_batch_size)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        # The whole split on every pipeline, sharded by example: the same number of batches on each.
        examples = stream.examples(split, tf.distribute.InputContext())
        weighted = examples.map(lambda *parts: (parts if len(parts) > 1 else parts[0], tf.constant(1.0)))
        padding = weighted.take(1).map(lambda example, _: (example, tf.constant(0.0))).repeat()
        padded = weighted.concatenate(padding).take(num_batches * global_batch_size)
        sharded = padded.shard(context.num_input_pipelines, context.input_pipeline_id)
        batches = sharded.batch(context.get_per_replica_batch_size(global_batch_size), drop_remainder=True)
        return with_options(batches.prefetch(_PREFETCH))

    return dataset_fn, num_batches


@contextlib.contextmanager
def read_errors(stream: Stream) -> Iterator[None]:
    """Turns an example that changed shape, or a training label outside the classes, met while the
    stream is read, into one usage line."""
    try:
        yield
    except tf.errors.InvalidArgumentError as error:
        if _LABEL_OUTSIDE in str(error):
            raise UsageError(
                f"{stream.name}: a training label is outside 0..{stream.num_classes - 1}, the {stream.num_classes} "
                "classes that the validation and test splits' labels make (the training split is not read whole "
                "first): give the test split an example of every class, or use a loss that takes these labels "
                "(--loss=NAME)."
            ) from None
        if _SHAPE_CHANGED not in str(error):
            raise
        split = str(error).split(_SHAPE_CHANGED)[1].split(")")[0].strip(" (")
        raise UsageError(
            f"{stream.name}: an example of the {split!r} split changed shape; the first had "
            f"{_describe(stream.shapes)}: give every example the same shapes (pad or resize them)."
        ) from None


def first_shapes(name: str, dataset: tf.data.Dataset, split: str) -> object:
    """The shapes of `dataset`'s first example (its static shapes may be unknown, as a decoded image's).

    Raises:
      UsageError: the split is empty, or reading its first example fails.
    """
    try:
        first = next(iter(dataset.take(1)), None)
    except tf.errors.OpError as error:
        raise UsageError(f"{name}: reading the first example of split {split!r} failed ({one_line(error)}).") from None
    if first is None:
        raise UsageError(f"{name}: split {split!r} has no example; give it at least one.")
    return tf.nest.map_structure(lambda tensor: tf.TensorShape(tensor.shape), first)


def _known_length(dataset: tf.data.Dataset) -> int | None:
    """The dataset's length when tf.data knows it without reading; None when unknown or infinite."""
    length = int(dataset.cardinality())
    return length if length >= 0 else None


def _count(name: str, dataset: tf.data.Dataset, split: str) -> tuple[int, int]:
    """The examples of an evaluated split and its largest label (the last part of an example), in
    one pass of tf.data's own (a validation or test split must end).

    Raises:
      UsageError: the split is infinite, or reading it fails.
    """
    if int(dataset.cardinality()) == tf.data.INFINITE_CARDINALITY:
        raise UsageError(
            f"{name}: split {split!r} is infinite; a split that is evaluated must end: drop its .repeat()."
        )

    def add(state: tuple[tf.Tensor, tf.Tensor], *parts: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        label = tf.cast(tf.reduce_max(tf.nest.flatten(parts)[-1]), tf.int64)
        return state[0] + 1, tf.maximum(state[1], label)

    try:
        count, largest = dataset.reduce((tf.constant(0, tf.int64), tf.constant(0, tf.int64)), add)
    except tf.errors.OpError as error:
        raise UsageError(f"{name}: reading split {split!r} failed ({one_line(error)}).") from None
    return int(count), int(largest)


def _is_batched(dataset: tf.data.Dataset) -> bool:
    """Whether `dataset` batches its examples: a batching step below it that no unbatch undoes."""
    while True:
        kind = type(dataset).__name__
        if kind == "_UnbatchDataset":
            return False
        if kind in _BATCHING:
            return True
        parents = dataset._inputs()  # noqa: SLF001  (tf.data's own graph: the one way to see a batch)
        if len(parents) != 1:
            return False
        dataset = parents[0]


def _describe(shapes: object) -> str:
    return ", ".join(str(tuple(shape)) for shape in tf.nest.flatten(shapes))
