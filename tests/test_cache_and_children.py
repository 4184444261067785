"""Files of ours a user can point at a FIFO or a device (the caches), and the study's training
processes: they end with the study, whether it is signalled or killed."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from conftest import REPO
from test_data import make_arrays, write_idx_set

from train_loop import files, orphans
from train_loop.data import idx
from train_loop.outputs import locks
from train_loop.training import speed_cache

# --- The caches: regular files only, up to a bound ---------------------------------------------------

SPECIAL_FILES = ["fifo", "/dev/zero", "/dev/full"]


def special_file(tmp_path: Path, kind: str) -> Path:
    if kind != "fifo":
        return Path(kind)
    os.mkfifo(tmp_path / "speed.json")
    return tmp_path / "speed.json"


def assert_unchanged(path: Path, kind: str) -> None:
    test = stat.S_ISFIFO if kind == "fifo" else stat.S_ISCHR
    assert test(path.stat().st_mode), f"{path} was replaced"


@pytest.mark.slow
@pytest.mark.parametrize("kind", SPECIAL_FILES)
def test_a_fifo_or_a_device_as_the_speed_cache_is_neither_read_nor_written(tmp_path, kind):
    """A FIFO hung the run and /dev/zero was read until memory ran out: now the run measures, as
    with a corrupt cache, finishes, and leaves the FIFO or the device as it was."""
    cache = special_file(tmp_path, kind)
    command = [
        sys.executable,
        "-m",
        "train_loop",
        "--dataset=digits",
        "--steps_per_loop=10",
        "--jit_compile=auto",
        f"--logdir={tmp_path}",
        "--run_name=r",
    ]
    finished = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, speed_cache.CACHE_ENV: str(cache)},
    )
    assert finished.returncode == 0, finished.stderr
    assert json.loads((tmp_path / "r" / "result.json").read_text())["decided"]["by"] == "measured"
    assert "measured on this CPU:" in finished.stdout
    assert_unchanged(cache, kind)


def test_a_speed_cache_past_its_bound_reads_as_empty_and_is_replaced(tmp_path):
    """The same entry is found in a small file and not in one padded past the bound; the next
    measurement replaces the padded file by a small one."""
    cache = speed_cache.SpeedCache(str(tmp_path / "speed.json"))
    entry = {"jit_compile": True, "examples_per_second": {"xla": 2.0, "no_xla": 1.0}}
    cache.put("step", entry)
    assert cache.get("step") == entry
    padded = {**json.loads(Path(cache.path).read_text()), "padding": "x" * (1 << 20)}
    Path(cache.path).write_text(json.dumps(padded))
    assert cache.get("step") is None
    cache.put("other", entry)
    assert json.loads(Path(cache.path).read_text()) == {"other": entry}


@pytest.mark.parametrize("kind", SPECIAL_FILES)
def test_a_special_file_where_regular_files_reads_is_an_oserror_naming_it(tmp_path, kind):
    path = special_file(tmp_path, kind)
    what = "a FIFO" if kind == "fifo" else "a character device"
    with pytest.raises(OSError, match=f"{what}, not a regular file"):
        files.read_regular(str(path), limit=100)  # Would block (FIFO) or fill memory (devices).
    files.replace_quietly(str(path), lambda stream: stream.write(b"{}"))
    assert_unchanged(path, kind)
    assert not Path(f"{path}.{os.getpid()}.tmp").exists()


def test_a_fifo_as_the_decoded_data_cache_is_decoded_around(tmp_path, monkeypatch):
    """A FIFO where the decoded IDX set is cached: the data is decoded from the IDX files, and
    the FIFO is left as it was. Read in a process of its own, bounded: a hang would block it."""
    monkeypatch.setenv(idx.DATA_CACHE_ENV, str(tmp_path / "cache"))
    arrays = make_arrays(seed=3)
    write_idx_set(tmp_path / "data", arrays, gz=True)
    read = (
        "from train_loop import Config; from train_loop.data import sources; "
        f"splits = sources.load_splits(Config(dataset='mnist', "
        f"data_dir={str(tmp_path / 'data')!r})); print(len(splits.x_train), int(splits.y_test.sum()))"
    )
    first = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, timeout=60, check=True)
    [cached] = (tmp_path / "cache").iterdir()
    cached.unlink()
    os.mkfifo(cached)
    again = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout == f"{len(arrays['x_train'])} {int(arrays['y_test'].sum())}\n"
    assert_unchanged(cached, "fifo")


# --- The study's training processes --------------------------------------------------------------------

STUDY = (
    "--experiments=baseline,l1",
    "--dataset=digits",
    "--epochs=2",
    "--steps_per_loop=5",
    "--checkpoint_every=10",
    "--study_name=mine",
    "--jobs=2",
)
NAMES = ("baseline", "l1")


def start_study(tmp_path: Path) -> tuple[subprocess.Popen, dict[int, str]]:
    """A study of two trainings at once, returned with both paused (SIGSTOP) mid-run, each just
    after its first checkpoint, and their names by PID: `resume` them once the signal under test
    is on its way. Paused, neither can finish before that signal arrives, however fast the
    machine (on a fast one, the first training used to end before the second's first checkpoint)."""
    study = subprocess.Popen(
        [sys.executable, "-m", "train_loop.study", *STUDY, f"--logdir={tmp_path}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    paused: dict[int, str] = {}
    deadline = time.monotonic() + 300
    while len(paused) < len(NAMES) and study.poll() is None and time.monotonic() < deadline:
        for pid in set(trainings_of(study.pid)) - set(paused):
            with contextlib.suppress(OSError, ValueError):  # It may have ended meanwhile.
                name = run_name_of(pid)
                if (tmp_path / "mine" / name / "checkpoints" / "checkpoint").exists():
                    os.kill(pid, signal.SIGSTOP)
                    paused[pid] = name
        time.sleep(0.02)
    if len(paused) < len(NAMES):
        resume(paused)
        study.kill()
        pytest.fail(f"the trainings were not under way: {study.communicate(timeout=60)}")
    return study, paused


def resume(pids: Iterable[int], *, pending: signal.Signals | None = None) -> None:
    """SIGCONT to paused trainings; first, if `pending`, waits (bounded) until that signal is
    pending in each, so that it is the first thing they see."""
    for pid in pids:
        deadline = time.monotonic() + 60
        while pending and not signal_pending(pid, pending) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(pid, signal.SIGCONT)


def signal_pending(pid: int, signum: signal.Signals) -> bool:
    """Whether `signum` waits in `pid`'s pending sets (its thread's or its process's), from /proc."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    masks = [int(line.split()[1], 16) for line in status if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask >> (signum - 1) & 1 for mask in masks)


def trainings_of(pid: int) -> list[int]:
    """The `python -m train_loop` processes whose parent is `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            if parent == pid and (entry / "cmdline").read_bytes().split(b"\0")[1:3] == [b"-m", b"train_loop"]:
                found.append(int(entry.name))
    return found


def run_name_of(pid: int) -> str:
    arguments = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    [name] = [argument.removeprefix("--run_name=") for argument in arguments if argument.startswith("--run_name=")]
    return name


@contextlib.contextmanager
def adopting_orphans() -> Iterator[None]:
    """This process as the child subreaper (PR_SET_CHILD_SUBREAPER): orphans of its descendants
    become its children, so it can wait for them and read their exit statuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, 1) == 0, os.strerror(ctypes.get_errno())
    try:
        yield
    finally:
        libc.prctl(36, 0)


def wait_for(pids: list[int], timeout: float) -> dict[int, int]:
    """Exit statuses of adopted processes as they end; those still running after `timeout` are
    killed (and left out)."""
    statuses, deadline = {}, time.monotonic() + timeout
    while len(statuses) < len(pids) and time.monotonic() < deadline:
        for pid in set(pids) - set(statuses):
            ended, status = os.waitpid(pid, os.WNOHANG)
            if ended:
                statuses[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    for pid in set(pids) - set(statuses):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return statuses


@pytest.mark.slow
def test_the_trainings_of_a_killed_study_stop_at_a_checkpoint_and_the_study_resumes_them(tmp_path):
    """SIGKILL leaves the study no way to pass a signal on: Linux sends its trainings SIGTERM
    (PR_SET_PDEATHSIG), and each stops as on any SIGTERM, at a checkpoint of the step it names;
    the same study command then finishes both."""
    with adopting_orphans(), contextlib.ExitStack() as stack:
        study, runs = start_study(tmp_path)
        # Their stderr is a file the study made (and unlinked): kept open here to read their last lines.
        stderrs = {pid: stack.enter_context(open(f"/proc/{pid}/fd/2")) for pid in runs}
        study.kill()
        study.communicate(timeout=60)
        resume(runs, pending=signal.SIGTERM)
        statuses = wait_for(list(runs), timeout=120)
        assert statuses == dict.fromkeys(runs, 128 + signal.SIGTERM)
        assert sorted(runs.values()) == sorted(NAMES)
        for pid, stderr in stderrs.items():
            last = stderr.read().splitlines()[-1]
            stopped = re.fullmatch(r"train_loop: stopped by SIGTERM at step (\d+) with a checkpoint; .*", last)
            assert stopped, last
            assert (tmp_path / "mine" / runs[pid] / "checkpoints" / f"ckpt-{stopped[1]}.index").exists()
    for name in NAMES:
        lock = locks.acquire(str(tmp_path / "mine" / name))  # None while a process still trains it.
        assert lock is not None, name
        lock.release()

    resumed = subprocess.run(
        [sys.executable, "-m", "train_loop.study", *STUDY, f"--logdir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert all(f"{name}: finished" in resumed.stdout for name in NAMES)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_study_alone_stops_every_training_at_a_checkpoint(tmp_path, signum):
    """`kill -INT` (or `-TERM`) reaches the study only (a Ctrl-C reaches its whole process group):
    it passes the signal on to its trainings, and ends with their one line and the signal's status."""
    study, runs = start_study(tmp_path)
    study.send_signal(signum)
    resume(runs, pending=signum)
    _, stderr = study.communicate(timeout=120)
    assert study.returncode == 128 + signum, stderr
    assert re.fullmatch(
        rf"train_loop: (baseline|l1): stopped by {signum.name} at step \d+ with a checkpoint; .*\n", stderr
    ), stderr
    for name in NAMES:
        assert not (tmp_path / "mine" / name / "result.json").exists()
        lock = locks.acquire(str(tmp_path / "mine" / name))
        assert lock is not None, name
        lock.release()


def test_a_child_whose_parent_died_before_it_asked_signals_itself(tmp_path):
    """The race `end_with_parent` closes: the parent it was given is gone (it is now an orphan),
    so it ends by SIGTERM at once, before it trains or writes anything."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    child = subprocess.run(
        [sys.executable, "-m", "train_loop", "--dataset=digits", f"--logdir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, orphans.PARENT_ENV: str(gone.pid)},
    )
    assert child.returncode == -signal.SIGTERM, child.stderr
    assert not list(tmp_path.iterdir())
