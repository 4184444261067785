"""`python -m train_loop.compare <folder>`: the study's table for runs already trained, no training."""

from __future__ import annotations

from collections.abc import Sequence

from absl import app

from train_loop import cli, startup


def main(argv: Sequence[str]) -> None:
    if len(argv) != 2:
        cli.fail("give one folder: python -m train_loop.compare <folder holding runs>.")

    def compare() -> None:
        startup.start_tensorflow()
        from train_loop import report

        print(report.table(report.finished_runs(argv[1])).markdown(), end="")

    cli.run_guarded(compare)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
