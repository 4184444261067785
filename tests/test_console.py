"""What the user sees: a progress bar on a terminal or in Jupyter, one line per epoch elsewhere,
an `Epoch i/N` header before each epoch and, at the end, where the run is (the lines' exact
shapes: tests/test_console_lines.py)."""

from __future__ import annotations

import sys
import types

import pytest

from train_loop.training.console import Console

MEASURES = {"cross_entropy": 0.5, "regularization": 0.25, "total": 0.75, "accuracy": 0.875}


def test_plain_lines_when_not_a_terminal(capsys):
    console = Console(steps_per_epoch=10, num_epochs=2, interactive=False)
    console.progress(15, MEASURES)
    console.epoch_done(2, MEASURES, {"cross_entropy": 0.4, "accuracy": 0.9}, 1234.5)
    console.epoch_done(2, MEASURES, None, 1234.5)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, "no line for the progress within an epoch"
    assert lines[0].startswith("epoch 2/2: train cross_entropy 0.5000 regularization 0.2500")
    assert lines[0].endswith("| validation cross_entropy 0.4000 accuracy 0.9000 | 1,234 examples/s")
    assert lines[1].endswith("accuracy 0.8750 | 1,234 examples/s"), "no validation split, no validation"


def test_progress_bar_on_a_terminal(capsys):
    console = Console(steps_per_epoch=10, num_epochs=1, interactive=True)
    console.progress(4, MEASURES)
    console.progress(10, MEASURES)
    out = capsys.readouterr().out
    assert "\rstep 10/10 [====================] | train cross_entropy 0.5000 regularization 0.2500 " in out


@pytest.mark.parametrize("in_jupyter", [True, False])
def test_the_bar_in_jupyter_and_plain_lines_in_a_pipe(capsys, monkeypatch, in_jupyter):
    """Jupyter's stdout is no terminal; Keras' Progbar knows it by `ipykernel`, and so does Console."""
    if in_jupyter:
        monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    else:
        monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    console = Console(steps_per_epoch=10, num_epochs=1)
    console.progress(10, MEASURES)
    out = capsys.readouterr().out
    if in_jupyter:
        assert out.startswith("\rstep 10/10 [====================] | train cross_entropy 0.5000 "), out
    else:
        assert out == "", "a pipe: no line for the progress within an epoch"


def test_epoch_headers_once_each_and_mid_epoch_after_a_resume(capsys):
    console = Console(steps_per_epoch=10, num_epochs=3, interactive=False)
    for step in (15, 17, 20, 25):  # Resumed at step 15, in the second epoch.
        console.begin_epoch(step)
    assert capsys.readouterr().out.splitlines() == ["Epoch 2/3", "Epoch 3/3"]


def test_a_worker_that_is_not_the_chief_shows_no_progress(capsys):
    console = Console(steps_per_epoch=10, num_epochs=1, interactive=False, show_progress=False)
    console.say("training")
    console.begin_epoch(0)
    console.progress(10, MEASURES)
    console.epoch_done(1, MEASURES, None, 1.0)
    console.tested({"cross_entropy": 0.4, "accuracy": 0.9})
    console.finished("logs/run", "logs")
    assert capsys.readouterr().out == "training\n"
