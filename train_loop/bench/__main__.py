"""`python -m train_loop.bench`."""

from train_loop.bench.main import run

run()
