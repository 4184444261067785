"""Choosing and creating the `tf.distribute` strategy, nothing else."""

from __future__ import annotations

import json
import os
import re
import socket

import tensorflow as tf

from train_loop.configs import Config
from train_loop.errors import UsageError
from train_loop.training import peers, slurm

_CONNECT_SECONDS = 10


def split_cpu(num_devices: int) -> None:
    """Splits the host CPU into `num_devices` logical devices, so MirroredStrategy has replicas.

    TensorFlow allows this only before it initialises its devices; a process that already did
    the same split (a test session) is left as it is.

    Raises:
      UsageError: TensorFlow already started with a different number of CPU devices.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)
    except RuntimeError:
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing != num_devices:
            raise UsageError(
                f"--cpu_replicas={num_devices}: TensorFlow already runs on {existing} CPU "
                "devices in this process; start a new process to change the split."
            ) from None


def make_strategy(config: Config) -> tf.distribute.Strategy:
    """The strategy `config.strategy` names; `auto` picks the best one for the devices here.

    Raises:
      UsageError: the strategy cannot run here (no TPU, no TF_CONFIG, ...).
    """
    if config.cpu_replicas:
        split_cpu(config.cpu_replicas)
    name = resolve_strategy_name(config.strategy)
    if name == "mirrored":
        devices = _accelerators() or [device.name for device in tf.config.list_logical_devices("CPU")]
        return mirrored_strategy(devices)
    if name == "multi_worker":
        return _slurm() if config.cluster_resolver == "slurm" else _multi_worker()
    if name == "tpu":
        return _tpu(config.tpu)
    return tf.distribute.OneDeviceStrategy((_accelerators() or ["/cpu:0"])[0])


def mirrored_strategy(devices: list[str]) -> tf.distribute.MirroredStrategy:
    """A MirroredStrategy whose collectives are keyed apart from every earlier one in this process.

    Every MirroredStrategy numbers its collectives from the same keys, and the runtime remembers
    each key's tensor shape: a second strategy in one process (a notebook training another
    model) fails with "Shape mismatch in the collective instance" (tensorflow/tensorflow#62790).
    TensorFlow's own tests move the key base before each strategy (strategy_combinations.py).
    """
    tf.distribute.MirroredStrategy._collective_key_base += 100_000
    return tf.distribute.MirroredStrategy(devices)


def describe(strategy: tf.distribute.Strategy) -> str:
    """The strategy, its replicas and this process's devices, for the line a run starts with."""
    devices = ", ".join(device.rpartition("/device:")[2] for device in strategy.extended.worker_devices)
    replicas = strategy.num_replicas_in_sync
    # By its public name: TensorFlow's MultiWorkerMirroredStrategy is a class named CollectiveAllReduceStrategy.
    name = next((name for kind, name in _PUBLIC_NAMES if isinstance(strategy, kind)), type(strategy).__name__)
    return f"{name}, {replicas} replica{'s' if replicas > 1 else ''} in sync, here on {devices}"


_PUBLIC_NAMES = ((tf.distribute.MultiWorkerMirroredStrategy, "MultiWorkerMirroredStrategy"),)


def check_global_batch(strategy: tf.distribute.Strategy, global_batch_size: int, accumulation_steps: int = 1) -> None:
    """Raises UsageError unless the global batch splits evenly over the replicas, and each
    replica's batch into `accumulation_steps` micro-batches."""
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise UsageError(
            f"--batch_size={global_batch_size} does not split evenly over {replicas} replicas: "
            f"use a multiple of {replicas}."
        )
    per_replica = global_batch_size // replicas
    if per_replica % accumulation_steps:
        divisors = [k for k in range(1, per_replica + 1) if per_replica % k == 0]
        batch = (
            f"the per-replica batch of {per_replica} (--batch_size={global_batch_size} over {replicas} replicas)"
            if replicas > 1
            else f"--batch_size={global_batch_size}"
        )
        raise UsageError(
            f"--accumulation_steps={accumulation_steps} does not divide {batch}: "
            f"use one of {', '.join(map(str, divisors))}, or change --batch_size."
        )


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run: always, except on a multi-worker cluster, where the
    `chief` task does, or worker 0 when the cluster names no chief."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def mean_over_workers(strategy: tf.distribute.Strategy, values: list[float]) -> list[float]:
    """`values` averaged over a cluster's replicas (each worker's replicas give its own values):
    a collective every worker must call; elsewhere, `values`."""
    if not is_multi_worker(strategy):
        return values
    local = strategy.experimental_distribute_values_from_function(lambda _: tf.constant(values, tf.float64))
    return strategy.reduce(tf.distribute.ReduceOp.MEAN, local, axis=None).numpy().tolist()


def resolve_strategy_name(strategy: str) -> str:
    """`auto` becomes multi_worker under a TF_CONFIG of several workers, mirrored over several
    GPUs, else one_device; other names stay as they are."""
    if strategy != "auto":
        return strategy
    if _tf_config_workers() > 1:
        return "multi_worker"
    return "mirrored" if len(_accelerators()) > 1 else "one_device"


def _accelerators() -> list[str]:
    return [device.name for device in tf.config.list_logical_devices("GPU")]


def _tf_config_workers() -> int:
    cluster = read_tf_config().get("cluster", {})
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def read_tf_config() -> dict:
    """`TF_CONFIG` parsed and checked ({} when unset), so a typo in it is one clear line rather
    than a hang while workers wait for a peer that will never come.

    Raises:
      UsageError: TF_CONFIG is not JSON, or its cluster or task is malformed.
    """
    text = os.environ.get("TF_CONFIG", "")
    if not text.strip():
        return {}
    try:
        tf_config = json.loads(text)
    except ValueError as error:
        raise UsageError(
            f"TF_CONFIG is not valid JSON ({error}); see docs/several-machines.md, 'Running on several machines'."
        ) from None
    cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
    if not isinstance(cluster, dict) or not any(cluster.get(job) for job in ("chief", "worker")):
        raise UsageError('TF_CONFIG has no "cluster" with a "worker" (or "chief") list of host:port addresses.')
    for job, addresses in cluster.items():
        if not (isinstance(addresses, list) and all(_is_address(address) for address in addresses)):
            raise UsageError(f'TF_CONFIG cluster "{job}" must be a list of "host:port" strings, not {addresses!r}.')
    task = tf_config.get("task")
    # Not a bool: `true` is an int to Python, and would be taken as worker 1.
    if not (
        isinstance(task, dict)
        and task.get("type") in ("chief", "worker")
        and task["type"] in cluster
        and type(task.get("index")) is int
        and 0 <= task["index"] < len(cluster[task["type"]])
    ):
        raise UsageError(
            f'TF_CONFIG "task" must name this process\'s job in the cluster ("chief" or "worker") and its '
            f'"index" there, a whole number from 0, e.g. {{"type": "worker", "index": 0}}; it is {json.dumps(task)}.'
        )
    return tf_config


def _check_reachable(tpu: str) -> None:
    """A `grpc://host:port` TPU that does not answer would make TensorFlow wait forever."""
    if not tpu.startswith("grpc://"):
        return
    host, _, port = tpu[len("grpc://") :].rpartition(":")
    try:
        with peers.interruptible(f"connecting to the TPU at {tpu}"):
            socket.create_connection((host, int(port)), timeout=_CONNECT_SECONDS).close()
    except (OSError, ValueError) as error:
        raise UsageError(f"--tpu={tpu}: nothing answers there ({error}); check the TPU's address.") from None


def _is_address(address: object) -> bool:
    host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    return bool(host) and re.fullmatch("[0-9]{1,5}", port) is not None and 0 < int(port) < 65536


def _multi_worker() -> tf.distribute.Strategy:
    tf_config = read_tf_config()
    if not tf_config:
        raise UsageError(
            "--strategy=multi_worker needs TF_CONFIG naming the cluster and this worker's task; "
            "see docs/several-machines.md, 'Running on several machines', or use python -m train_loop.launch."
        )
    peers.wait_for_peers(
        tf_config,
        peers.peer_timeout(),
        named_by="TF_CONFIG",
        remedy="start every worker, or unset TF_CONFIG for a single run",
    )
    return tf.distribute.MultiWorkerMirroredStrategy()


def _slurm() -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy over the tasks of this Slurm job step, one worker per task,
    after they met as under TF_CONFIG."""
    tf_config = slurm.read_cluster()
    peers.wait_for_peers(
        tf_config,
        peers.peer_timeout(),
        named_by="the Slurm step",
        remedy="check that srun started every task of the step",
    )
    return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=slurm.cluster_resolver(tf_config))


def _tpu(tpu: str) -> tf.distribute.Strategy:
    """TPUStrategy on the TPU `--tpu` names (empty: this TPU VM's own), initialised first.

    Batches are whole (the remainder is dropped) so every shape is static, as XLA on TPUs needs;
    summaries are written on the host from the values the loop call returns.
    """
    _check_reachable(tpu)
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(
            f"--strategy=tpu: no TPU {tpu or 'on this machine'} ({first_line}); run on a TPU VM, pass "
            "--tpu=<name or grpc://address>, or pick --strategy=auto."
        ) from None
    return tf.distribute.TPUStrategy(resolver)
