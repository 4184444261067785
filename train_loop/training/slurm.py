"""The cluster of a Slurm job step, from its `SLURM_*` variables, each checked first."""

from __future__ import annotations

import os
import re

import tensorflow as tf
from tensorflow.python.distribute.cluster_resolver import slurm_cluster_resolver

from train_loop.errors import UsageError

VARIABLES = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE")
_DEFAULT_PORT = 8888
_PORTS = re.compile(r"([0-9]+)(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*")
_HOST = re.compile(r"[A-Za-z0-9_.-]+")


def read_cluster() -> dict:
    """This task's cluster and its place in it, as TF_CONFIG would hold them.

    TensorFlow's resolver hands each task a share of its node's GPUs and builds one address per
    share, so on nodes without GPUs it finds no tasks at all (and it runs nvidia-smi to count
    them); here every task gets one slot and GPUs are left to Slurm's own binding
    (`--gpus-per-task`). Ports start at the step's reserved ones (`srun --resv-ports`), else at
    8888, one per task on a node.

    Raises:
      UsageError: this process is not a task of a Slurm job step, or a variable is malformed
        (TensorFlow's resolver would raise a ValueError naming none).
    """
    missing = [name for name in VARIABLES if name not in os.environ]
    if missing:
        raise UsageError(
            f"--cluster_resolver=slurm: {', '.join(missing)} not set, so this is not a task of a Slurm job "
            "step; start it with srun inside an allocation (see docs/several-machines.md, 'Slurm'), or use TF_CONFIG."
        )
    num_tasks = _count("SLURM_STEP_NUM_TASKS", minimum=1)
    rank = _count("SLURM_PROCID", minimum=0)
    if rank >= num_tasks:
        raise UsageError(
            f"SLURM_PROCID={rank} must be below SLURM_STEP_NUM_TASKS={num_tasks}: "
            "start the task with srun, which sets both."
        )
    tasks_per_node = _tasks_per_node(num_tasks)
    # A slot per task of the whole step: no node has more tasks than that.
    resolver = slurm_cluster_resolver.SlurmClusterResolver(
        port_base=_first_port(max(tasks_per_node.values())),
        gpus_per_node=num_tasks,
        gpus_per_task=1,
        tasks_per_node=tasks_per_node,
        auto_set_gpu=False,
    )
    cluster = resolver.cluster_spec().as_dict()
    return {"cluster": cluster, "task": {"type": resolver.task_type, "index": resolver.task_id}}


def cluster_resolver(tf_config: dict) -> tf.distribute.cluster_resolver.ClusterResolver:
    """A resolver of `read_cluster`'s cluster; the GPUs are the ones this task sees, not the slots."""
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(tf_config["cluster"]),
        task_type=tf_config["task"]["type"],
        task_id=tf_config["task"]["index"],
        rpc_layer="grpc",
        num_accelerators={"GPU": len(tf.config.list_physical_devices("GPU"))},
    )


def _count(name: str, *, minimum: int) -> int:
    text = os.environ[name]
    if not (re.fullmatch(r"[0-9]+", text) and int(text) >= minimum):
        raise UsageError(
            f"{name}={text!r} must be a whole number of at least {minimum}; srun sets it for each task of a job step."
        )
    return int(text)


def _tasks_per_node(num_tasks: int) -> dict[str, int]:
    """Each node of the step and its number of tasks, which add up to `num_tasks`."""
    nodelist, counts_text = os.environ["SLURM_STEP_NODELIST"], os.environ["SLURM_STEP_TASKS_PER_NODE"]
    try:
        nodes = slurm_cluster_resolver.expand_hostlist(nodelist)
    except ValueError:
        nodes = []
    if not nodes or not all(_HOST.fullmatch(node) for node in nodes) or len(set(nodes)) < len(nodes):
        raise UsageError(
            f"SLURM_STEP_NODELIST={nodelist!r} must be a list of distinct host names such as "
            "node[01-04],gpu7; srun sets it for each task of a job step."
        )
    try:
        counts = slurm_cluster_resolver.expand_tasks_per_node(counts_text)
    except ValueError:
        counts = []
    if len(counts) != len(nodes) or min(counts) < 1 or sum(counts) != num_tasks:
        raise UsageError(
            f"SLURM_STEP_TASKS_PER_NODE={counts_text!r} must give the number of tasks on each node of "
            f"SLURM_STEP_NODELIST ({len(nodes)} listed), such as 2(x3) for two on each of three, adding up to "
            f"SLURM_STEP_NUM_TASKS={num_tasks}; srun sets them for each task of a job step."
        )
    return dict(zip(nodes, counts))


def _first_port(tasks_on_a_node: int) -> int:
    """The step's first reserved port, or 8888; with the ports after it, one per task on a node."""
    text = os.environ.get("SLURM_STEP_RESV_PORTS", "")
    if not text:
        return _DEFAULT_PORT
    match = _PORTS.fullmatch(text)
    first = int(match.group(1)) if match else 0
    if not 0 < first <= 65536 - tasks_on_a_node:
        raise UsageError(
            f"SLURM_STEP_RESV_PORTS={text!r} must be a range of ports such as 12000-12003, starting at most at "
            f"{65536 - tasks_on_a_node} for {tasks_on_a_node} tasks on a node; `srun --resv-ports` sets it."
        )
    return first
