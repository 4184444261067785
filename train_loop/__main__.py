"""`python -m train_loop`: runs the absl app in `cli`."""

from train_loop.cli import run

if __name__ == "__main__":
    run()
