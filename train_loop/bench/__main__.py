"""`python -m train_loop.bench`."""

from train_loop.bench import run

run()
