"""What the user sees: a Keras progress bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

from train_loop.console import Console

MEASURES = {"cross_entropy": 0.5, "regularization": 0.25, "total": 0.75, "accuracy": 0.875}


def test_plain_lines_when_not_a_terminal(capsys):
    console = Console(steps_per_epoch=10, num_epochs=2, interactive=False)
    console.progress(15, MEASURES)
    console.epoch_done(2, MEASURES, {"cross_entropy": 0.4, "accuracy": 0.9}, 1234.5)
    console.epoch_done(2, MEASURES, None, 1234.5)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("epoch 2/2 step 5/10: cross_entropy 0.5000 regularization 0.2500 "
                        "total 0.7500 accuracy 0.8750")
    assert lines[1].startswith("epoch 2/2: train cross_entropy 0.5000 regularization 0.2500")
    assert lines[1].endswith("| validation cross_entropy 0.4000 accuracy 0.9000 | 1,234 examples/s")
    assert lines[2].endswith("accuracy 0.8750 | 1,234 examples/s"), "no validation split, no validation"


def test_progress_bar_on_a_terminal(capsys):
    console = Console(steps_per_epoch=10, num_epochs=1, interactive=True)
    console.progress(4, MEASURES)
    console.progress(10, MEASURES)
    out = capsys.readouterr().out
    assert "10/10" in out and "cross_entropy: 0.5000" in out and "regularization: 0.2500" in out
