"""`tf.data` pipelines over the splits: shuffling, sharding, padding, feeding replicas."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf

from train_loop.data.arrays import ALIGNMENT, Splits, aligned_empty
from train_loop.errors import UsageError

# Batches each pipeline prepares ahead of the step: one gather each, far quicker than a step.
_PREFETCH = 2


def steps_per_epoch(splits: Splits, global_batch_size: int) -> int:
    """Full global batches per epoch; the remainder is dropped so every replica steps in lockstep.

    Raises:
      UsageError: the batch is larger than the training split.
    """
    steps = len(splits.x_train) // global_batch_size
    if steps == 0:
        held_out = "" if splits.x_validation is None else " left after --validation_split"
        raise UsageError(
            f"--batch_size={global_batch_size} is larger than the {len(splits.x_train)} training "
            f"examples{held_out}: use a smaller --batch_size."
        )
    return steps


def sample_batch(splits: Splits, size: int = 2) -> tuple[tf.Tensor, tf.Tensor]:
    """The first `size` training examples as a batch: what a task is checked on before a step is traced."""
    return tf.constant(splits.x_train[:size]), tf.constant(splits.y_train[:size])


def train_dataset_fn(
    splits: Splits,
    *,
    global_batch_size: int,
    seed: int,
    num_epochs: int,
    start_step: int,
) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """A `distribute_datasets_from_function` input: every epoch from `start_step` on, in one stream.

    Each epoch's order is a stateless shuffle keyed by (seed, epoch), so a resumed run, any replica
    count and any worker count see exactly the batches one uninterrupted device would: each input
    pipeline gets the batches that sharding the index stream element by element and then batching
    would give it (`_pipeline_batches`), and the replicas' batches together make up the same global
    batch.

    The split's arrays go to TensorFlow without a copy where they can (`host_tensor`): they must
    not change afterwards.
    """
    steps = steps_per_epoch(splits, global_batch_size)
    images, labels = host_tensor(splits.x_train, copy=False), host_tensor(splits.y_train, copy=False)
    num_examples = len(splits.x_train)
    start_epoch, skip_steps = divmod(start_step, steps)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
            order = epoch_order(num_examples, seed, epoch)
            return tf.data.Dataset.from_tensor_slices(
                _pipeline_batches(order[: steps * global_batch_size], context, global_batch_size)
            )

        # Each global batch holds one batch of every replica, so a step is that many of this pipeline's.
        replicas_per_pipeline = context.num_replicas_in_sync // context.num_input_pipelines
        indices = (
            tf.data.Dataset.range(start_epoch, num_epochs)
            .flat_map(epoch_batches)
            .skip(skip_steps * replicas_per_pipeline)
        )
        batches = indices.map(lambda index: (tf.gather(images, index), tf.gather(labels, index)))
        return with_options(batches.prefetch(_PREFETCH))

    return dataset_fn


def epoch_order(num_examples: int, seed: int, epoch: tf.Tensor | int) -> tf.Tensor:
    """The training split's order in `epoch`: a stateless shuffle keyed by (seed, epoch). Its
    first `global_batch_size` indices are the epoch's first global batch, and so on."""
    return tf.random.experimental.stateless_shuffle(
        tf.range(num_examples), seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    )


def eval_dataset_fn(
    inputs: np.ndarray,
    labels: np.ndarray,
    global_batch_size: int,
) -> tuple[Callable[[tf.distribute.InputContext], tf.data.Dataset], int]:
    """A split to evaluate (validation or test) padded to whole global batches, each element
    `((inputs, labels), weights)`: a train batch's structure and a weight per example, 0 on the
    padding.

    Whole batches keep every replica in lockstep and every shape static; the weights keep the
    metrics exact over the real examples. The arrays go to TensorFlow without a copy where they
    can (`host_tensor`): they must not change afterwards.

    Returns:
      The dataset function and the number of batches each replica runs.
    """
    num_examples = len(inputs)
    num_batches = -(-num_examples // global_batch_size)
    images, labels = host_tensor(inputs, copy=False), host_tensor(labels, copy=False)

    def lookup(index: tf.Tensor) -> tuple[tuple[tf.Tensor, tf.Tensor], tf.Tensor]:
        clipped = tf.minimum(index, num_examples - 1)
        weights = tf.cast(index < num_examples, tf.float32)
        return (tf.gather(images, clipped), tf.gather(labels, clipped)), weights

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        order = tf.range(num_batches * global_batch_size)
        indices = tf.data.Dataset.from_tensor_slices(_pipeline_batches(order, context, global_batch_size))
        batches = indices.map(lookup)
        return with_options(batches.prefetch(_PREFETCH))

    return dataset_fn, num_batches


def _pipeline_batches(order: tf.Tensor, context: tf.distribute.InputContext, global_batch_size: int) -> tf.Tensor:
    """This input pipeline's per-replica batches of `order`, a whole number of global batches,
    one row each: what sharding `order` element by element and batching it would give.

    Whole batches at once, because `tf.data` pays per element: the pipeline took 130 us of CPU
    per batch of 32 when it sharded and batched indices one by one, 80 us this way (280 and 130
    at batch 128).
    """
    per_replica = context.get_per_replica_batch_size(global_batch_size)
    # Element p goes to pipeline p % n: column i of rows of n consecutive elements.
    by_pipeline = tf.reshape(order, [-1, per_replica, context.num_input_pipelines])
    return by_pipeline[:, :, context.input_pipeline_id]


def global_positions(rows: int, replica_id: tf.Tensor, num_replicas: int, num_input_pipelines: int) -> tf.Tensor:
    """Where each of a replica's `rows` examples sits in the global batch: the inverse of
    `_pipeline_batches` and of dealing each pipeline's consecutive batches to its replicas in
    order (replica ids run pipeline by pipeline, as a strategy numbers its workers' devices).

    What a replica can compute of an example's identity without the index travelling with it,
    so that a draw keyed by it (dropout's masks) is the same on any replica and worker count.
    """
    replicas_per_pipeline = num_replicas // num_input_pipelines
    pipeline, batch = replica_id // replicas_per_pipeline, replica_id % replicas_per_pipeline
    return (batch * rows + tf.range(rows)) * num_input_pipelines + pipeline


def host_tensor(array: np.ndarray, *, copy: bool = True) -> tf.Tensor:
    """`tf.constant(array)` on the host CPU, without `tf.constant`'s slow copy.

    `tf.constant` copies a split into memory of TensorFlow's allocator, touched page by page: 0.3-0.5 s
    for Fashion-MNIST's 170 MB of training images, on every run. NumPy copies it into memory it asks
    the kernel to back with huge pages (0.02 s here), and DLPack hands that copy to TensorFlow as
    it is; the tensor keeps it alive. The copy is aligned (`aligned_empty`), and it is private, so a
    caller changing its array later changes nothing in the run.

    With `copy=False`, an array that is already aligned, C-ordered and in the machine's byte order
    (a split's, see `Splits`) is handed over as it is: a second copy of the inputs is the largest
    part of a run's memory. The caller must then never change it.
    """
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("=")  # DLPack takes the machine's byte order only.
    if copy or not _shareable(array):
        private = aligned_empty(array.shape, dtype)
        np.copyto(private, array)
        array = private
    return tf.experimental.dlpack.from_dlpack(array.__dlpack__())


def _shareable(array: np.ndarray) -> bool:
    aligned = array.ctypes.data % ALIGNMENT == 0
    return aligned and array.flags.c_contiguous and array.flags.writeable and array.dtype.isnative


def with_options(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Every pipeline's options (the training, evaluation and timing ones): no sharding by the
    strategy, no autotuning, and no graph rewrites.

    Autotuning runs a model thread beside each iterator, and destroying the iterator waits for
    it: one run in three stalled 3-4 s at its end (seen in the stack: `~Iterator` waiting on
    `Model::OptimizeLoop`). A sequential gather with a fixed prefetch trained as fast (10,294
    against 10,115 examples/s at best, in one process), so there is nothing for it to tune.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    # The default rewrites serialize the pipeline with the split it gathers from, a transient copy
    # of it (+161 MiB of peak memory for Fashion-MNIST's training images); without them a batch
    # came no slower (0.91-0.99 ms against 1.11-1.21 ms per eager `next`, batch 32, busy machine).
    options.experimental_optimization.apply_default_optimizations = False
    # Every pipeline of ours shards by hand; the strategy must not shard a second time.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)


class ReplicaInput:
    """A dataset function fed to the strategy's replicas, and the traced `next_batch` that feeds them.

    On CPU devices the global batch comes from a plain host iterator and is split among the
    replicas in the traced step: the strategy's distributed iterator keeps a polling thread busy,
    which on a 2-core host halved training speed (measured: 560 vs 1,190 examples/s, 2 CPU
    replicas). One element a step, not one per replica: TensorFlow refuses a function traced
    without AutoGraph that calls `get_next()` more than 32 times, so 33 replicas failed. On GPUs
    and TPUs the strategy's own iterator prefetches to the devices. Both deal consecutive
    per-replica batches to replicas in order, so the numbers are the same either way.

    With `checkpointable`, the host iterator serves every single-host strategy, GPUs too: the
    strategy's distributed iterator cannot join a `tf.train.Checkpoint` (TensorFlow 2.21 raises
    ValueError: not a trackable object), and a stream's position must. Under several workers
    (MultiWorkerMirroredStrategy) each worker reads its own input pipeline through its own host
    iterator (`worker_input_context`), whose batch is its replicas' share of the global batch, and
    saves that iterator beside the run's checkpoint (`outputs.positions`). So does a worker on CPUs
    with any data: the strategy's distributed iterator logs TensorFlow's "Input of
    GeneratorDatasetOp::Dataset will not be optimized" warning on every worker's stderr.
    """

    def __init__(
        self,
        strategy: tf.distribute.Strategy,
        dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset],
        *,
        checkpointable: bool = False,
    ):
        self._strategy = strategy
        per_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and (
            checkpointable or _on_cpus(strategy)
        )
        self._on_host = per_worker or (_is_single_host(strategy) if checkpointable else _is_single_host_cpu(strategy))
        if checkpointable and not self._on_host:
            raise UsageError(
                f"streamed data (--input, --dataset=tfrecord:FOLDER) cannot run under {type(strategy).__name__}: "
                "its position in the checkpoint needs a host iterator; use --strategy=mirrored, one_device or "
                "multi_worker."
            )
        # The global replica id of this worker's first replica: its replicas take its batch's parts in order.
        self.first_replica = 0
        if per_worker:
            context = worker_input_context(strategy)
            self.first_replica = context.input_pipeline_id * len(strategy.extended.worker_devices)
            self._dataset = dataset_fn(context)
        elif self._on_host:
            # One pipeline of global batches: each is its replicas' batches, consecutive, in order.
            self._dataset = dataset_fn(tf.distribute.InputContext(num_replicas_in_sync=1))
        else:
            self._dataset = strategy.distribute_datasets_from_function(dataset_fn)

    def iterator(self) -> Iterator:
        return iter(self._dataset)

    def next_batch(self, iterator: Iterator) -> object:
        """The next batch of every replica, of the dataset's structure; call inside the traced loop call.

        It depends on the strategy alone, so a function traced with it can pull from any of the
        strategy's inputs (the evaluation pass serves every split).
        """
        batch = next(iterator)
        if not self._on_host:
            return batch  # Already distributed (the default strategy has no worker devices to count).
        local_replicas = len(self._strategy.extended.worker_devices)
        if local_replicas == 1:
            return batch  # A worker's one replica takes its batch as a local value.
        return deal_to_replicas(self._strategy, batch, parts=local_replicas, first_replica=self.first_replica)


def deal_to_replicas(strategy: tf.distribute.Strategy, batch: object, *, parts: int, first_replica: int = 0) -> object:
    """`batch` cut along its first axis into `parts` consecutive equal parts, dealt to the strategy's
    replicas in order of their global ids from `first_replica` on (a worker's first replica), as
    the run's replicas take their batches. Splitting shares the batch's memory where each part is
    aligned."""
    pieces = [tf.split(tensor, parts) for tensor in tf.nest.flatten(batch)]
    return strategy.experimental_distribute_values_from_function(
        lambda context: tf.nest.pack_sequence_as(
            batch, [piece[context.replica_id_in_sync_group - first_replica] for piece in pieces]
        )
    )


def worker_input_context(strategy: tf.distribute.Strategy) -> tf.distribute.InputContext:
    """This worker's input pipeline under several workers, numbered as the strategy numbers them
    (the chief first, then the workers), sized as one replica: its batch is the global batch's
    share of this worker's replicas, which `ReplicaInput.next_batch` splits among them.

    The same pipelines, batch for batch, as `distribute_datasets_from_function` would give: each
    worker's replicas take consecutive per-replica batches of its pipeline in order.
    """
    resolver = strategy.cluster_resolver
    cluster = resolver.cluster_spec().as_dict()
    has_chief = "chief" in cluster
    index = 0 if resolver.task_type == "chief" else resolver.task_id + int(has_chief)
    num_workers = len(cluster.get("worker", [])) + int(has_chief)
    return tf.distribute.InputContext(num_workers, index, num_replicas_in_sync=num_workers)


def _is_single_host_cpu(strategy: tf.distribute.Strategy) -> bool:
    return _is_single_host(strategy) and _on_cpus(strategy)


def _on_cpus(strategy: tf.distribute.Strategy) -> bool:
    return all("CPU" in device.upper() for device in strategy.extended.worker_devices)


def _is_single_host(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, (tf.distribute.OneDeviceStrategy, tf.distribute.MirroredStrategy))
