"""Choosing and creating the `tf.distribute` strategy, nothing else."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator

import tensorflow as tf

from train_loop.configs import Config
from train_loop.errors import Interrupted, UsageError

_CONNECT_SECONDS = 10
PEER_TIMEOUT_ENV = "TRAIN_LOOP_PEER_TIMEOUT"
_PEER_TIMEOUT_SECONDS = 120
_PEER_POLL_SECONDS = 0.5
_BACKLOG = 64  # Peers' probes wait in the backlog; nothing accepts them.


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
        return _tpu(config.tpu)
    return tf.distribute.OneDeviceStrategy((_accelerators() or ["/cpu:0"])[0])


def check_global_batch(strategy: tf.distribute.Strategy, global_batch_size: int) -> None:
    """Raises UsageError unless the global batch splits evenly over the replicas."""
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise UsageError(
            f"--batch_size={global_batch_size} does not split evenly over {replicas} replicas: "
            f"use a multiple of {replicas}.")


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
        raise UsageError(f"TF_CONFIG is not valid JSON ({error}); see README 'Running on several machines'.") from None
    cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
    if not isinstance(cluster, dict) or not any(cluster.get(job) for job in ("chief", "worker")):
        raise UsageError('TF_CONFIG has no "cluster" with a "worker" (or "chief") list of host:port addresses.')
    for job, addresses in cluster.items():
        if not (isinstance(addresses, list) and all(_is_address(address) for address in addresses)):
            raise UsageError(f'TF_CONFIG cluster "{job}" must be a list of "host:port" strings, not {addresses!r}.')
    task = tf_config.get("task")
    if not (isinstance(task, dict) and task.get("type") in cluster and isinstance(task.get("index"), int)
            and 0 <= task["index"] < len(cluster[task["type"]])):
        raise UsageError(
            f'TF_CONFIG "task" must name this process\'s job and index in the cluster, e.g. '
            f'{{"type": "worker", "index": 0}}; it is {task!r}.')
    return tf_config


def _check_reachable(tpu: str) -> None:
    """A `grpc://host:port` TPU that does not answer would make TensorFlow wait forever."""
    if not tpu.startswith("grpc://"):
        return
    host, _, port = tpu[len("grpc://"):].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=_CONNECT_SECONDS).close()
    except (OSError, ValueError) as error:
        raise UsageError(f"--tpu={tpu}: nothing answers there ({error}); check the TPU's address.") from None


def _is_address(address: object) -> bool:
    host, _, port = str(address).rpartition(":") if isinstance(address, str) else ("", "", "")
    return bool(host) and port.isdigit()


def _multi_worker() -> tf.distribute.Strategy:
    tf_config = read_tf_config()
    if not tf_config:
        raise UsageError(
            "--strategy=multi_worker needs TF_CONFIG naming the cluster and this worker's task; "
            "see README 'Running on several machines', or use python -m train_loop.launch.")
    wait_for_peers(tf_config, peer_timeout())
    return tf.distribute.MultiWorkerMirroredStrategy()


def peer_timeout() -> float:
    """Seconds to wait for the other workers: `TRAIN_LOOP_PEER_TIMEOUT`, default 120.

    Raises:
      UsageError: the variable is not a positive number.
    """
    text = os.environ.get(PEER_TIMEOUT_ENV, "") or str(_PEER_TIMEOUT_SECONDS)
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise UsageError(f"{PEER_TIMEOUT_ENV}={text!r} must be a positive number of seconds, e.g. 120.")
    return seconds


def wait_for_peers(tf_config: dict, timeout: float) -> None:
    """Returns once every other worker in `tf_config` listens on its port.

    TensorFlow's own wait, inside `MultiWorkerMirroredStrategy()`, holds the interpreter while it
    waits and has no end: a leftover TF_CONFIG would make a single run hang, deaf to SIGTERM and
    SIGINT. So the workers meet here first, in Python: each listens on its own port (closed
    before TensorFlow's server takes it; a peer that comes later finds that server instead)
    and connects to every other one; a signal stops the wait, and so does `timeout`.

    Raises:
      UsageError: this worker's port is taken, or a peer did not answer within `timeout`.
      Interrupted: SIGTERM or SIGINT arrived while waiting.
    """
    cluster, task = tf_config["cluster"], tf_config["task"]
    own = cluster[task["type"]][task["index"]]
    peers = [address for job in ("chief", "worker") for address in cluster.get(job, []) if address != own]
    deadline = time.monotonic() + timeout
    with _listening(own), _interruptible("waiting for the other workers"):
        for address in peers:
            while not _answers(address):
                if time.monotonic() > deadline:
                    raise UsageError(
                        f"waited {timeout:g} s for the workers TF_CONFIG names, and {address} did not answer: "
                        f"start every worker, or unset TF_CONFIG for a single run ({PEER_TIMEOUT_ENV} sets the wait).")
                time.sleep(_PEER_POLL_SECONDS)


@contextlib.contextmanager
def _listening(address: str) -> Iterator[None]:
    port = int(address.rpartition(":")[2])
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", port))
        listener.listen(_BACKLOG)
    except OSError as error:
        listener.close()
        raise UsageError(f"TF_CONFIG gives this worker {address}, but port {port} is taken ({error.strerror}): "
                         "stop what holds it, or pick another port.") from None
    try:
        yield
    finally:
        listener.close()


@contextlib.contextmanager
def _interruptible(doing: str) -> Iterator[None]:
    """SIGTERM and SIGINT raise `Interrupted` instead of waiting for the end of `doing`."""

    def stop(signum: int, _frame) -> None:
        raise Interrupted(f"stopped by {signal.Signals(signum).name} while {doing}; nothing was written.", signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=_PEER_POLL_SECONDS).close()
    except OSError:
        return False
    return True


def _tpu(tpu: str) -> tf.distribute.Strategy:
    """TPUStrategy on the TPU `--tpu` names (empty: this TPU VM's own), initialised first.

    Batches are whole (the remainder is dropped) so every shape is static, as XLA on TPUs needs;
    summaries are written on the host from the values the traced loop returns.
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
            "--tpu=<name or grpc://address>, or pick --strategy=auto.") from None
    return tf.distribute.TPUStrategy(resolver)
