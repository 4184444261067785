"""`python -m train_loop.compare <folder>`: the study's table for runs already trained, no training."""

from __future__ import annotations

from collections.abc import Sequence

from train_loop import apps, cli, startup


def main(argv: Sequence[str]) -> None:
    if len(argv) != 2:
        apps.fail("give one folder: python -m train_loop.compare <folder holding runs>.")

    def compare() -> None:
        startup.start_tensorflow()
        from train_loop.study import report

        print(report.table(report.finished_runs(argv[1])).markdown(), end="")

    cli.run_guarded(compare)


USAGE = """Usage: train-loop-compare FOLDER   (or: python -m train_loop.compare FOLDER)

Prints the study's comparison table for the finished runs in FOLDER, without training.
"""


def run() -> None:
    """The console script `train-loop-compare` and `python -m train_loop.compare`."""
    apps.run(main, usage=USAGE, groups={})


if __name__ == "__main__":
    run()
