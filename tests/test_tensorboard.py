"""TensorBoard's view of a real run: the CLI trains on digits, a real TensorBoard server loads the
logdir, and its HTTP API (scalars, histograms, HParams, text) must show what the loop wrote.

The server runs once per data loader: the Python one (`--load_fast=false`, loaded before it
serves) and, where `tensorboard-data-server` is installed, the Rust one that TensorBoard uses by
default (`--load_fast=true`, polled until every run folder is loaded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.util
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from train_loop.model.measurements import CLASSIFIER
from train_loop.outputs.custom_scalars import scalars_layout
from train_loop.outputs.experiment import COMPARED_METRICS

pytestmark = pytest.mark.slow  # every test here trains a model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY_EVERY = 10
TRAIN_FLAGS = ("--dataset=digits", "--epochs=2", "--l2=0.001", "--bias_l1=0.0001", f"--summary_every={SUMMARY_EVERY}")
LAYERS = ("conv1", "conv2", "dense")
TRAIN_SCALARS = {
    "loss/cross_entropy",
    "loss/regularization",
    "loss/total",
    "accuracy",
    "learning_rate",
    "examples_per_second",
    "gradient_norm",
    "regularization_ratio",
    *(f"{kind}/{layer}" for layer in LAYERS for kind in ("regularization", "weight_norm", "sparsity", "gradient_norm")),
}
INITIAL_SCALARS = ("regularization/", "loss/regularization", "weight_norm/", "sparsity/")  # also logged at step 0
EVAL_SCALARS = {"loss/cross_entropy", "accuracy"}
WEIGHT_HISTOGRAMS = {f"{kind}/{layer}" for layer in LAYERS for kind in ("kernel", "bias")}
GRADIENT_HISTOGRAMS = {f"gradient/{layer}" for layer in LAYERS}
LOADERS = {
    "python": ("--load_fast=false", "--reload_interval=0", "--reload_task=blocking"),
    "rustboard": ("--load_fast=true", "--reload_interval=0"),
}
STARTUP_SECONDS = 90
ALL_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


@dataclasses.dataclass(frozen=True)
class Run:
    """A finished run: its logdir, its folder's name (TensorBoard's run prefix), its result.json."""

    logdir: str
    name: str
    result: dict[str, Any]

    @property
    def train(self) -> str:
        return f"{self.name}/train"

    @property
    def validation(self) -> str:
        return f"{self.name}/validation"

    @property
    def test(self) -> str:
        return f"{self.name}/test"

    @property
    def steps_per_epoch(self) -> int:
        return self.result["steps"] // self.result["epochs"]

    def epoch_ends(self) -> list[int]:
        return list(range(self.steps_per_epoch, self.result["steps"] + 1, self.steps_per_epoch))

    def summary_steps(self) -> list[int]:
        """Steps of the train scalars: every SUMMARY_EVERY steps and at each epoch's end."""
        every = range(SUMMARY_EVERY, self.result["steps"] + 1, SUMMARY_EVERY)
        return sorted({*every, *self.epoch_ends()})


class Client:
    """JSON over HTTP to one TensorBoard, bypassing any proxy the environment names."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, path: str, **query: str) -> Any:
        url = f"{self.base_url}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        return self._json(urllib.request.Request(url))

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """A JSON body: TensorBoard's HParams routes parse `request.data`, so the content type must not
        be the form encoding urllib defaults to (werkzeug would consume the body as a form)."""
        request = urllib.request.Request(
            f"{self.base_url}{path}",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"},
        )
        return self._json(request)

    def get_bytes(self, path_and_query: str) -> tuple[str, bytes]:
        """The content type and body of a non-JSON route (an image)."""
        with self._opener.open(f"{self.base_url}{path_and_query}", timeout=30) as response:
            return response.headers.get_content_type(), response.read()

    def _json(self, request: urllib.request.Request) -> Any:
        with self._opener.open(request, timeout=30) as response:
            return json.load(response)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    """Trains one small run with the CLI, as `run_cli` does, once for the whole module."""
    logdir = str(tmp_path_factory.mktemp("tensorboard") / "logs")
    command = [sys.executable, "-m", "train_loop", f"--logdir={logdir}", *TRAIN_FLAGS]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=dict(os.environ))
    assert done.returncode == 0, f"training failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    (name,) = os.listdir(logdir)
    with open(os.path.join(logdir, name, "result.json")) as stream:
        return Run(logdir, name, json.load(stream))


@pytest.fixture(scope="module", params=sorted(LOADERS))
def tensorboard(request, run: Run, tmp_path_factory) -> Iterator[Client]:
    """A real TensorBoard on a free port over the run's logdir, loaded; always terminated."""
    with serve(run.logdir, request.param, tmp_path_factory.mktemp(f"tensorboard-{request.param}")) as client:
        yield client


@contextlib.contextmanager
def serve(logdir: str, loader: str, workdir) -> Iterator[Client]:
    """A real TensorBoard on a free port over `logdir`, loaded; always terminated."""
    if loader == "rustboard" and importlib.util.find_spec("tensorboard_data_server") is None:
        pytest.skip("tensorboard-data-server is not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = workdir / "tensorboard.log"
    command = [
        sys.executable,
        "-m",
        "tensorboard.main",
        f"--logdir={logdir}",
        "--host=127.0.0.1",
        f"--port={port}",
        *LOADERS[loader],
    ]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=dict(os.environ))
    try:
        client = Client(f"http://127.0.0.1:{port}")
        _wait_until_loaded(client, process, logdir, log_path)
        yield client
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_loaded(client: Client, process: subprocess.Popen, logdir: str, log_path) -> None:
    """Polls until the server answers and every folder holding an event file shows up as a run with
    data (the Rust loader lists a run before its data; it commits a run's data all at once)."""
    folders = {
        os.path.relpath(os.path.dirname(path), logdir)
        for path in glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)
    }
    deadline, loaded = time.monotonic() + STARTUP_SECONDS, set()
    while True:
        if process.poll() is not None:
            log = log_path.read_text()
            if "Could not start data server" in log or "--load_fast=true not available" in log:
                pytest.skip(f"TensorBoard's data server cannot run here:\n{log[-1000:]}")
            pytest.fail(f"TensorBoard exited with {process.returncode}:\n{log[-3000:]}")
        try:
            loaded = set()
            for plugin in ("scalars", "histograms", "text"):
                loaded |= set(client.get(f"/data/plugin/{plugin}/tags"))
            if folders <= loaded:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # Not listening yet.
        if time.monotonic() > deadline:
            pytest.fail(
                f"TensorBoard loaded {sorted(loaded)} of {sorted(folders)} "
                f"within {STARTUP_SECONDS} s:\n{log_path.read_text()[-3000:]}"
            )
        time.sleep(0.25)


def _series(client: Client, run_name: str, tag: str) -> list[tuple[int, float]]:
    """A scalar time series as (step, value); the API gives [wall_time, step, value] rows."""
    rows = client.get("/data/plugin/scalars/scalars", run=run_name, tag=tag)
    return [(step, value) for _, step, value in rows]


def test_scalar_tags(tensorboard: Client, run: Run):
    """Train has the losses, accuracy, learning rate, throughput and per-layer terms; validation
    and test the two evaluation scalars."""
    tags = tensorboard.get("/data/plugin/scalars/tags")
    assert set(tags) == {run.train, run.validation, run.test}
    assert set(tags[run.train]) == TRAIN_SCALARS
    assert set(tags[run.validation]) == set(tags[run.test]) == EVAL_SCALARS


def test_histogram_tags_and_steps(tensorboard: Client, run: Run):
    """Kernel and bias histograms of each weighted layer, at step 0 and at each epoch's end; its
    kernel gradient's at each epoch's end (step 0 has no gradient)."""
    tags = tensorboard.get("/data/plugin/histograms/tags")
    assert set(tags) == {run.train}
    assert set(tags[run.train]) == WEIGHT_HISTOGRAMS | GRADIENT_HISTOGRAMS
    for tag in sorted(WEIGHT_HISTOGRAMS | GRADIENT_HISTOGRAMS):
        rows = tensorboard.get("/data/plugin/histograms/histograms", run=run.train, tag=tag)
        initial = [] if tag in GRADIENT_HISTOGRAMS else [0]
        assert [step for _, step, _ in rows] == [*initial, *run.epoch_ends()], tag


def test_confusion_matrix_image_at_each_evaluation(tensorboard: Client, run: Run):
    """The images dashboard has the validation confusion matrix at every epoch's end and the
    test one at the last step, served as PNGs."""
    tags = tensorboard.get("/data/plugin/images/tags")
    assert set(tags) == {run.validation, run.test}
    assert set(tags[run.validation]) == set(tags[run.test]) == {"confusion_matrix"}
    test_rows = tensorboard.get("/data/plugin/images/images", run=run.test, tag="confusion_matrix", sample="0")
    assert [row["step"] for row in test_rows] == [run.result["steps"]]
    rows = tensorboard.get("/data/plugin/images/images", run=run.validation, tag="confusion_matrix", sample="0")
    assert [row["step"] for row in rows] == run.epoch_ends()
    content_type, png = tensorboard.get_bytes(f"/data/plugin/images/individualImage?{rows[-1]['query']}")
    assert content_type == "image/png" and png.startswith(b"\x89PNG\r\n\x1a\n")
    # The IHDR chunk's width and height: 10 cells of 16 pixels, and a row and a column of labels.
    assert struct.unpack(">II", png[16:24]) == (176, 176)


def test_confusion_matrix_counts_as_a_table_at_each_evaluation(tensorboard: Client, run: Run):
    """Beside the image, the text dashboard has the counts, which the image only shades: at each
    validation, and once for the test split, whose table is result.json's matrix."""
    validation = tensorboard.get("/data/plugin/text/text", run=run.validation, tag="confusion_matrix_counts")
    assert [entry["step"] for entry in validation] == run.epoch_ends()
    [test] = tensorboard.get("/data/plugin/text/text", run=run.test, tag="confusion_matrix_counts")
    assert test["step"] == run.result["steps"]
    rows = re.findall(r"<tr>(.*?)</tr>", test["text"], flags=re.DOTALL)
    cells = [re.findall(r"<t[hd]>(.*?)</t[hd]>", row) for row in rows]
    labels = [str(label) for label in range(10)]
    assert cells[0] == ["true \\ predicted", *labels]
    assert [row[0] for row in cells[1:]] == labels
    assert [[int(count) for count in row[1:]] for row in cells[1:]] == run.result["confusion_matrix"]


def test_evaluation_series_match_result(tensorboard: Client, run: Run):
    """Validation is logged at each epoch's last step, the test split once at the last; their
    last values are result.json's `validation` and `test`."""
    for tag, key in (("accuracy", "accuracy"), ("loss/cross_entropy", "cross_entropy")):
        for writer, steps in ((run.validation, run.epoch_ends()), (run.test, [run.result["steps"]])):
            series = _series(tensorboard, writer, tag)
            assert [step for step, _ in series] == steps, (writer, tag)
            split = writer.rsplit("/", 1)[1]
            assert series[-1][1] == pytest.approx(run.result[split][key], abs=1e-6), (writer, tag)


def test_train_series_steps_and_values(tensorboard: Client, run: Run):
    """Train scalars at every summary step (plus step 0 for the regularization terms); the total
    is the sum of its parts, the learning rate the flag's."""
    steps = run.summary_steps()
    series = {tag: _series(tensorboard, run.train, tag) for tag in sorted(TRAIN_SCALARS)}
    for tag, points in series.items():
        expected = [0, *steps] if tag.startswith(INITIAL_SCALARS) else steps
        assert [step for step, _ in points] == expected, tag
    cross_entropy, regularization = dict(series["loss/cross_entropy"]), dict(series["loss/regularization"])
    for step, total in series["loss/total"]:
        assert total == pytest.approx(cross_entropy[step] + regularization[step], rel=1e-5), step
    for step, ratio in series["regularization_ratio"]:
        assert ratio == pytest.approx(regularization[step] / cross_entropy[step], rel=1e-5), step
    assert all(0.0 <= value <= 1.0 for tag in series if tag.startswith("sparsity/") for _, value in series[tag])
    assert all(value == pytest.approx(0.001) for _, value in series["learning_rate"])
    assert all(value > 0 for _, value in series["examples_per_second"])
    assert all(0.0 <= value <= 1.0 for _, value in series["accuracy"])


def test_hparams_experiment(tensorboard: Client, run: Run):
    """The experiment lists the run's settings as hparams and its scalars as metrics."""
    experiment = tensorboard.post("/data/plugin/hparams/experiment", {"experimentName": ""})
    hparams = {info["name"]: info for info in experiment["hparamInfos"]}
    assert {
        "l2",
        "l1",
        "bias_l1",
        "dataset",
        "batch_size",
        "epochs",
        "optimizer",
        "learning_rate",
        "model",
        "seed",
        "replicas",
    } <= set(hparams)
    assert not {"logdir", "run_name", "data_dir"} & set(hparams)
    assert hparams["l2"]["domainInterval"] == {"minValue": 0.001, "maxValue": 0.001}
    assert hparams["dataset"]["domainDiscrete"] == ["digits"]
    metrics = {(info["name"]["group"], info["name"]["tag"]) for info in experiment["metricInfos"]}
    assert {
        ("validation", "accuracy"),
        ("test", "accuracy"),
        ("test", "loss/cross_entropy"),
        ("train", "loss/total"),
        ("train", "accuracy"),
    } <= metrics


def test_hparams_session_group(tensorboard: Client, run: Run):
    """The run is one session with its settings and its test accuracy and last train total loss."""
    hparam_names = ("l2", "dataset", "batch_size")
    metric_names = [{"group": "test", "tag": "accuracy"}, {"group": "train", "tag": "loss/total"}]
    body = {
        "experimentName": "",
        "allowedStatuses": ALL_STATUSES,
        "colParams": [
            *({"hparam": name, "includeInResult": True} for name in hparam_names),
            *({"metric": name, "includeInResult": True} for name in metric_names),
        ],
        "startIndex": 0,
        "sliceSize": 10,
        "includeMetrics": True,
    }
    response = tensorboard.post("/data/plugin/hparams/session_groups", body)
    assert response["totalSize"] == 1
    (group,) = response["sessionGroups"]
    assert group["name"] == run.name
    assert [session["name"] for session in group["sessions"]] == [run.name]
    assert group["hparams"] == {"l2": 0.001, "dataset": "digits", "batch_size": 32}
    metrics = {(value["name"]["group"], value["name"]["tag"]): value for value in group["metricValues"]}
    accuracy, total = metrics["test", "accuracy"], metrics["train", "loss/total"]
    assert accuracy["value"] == pytest.approx(run.result["test"]["accuracy"], abs=1e-6)
    assert accuracy["trainingStep"] == total["trainingStep"] == run.result["steps"]
    assert total["value"] == pytest.approx(_series(tensorboard, run.train, "loss/total")[-1][1], abs=1e-6)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> str:
    """A logdir of two one-epoch runs, `a` and then `b`, that differ in --l2 alone."""
    logdir = str(tmp_path_factory.mktemp("two-runs") / "logs")
    for name, l2 in (("a", 0.0), ("b", 0.001)):
        command = [
            sys.executable,
            "-m",
            "train_loop",
            f"--logdir={logdir}",
            "--dataset=digits",
            "--epochs=1",
            f"--l2={l2}",
            f"--run_name={name}",
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=dict(os.environ))
        assert done.returncode == 0, f"training failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return logdir


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_hparams_lists_only_the_settings_that_differ(two_runs: str, loader: str, tmp_path):
    """The HParams table's columns are l2, the one setting the runs differ in, then the final
    metrics; the newest run holds the logdir's one experiment; each run is a session with its l2."""
    body = {
        "experimentName": "",
        "allowedStatuses": ALL_STATUSES,
        "startIndex": 0,
        "sliceSize": 10,
        "colParams": [{"hparam": "l2", "includeInResult": True}],
        "includeMetrics": True,
    }
    with serve(two_runs, loader, tmp_path) as client:
        experiment = client.post("/data/plugin/hparams/experiment", {"experimentName": ""})
        groups = client.post("/data/plugin/hparams/session_groups", body)["sessionGroups"]
    assert [info["name"] for info in experiment["hparamInfos"]] == ["l2"]
    assert [(info["name"]["group"], info["name"]["tag"]) for info in experiment["metricInfos"]] == list(
        COMPARED_METRICS
    )
    assert {group["name"]: group["hparams"] for group in groups} == {"a": {"l2": 0.0}, "b": {"l2": 0.001}}
    assert [
        os.path.relpath(path, two_runs).split(os.sep)[0]
        for path in glob.glob(os.path.join(two_runs, "*", "events.out.tfevents.*.experiment"))
    ] == ["b"]


def test_settings_text(tensorboard: Client, run: Run):
    """The settings table is a text summary of the run's root, rendered with its values."""
    assert tensorboard.get("/data/plugin/text/tags") == {
        run.name: ["settings"],
        run.validation: ["confusion_matrix_counts"],
        run.test: ["confusion_matrix_counts"],
    }
    (entry,) = tensorboard.get("/data/plugin/text/text", run=run.name, tag="settings")
    assert entry["step"] == 0
    for key, value in (("l2", "0.001"), ("dataset", "digits"), ("batch_size", "32")):
        assert f"<td>{key}</td>\n<td>{value}</td>" in entry["text"], key


def test_custom_scalars_layout_matches_the_logged_tags(tensorboard: Client, run: Run):
    """The Custom Scalars dashboard's layout, as TensorBoard serves it, is the one written; its
    charts, by their own regular expressions, find the loss and its terms in train (the
    cross-entropy in validation and test too), each layer's regularization, weight and gradient
    norms, the global gradient norm and the accuracy."""
    layout = tensorboard.get("/data/plugin/custom_scalars/layout")
    written = scalars_layout(CLASSIFIER)
    assert [category["title"] for category in layout["category"]] == [category.title for category in written.category]
    found = {}
    for category in layout["category"]:
        for chart in category["chart"]:
            for run_name in (run.train, run.validation, run.test):
                for pattern in chart["multiline"]["tag"]:
                    response = tensorboard.get("/data/plugin/custom_scalars/scalars", run=run_name, tag=pattern)
                    assert response["regex_valid"], pattern
                    found.setdefault(chart["title"], set()).update(
                        (run_name, tag) for tag, rows in response["tag_to_events"].items() if rows
                    )
    losses = ("loss/cross_entropy", "loss/regularization", "loss/total")
    evaluated = {(name, "loss/cross_entropy") for name in (run.validation, run.test)}
    assert found == {
        "the loss and its terms": {(run.train, tag) for tag in losses} | evaluated,
        "loss/cross_entropy": {(run.train, "loss/cross_entropy")} | evaluated,
        "loss/regularization": {(run.train, "loss/regularization")},
        "loss/total": {(run.train, "loss/total")},
        **{
            f"{kind}/<layer>": {(run.train, f"{kind}/{layer}") for layer in LAYERS}
            for kind in ("regularization", "weight_norm", "gradient_norm")
        },
        "gradient_norm (all weights)": {(run.train, "gradient_norm")},
        "accuracy": {(name, "accuracy") for name in (run.train, run.validation, run.test)},
    }
