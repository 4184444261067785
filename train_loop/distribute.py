"""Choosing and creating the `tf.distribute` strategy, nothing else."""

from __future__ import annotations

import json
import os

import tensorflow as tf

from train_loop.configs import Config, UsageError


def split_cpu(num_devices: int) -> None:
    """Splits the host CPU into `num_devices` logical devices, so MirroredStrategy has replicas.

    TensorFlow allows this only before it initialises its devices; a process that already did
    the same split (a test session) is left as it is.

    Raises:
      UsageError: TensorFlow already started with a different number of CPU devices.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)
    except RuntimeError:
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing != num_devices:
            raise UsageError(
                f"--cpu_replicas={num_devices}: TensorFlow already runs on {existing} CPU "
                "devices in this process; start a new process to change the split.") from None


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
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        return _multi_worker()
    if name == "tpu":
        return _tpu()
    return tf.distribute.OneDeviceStrategy((_accelerators() or ["/cpu:0"])[0])


def check_global_batch(strategy: tf.distribute.Strategy, global_batch_size: int) -> None:
    """Raises UsageError unless the global batch splits evenly over the replicas."""
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise UsageError(
            f"--batch_size={global_batch_size} does not split evenly over {replicas} replicas: "
            f"use a multiple of {replicas}.")


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
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
        return len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    except (ValueError, AttributeError):
        return 0


def _multi_worker() -> tf.distribute.Strategy:
    if "TF_CONFIG" not in os.environ:
        raise UsageError(
            "--strategy=multi_worker needs TF_CONFIG naming the cluster and this worker's task; "
            "see README 'Running on several machines', or use python -m train_loop.launch.")
    return tf.distribute.MultiWorkerMirroredStrategy()


def _tpu() -> tf.distribute.Strategy:
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(
            f"--strategy=tpu: no TPU found here ({first_line}); run on a TPU VM, or pick "
            "--strategy=auto.") from None
    return tf.distribute.TPUStrategy(resolver)
