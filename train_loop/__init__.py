"""train_loop: a hand-written TensorFlow 2 training loop that shows every term of its loss."""

from train_loop.configs import Config
from train_loop.errors import UsageError


def train(config: Config | None = None, **settings) -> dict:
    """Trains one run and returns its result (what `result.json` holds).

    Pass a `Config`, or its fields as keywords: `train_loop.train(dataset="digits", l2=1e-3)`.
    TensorFlow is imported on the first call, not on `import train_loop`.
    """
    from train_loop.loop import train as train_config  # Deferred: importing TensorFlow takes seconds.

    return train_config(config if config is not None else Config(**settings))


__all__ = ["Config", "UsageError", "train"]
