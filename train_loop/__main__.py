"""`python -m train_loop`: runs the absl app in `cli`."""

from train_loop import cli

if __name__ == "__main__":
    cli.run()
