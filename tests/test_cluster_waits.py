"""Finding the cluster and waiting for it: Slurm's and TF_CONFIG's variables checked in one line
each, a peer wait on either path bounded and stopped by SIGTERM and SIGINT, something else on a
peer's port told from a worker, and the TPU's connection stopped by a signal too.

Every case is a real `python -m train_loop` process on the bundled digits, stopped before it
trains; the cluster's other workers are absent or impostors on 127.0.0.1, bounded in time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import REPO
from helpers import assert_one_line_error

from train_loop.launch import free_ports

LISTEN, SYN_SENT = "0A", "02"  # Socket states as /proc/net/tcp writes them.
NEVER = {"TRAIN_LOOP_PEER_TIMEOUT": "600"}  # Longer than any test may take: a wait that ends is ours.


def slurm_step(rank: str = "0", **changed: str) -> dict[str, str]:
    """The variables srun sets for task `rank` of two on this node, on ports free now; `changed` replaces some."""
    first, _ = consecutive_free_ports()
    return {
        "SLURM_PROCID": rank,
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_STEP_TASKS_PER_NODE": "2",
        "SLURM_STEP_RESV_PORTS": f"{first}-{first + 1}",
        **changed,
    }


def consecutive_free_ports() -> tuple[int, int]:
    """Two consecutive ports free on 127.0.0.1 now, as `srun --resv-ports` reserves them."""
    for first in range(30_000, 60_000, 2):
        with contextlib.ExitStack() as probes:
            try:
                for port in (first, first + 1):
                    probes.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
            return first, first + 1
    raise RuntimeError("no two consecutive free ports")


def tf_config(own: int, peer: int) -> dict[str, str]:
    cluster = {"worker": [f"127.0.0.1:{own}", f"127.0.0.1:{peer}"]}
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}})}


def start(*flags: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "train_loop", "--dataset=digits", *flags],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **env},
    )


def finish(process: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def wait_for_socket(process: subprocess.Popen, state: str, port: int, *, remote: bool = False) -> None:
    """Until a socket in `state` has `port` as its local (or remote) port: the process waits there."""
    deadline = time.monotonic() + 120
    while not has_socket(state, port, remote=remote):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"never waited on port {port}: {finish(process).stderr[-3000:]}")
        time.sleep(0.1)


def has_socket(state: str, port: int, *, remote: bool) -> bool:
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return any(row[3] == state and int(row[2 if remote else 1].split(":")[1], 16) == port for row in rows)


# Something else on a peer's port is not the peer.


@contextlib.contextmanager
def impostor(port: int, answer: bytes | None) -> Iterator[None]:
    """A program on `port` that accepts every connection and sends `answer` (None: says nothing)."""
    listener = socket.create_server(("127.0.0.1", port))
    listener.settimeout(0.1)
    done, connections = threading.Event(), []

    def serve() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):  # A timeout, or a worker that went away.
                connection, _ = listener.accept()
                connections.append(connection)
                if answer is not None:
                    connection.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=10)
        for connection in [*connections, listener]:
            connection.close()


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
@pytest.mark.parametrize(
    "answer",
    [b"SSH-2.0-OpenSSH_9.6\r\n", b"0" * 64 + b" 127.0.0.1:1\n", None],
    ids=["garbage", "another-token", "silence"],
)
def test_something_else_on_a_peers_port_is_not_taken_for_the_peer(tmp_path, answer):
    own, peer = free_ports(2)
    with impostor(peer, answer):
        result = finish(start(f"--logdir={tmp_path}", env={**tf_config(own, peer), "TRAIN_LOOP_PEER_TIMEOUT": "3"}))
    assert_one_line_error(
        result, ("waited 3 s", f"something else answers at 127.0.0.1:{peer}", "not a train_loop worker of this run")
    )
    assert os.listdir(tmp_path) == []


# The wait for peers, on either path: bounded, and stopped by SIGTERM and SIGINT at once, in one line.


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
def test_a_slurm_task_alone_ends_within_the_peer_timeout_in_one_line(tmp_path):
    step = slurm_step()
    peer = int(step["SLURM_STEP_RESV_PORTS"].split("-")[1])
    result = finish(
        start(
            "--strategy=multi_worker",
            "--cluster_resolver=slurm",
            f"--logdir={tmp_path}",
            env={**step, "TRAIN_LOOP_PEER_TIMEOUT": "2"},
        )
    )
    assert_one_line_error(result, ("waited 2 s", "Slurm step", f"localhost:{peer} did not answer", "srun"))
    assert os.listdir(tmp_path) == []


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("path", ["tf_config", "slurm"])
def test_a_signal_ends_the_wait_for_peers_in_one_line(tmp_path, path, signum):
    if path == "slurm":
        env = slurm_step()
        own = int(env["SLURM_STEP_RESV_PORTS"].split("-")[0])
        flags = ("--strategy=multi_worker", "--cluster_resolver=slurm")
    else:
        own, peer = free_ports(2)
        env, flags = tf_config(own, peer), ()
    process = start(*flags, f"--logdir={tmp_path}", env={**env, **NEVER})
    wait_for_socket(process, LISTEN, own)
    process.send_signal(signum)
    result = finish(process, timeout=60)
    assert result.returncode == 128 + signum, result.stderr
    name = signal.Signals(signum).name
    assert result.stderr == f"train_loop: stopped by {name} while waiting for the other workers; nothing was written.\n"
    assert os.listdir(tmp_path) == []


# Malformed variables: one line naming the variable, before any wait.

SLURM_CASES = {
    "procid-not-a-number": ({"SLURM_PROCID": "abc"}, "SLURM_PROCID='abc'"),
    "procid-past-the-tasks": ({"SLURM_PROCID": "2"}, "SLURM_PROCID=2"),
    "no-tasks": ({"SLURM_STEP_NUM_TASKS": "0"}, "SLURM_STEP_NUM_TASKS='0'"),
    "tasks-not-a-number": ({"SLURM_STEP_NUM_TASKS": "x"}, "SLURM_STEP_NUM_TASKS='x'"),
    "ports-not-numbers": ({"SLURM_STEP_RESV_PORTS": "abc"}, "SLURM_STEP_RESV_PORTS='abc'"),
    "ports-past-65535": ({"SLURM_STEP_RESV_PORTS": "65535-65536"}, "SLURM_STEP_RESV_PORTS='65535-65536'"),
    "nodelist-unclosed": ({"SLURM_STEP_NODELIST": "node[01-02"}, "SLURM_STEP_NODELIST='node[01-02'"),
    "nodelist-with-a-space": ({"SLURM_STEP_NODELIST": "local host"}, "SLURM_STEP_NODELIST='local host'"),
    "tasks-per-node-other-total": ({"SLURM_STEP_TASKS_PER_NODE": "3"}, "SLURM_STEP_TASKS_PER_NODE='3'"),
    "tasks-per-node-not-a-list": ({"SLURM_STEP_TASKS_PER_NODE": "2(x"}, "SLURM_STEP_TASKS_PER_NODE='2(x'"),
}


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
@pytest.mark.parametrize(("changed", "named"), SLURM_CASES.values(), ids=SLURM_CASES.keys())
def test_a_malformed_slurm_variable_is_one_line_naming_it(run_cli, tmp_path, changed, named):
    result = run_cli(
        "--dataset=digits",
        "--strategy=multi_worker",
        "--cluster_resolver=slurm",
        env={**slurm_step(**changed), **NEVER},
        timeout=120,
    )
    assert_one_line_error(result, (named,))
    assert not (tmp_path / "logs").exists()


TASKS = {
    "index-true": {"type": "worker", "index": True},
    "index-a-string": {"type": "worker", "index": "0"},
    "index-a-float": {"type": "worker", "index": 0.0},
    "type-a-list": {"type": ["worker"], "index": 0},
    "type-not-a-worker": {"type": "ps", "index": 0},
}


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
@pytest.mark.parametrize("task", TASKS.values(), ids=TASKS.keys())
def test_a_tf_config_task_of_the_wrong_type_is_one_line_at_once(run_cli, tmp_path, task):
    """`"index": true` was worker 1 (a bool is an int to Python), and waited for worker 0."""
    own, peer = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{own}", f"127.0.0.1:{peer}"], "ps": [f"127.0.0.1:{peer}"]}
    result = run_cli(
        "--dataset=digits", env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": task}), **NEVER}, timeout=120
    )
    assert_one_line_error(result, ('TF_CONFIG "task"', json.dumps(task)))
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
def test_a_tf_config_port_past_65535_is_one_line(run_cli, tmp_path):
    own, _ = free_ports(2)
    result = run_cli("--dataset=digits", env={**tf_config(own, 70000), **NEVER}, timeout=120)
    assert_one_line_error(result, ("TF_CONFIG", "127.0.0.1:70000"))
    assert not (tmp_path / "logs").exists()


# A TPU's address whose connection hangs: stopped by SIGTERM and SIGINT too.


@pytest.mark.slow  # It starts TensorFlow in a process of its own.
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_the_connection_to_a_tpu_in_one_line(tmp_path, signum):
    """A TPU address whose connection hangs (its listener's backlog is full, so the kernel drops
    the SYN) is left at the signal, not after the connection's timeout."""
    with full_listener() as port:
        process = start("--strategy=tpu", f"--tpu=grpc://127.0.0.1:{port}", f"--logdir={tmp_path}", env={})
        wait_for_socket(process, SYN_SENT, port, remote=True)
        process.send_signal(signum)
        result = finish(process, timeout=60)
    assert result.returncode == 128 + signum, result.stderr
    name = signal.Signals(signum).name
    assert result.stderr == (
        f"train_loop: stopped by {name} while connecting to the TPU at grpc://127.0.0.1:{port}; nothing was written.\n"
    )
    assert os.listdir(tmp_path) == []


@contextlib.contextmanager
def full_listener() -> Iterator[int]:
    """A port whose listener accepts nothing and whose backlog is full: a connection to it hangs."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(8):
            client = stack.enter_context(socket.socket())
            client.settimeout(0.5)
            try:
                client.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            raise RuntimeError("the listener's backlog never filled")
        client.close()  # Its SYN, still unanswered, must not count as the process's.
        yield port
