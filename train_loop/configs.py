"""The run's settings: one frozen, validated `Config` of plain types (no TensorFlow here)."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from train_loop.errors import UsageError

DATASETS = ("mnist", "fashion_mnist", "digits", "synthetic")
# What `--dataset` records for arrays given to `train_loop.train(data=...)`: this, then their fingerprint.
ARRAYS_PREFIX = "arrays:"
MODELS = ("convnet", "linear")
OPTIMIZERS = ("rmsprop", "adam", "sgd")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
CLUSTER_RESOLVERS = ("tf_config", "slurm")  # Where a multi-worker run learns its cluster.
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
LR_SCHEDULES = ("constant", "cosine", "step")
# What --best_metric may name, and whether a higher value is better.
BEST_METRICS = {"validation/accuracy": True, "validation/cross_entropy": False}
EXPORTS = ("saved_model", "none")
# Keras' initializers take seeds in [0, 2**32); each layer adds a small offset to `seed`, so the
# flag stays in the int32 range, which every seeded op accepts.
MAX_SEED = 2**31 - 1

# Settings that change what is computed, so they name the run; the rest (where and how fast)
# may differ between a run and its resumption without changing a single number.
_NAMING_FIELDS = (
    "dataset",
    "dropout",
    "l1",
    "l2",
    "bias_l1",
    "bias_l2",
    "epochs",
    "batch_size",
    "optimizer",
    "learning_rate",
    "seed",
    "precision",
    "lr_schedule",
    "lr_decay_steps",
    "lr_decay_rate",
    "warmup_steps",
    "global_clipnorm",
    "weight_decay",
    "ema",
    "validation_split",
    "best_metric",
    "early_stopping_patience",
    "early_stopping_min_delta",
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything one run needs; built from flags by `cli`, or directly by tests and notebooks."""

    dataset: str = "mnist"
    data_dir: str = ""
    model: str = "convnet"
    dropout: float = 0.0
    l1: float = 0.0
    l2: float = 0.0
    bias_l1: float = 0.0
    bias_l2: float = 0.0
    epochs: int = 1
    batch_size: int = 32
    optimizer: str = "rmsprop"
    learning_rate: float = 0.001
    lr_schedule: str = "constant"
    lr_decay_steps: int = 0  # 0 with cosine or step: from the run's length (`with_run_length`).
    lr_decay_rate: float = 0.1  # step: the factor applied every lr_decay_steps.
    warmup_steps: int = 0
    global_clipnorm: float = 0.0  # 0: no clipping.
    weight_decay: float = 0.0
    ema: float = 0.0  # 0: no moving average of the weights.
    validation_split: float = 0.1  # Held out of the training split; 0: none.
    eval_every: int = 0  # Steps between validations; 0: at the end of each epoch.
    best_metric: str = ""  # One of BEST_METRICS; empty: the run keeps its last weights.
    early_stopping_patience: int = 0  # Validations without improvement before stopping; 0: never.
    early_stopping_min_delta: float = 0.0
    export: str = "saved_model"
    strategy: str = "auto"
    cpu_replicas: int = 0
    logdir: str = "logdir"  # Made absolute when the Config is built (the working folder's then).
    run_name: str = ""
    steps_per_loop: int = 100
    summary_every: int = 100
    histogram_every: int = 0
    checkpoint_every: int = 0
    seed: int = 0
    jit_compile: bool | str = "auto"  # True, False, or "auto": measured on this machine (training/xla_choice.py).
    precision: str = "float32"
    profile_steps: str = ""
    deterministic: bool = False
    tpu: str = ""
    cluster_resolver: str = "tf_config"

    def __post_init__(self) -> None:
        # Resolved once, where the run starts: a relative logdir would follow the working folder, which
        # a user's code may change mid-run (splitting the run in two), and TensorFlow rewrites a
        # checkpoint index under a relative folder with paths that climb out of it.
        object.__setattr__(self, "logdir", os.path.abspath(self.logdir))
        _check_dataset(self.dataset)
        _check_model(self.model)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("cluster_resolver", self.cluster_resolver, CLUSTER_RESOLVERS)
        if self.cluster_resolver != "tf_config" and self.strategy != "multi_worker":
            raise UsageError(
                f"--cluster_resolver={self.cluster_resolver} finds the workers of a multi-worker run: "
                "add --strategy=multi_worker."
            )
        for name in ("l1", "l2", "bias_l1", "bias_l2"):
            _check_factor(name, getattr(self, name))
        if not (math.isfinite(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise UsageError(
                f"--dropout={self.dropout} must be in [0, 1): it is the fraction of "
                "activations dropped; use 0 for no Dropout layer."
            )
        if self.dropout and self.model not in MODELS:
            raise UsageError(
                f"--dropout={self.dropout} applies to the built-in models only, not to --model={self.model}: "
                "add Dropout layers to your model instead."
            )
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UsageError(
                f"--learning_rate={self.learning_rate} must be a positive finite number, e.g. --learning_rate=0.001."
            )
        _check_optimizer_settings(self)
        for name in ("epochs", "batch_size", "steps_per_loop", "summary_every"):
            _check_positive(name, getattr(self, name))
        if not (math.isfinite(self.validation_split) and 0.0 <= self.validation_split < 1.0):
            raise UsageError(
                f"--validation_split={self.validation_split} must be in [0, 1): the share of the training "
                "split held out for validation, e.g. 0.1; 0 for none."
            )
        if self.eval_every and not self.validation_split:
            raise UsageError(
                f"--eval_every={self.eval_every} evaluates the validation split, and --validation_split=0 "
                "holds none out: pass --validation_split=0.1, or leave --eval_every out."
            )
        _check_best_model_settings(self)
        _check_choice("export", self.export, EXPORTS)
        for name in ("histogram_every", "checkpoint_every", "eval_every", "cpu_replicas"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name}={getattr(self, name)} must be 0 or more (0 means its default).")
        if not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"--seed={self.seed} must be in [0, {MAX_SEED}], the range the weight initializers take.")
        if self.cpu_replicas == 1:
            raise UsageError("--cpu_replicas=1 splits nothing: use 0 (no split) or 2 or more.")
        if self.jit_compile not in (True, False, "auto") or not isinstance(self.jit_compile, (bool, str)):
            raise UsageError(
                f"--jit_compile={self.jit_compile!r} must be auto (measure both on this machine), true or false."
            )
        _parse_profile_steps(self.profile_steps)
        if "/" in self.run_name or self.run_name in (".", ".."):
            raise UsageError(f"--run_name={self.run_name!r} must be a plain folder name, without '/'.")

    @property
    def default_run_name(self) -> str:
        """The model plus every naming setting that differs from its default: `convnet-l2=0.001`."""
        return "-".join([self.model_name, *self.changed_settings()])

    def changed_settings(self) -> list[str]:
        """Each naming setting that differs from its default, as `name=value` (`l2=0.001`)."""
        defaults = Config()
        parts = []
        for name in _NAMING_FIELDS:
            value = getattr(self, name)
            if value != getattr(defaults, name):
                value = self.dataset_name if name == "dataset" else value
                parts.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
        return parts

    @property
    def dataset_name(self) -> str:
        """The data set as a folder-name part: `wine` for `data/wine.npz`, `arrays` for arrays."""
        return _short_name(self.dataset)

    @property
    def model_name(self) -> str:
        """The model as a folder-name part: `wine.build` for `examples/wine.py:build`."""
        return _short_name(self.model)

    @property
    def profile_range(self) -> tuple[int, int] | None:
        """`--profile_steps=START,END` as (START, END), or None when not profiling."""
        return _parse_profile_steps(self.profile_steps)

    def with_run_length(self, steps_per_epoch: int) -> Config:
        """This config with a decaying schedule's `lr_decay_steps` of 0 taken from the run's length,
        as Hugging Face's and Lightning's schedulers do: cosine decays to 0 over every step after
        the warm-up; step multiplies the rate by `lr_decay_rate` at the end of each epoch.

        The steps it takes name the run, as if they had been given.

        Raises:
          UsageError: the warm-up leaves no step of the run to decay over.
        """
        if self.lr_schedule == "constant" or self.lr_decay_steps:
            return self
        total = steps_per_epoch * self.epochs
        steps = total - self.warmup_steps if self.lr_schedule == "cosine" else steps_per_epoch
        if steps <= 0:
            raise UsageError(
                f"--warmup_steps={self.warmup_steps} leaves none of this run's {total} steps to decay over with "
                "--lr_schedule=cosine: pass fewer --warmup_steps, more --epochs, or --lr_decay_steps."
            )
        return dataclasses.replace(self, lr_decay_steps=steps)

    def naming_settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it resumes."""
        return {name: getattr(self, name) for name in ("model", *_NAMING_FIELDS)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parse_profile_steps(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        start, end = (int(part) for part in text.split(","))
    except ValueError:
        start = end = -1
    if not 0 <= start < end:
        raise UsageError(
            f"--profile_steps={text!r} must be START,END with 0 <= START < END, e.g. --profile_steps=100,110."
        )
    return start, end


def _check_optimizer_settings(config: Config) -> None:
    """The learning-rate schedule, clipping, decoupled weight decay and the weights' average."""
    _check_choice("lr_schedule", config.lr_schedule, LR_SCHEDULES)
    if config.lr_schedule == "constant" and config.lr_decay_steps:
        raise UsageError(
            f"--lr_decay_steps={config.lr_decay_steps} has no effect with --lr_schedule=constant: "
            "pass --lr_schedule=cosine or step, or leave --lr_decay_steps out."
        )
    if config.lr_decay_steps < 0:
        raise UsageError(
            f"--lr_decay_steps={config.lr_decay_steps} must be a positive integer with "
            f"--lr_schedule={config.lr_schedule}: the steps over which the rate decays, e.g. --lr_decay_steps=1000; "
            "or leave it out to decay over the run's length."
        )
    if not (math.isfinite(config.lr_decay_rate) and 0.0 < config.lr_decay_rate <= 1.0):
        raise UsageError(
            f"--lr_decay_rate={config.lr_decay_rate} must be in (0, 1]: the factor --lr_schedule=step "
            "multiplies the rate by every --lr_decay_steps, e.g. --lr_decay_rate=0.1."
        )
    if config.lr_schedule != "step" and config.lr_decay_rate != Config.lr_decay_rate:
        raise UsageError(
            f"--lr_decay_rate={config.lr_decay_rate} has no effect with --lr_schedule={config.lr_schedule}: "
            "pass --lr_schedule=step, or leave --lr_decay_rate out."
        )
    if config.warmup_steps < 0:
        raise UsageError(f"--warmup_steps={config.warmup_steps} must be 0 or more (0: no warm-up).")
    for name in ("global_clipnorm", "weight_decay"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{name}={value} must be a finite number >= 0 (0 turns it off).")
    if not (math.isfinite(config.ema) and 0.0 <= config.ema < 1.0):
        raise UsageError(
            f"--ema={config.ema} must be in [0, 1): the momentum of the weights' moving average, "
            "e.g. --ema=0.999; 0 turns it off."
        )


def _check_best_model_settings(config: Config) -> None:
    """`--best_metric` needs a validation split; early stopping needs a best metric."""
    if config.best_metric and config.best_metric not in BEST_METRICS:
        raise UsageError(
            f"--best_metric={config.best_metric!r} is not one of {', '.join(BEST_METRICS)} (or empty: keep the "
            "last weights)."
        )
    if config.best_metric and not config.validation_split:
        raise UsageError(
            f"--best_metric={config.best_metric} is measured on the validation split, and --validation_split=0 "
            "holds none out: pass --validation_split=0.1."
        )
    if config.early_stopping_patience < 0:
        raise UsageError(
            f"--early_stopping_patience={config.early_stopping_patience} must be 0 or more: the validations "
            "without improvement before the run stops (0: never stop early)."
        )
    if config.early_stopping_patience and not config.best_metric:
        raise UsageError(
            f"--early_stopping_patience={config.early_stopping_patience} needs --best_metric to say what "
            "improves: pass --best_metric=validation/accuracy or validation/cross_entropy."
        )
    if not (math.isfinite(config.early_stopping_min_delta) and config.early_stopping_min_delta >= 0):
        raise UsageError(
            f"--early_stopping_min_delta={config.early_stopping_min_delta} must be a finite number >= 0: "
            "the least change of --best_metric that counts as an improvement."
        )
    if config.early_stopping_min_delta and not config.best_metric:
        raise UsageError(
            f"--early_stopping_min_delta={config.early_stopping_min_delta} needs --best_metric: pass "
            "--best_metric=validation/accuracy or validation/cross_entropy."
        )


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS and not dataset.endswith(".npz") and not dataset.startswith(ARRAYS_PREFIX):
        raise UsageError(
            f"--dataset={dataset} is not one of {', '.join(DATASETS)}, nor a path to an .npz holding "
            "x_train, y_train, x_test, y_test."
        )


def _check_model(model: str) -> None:
    module, _, function = model.rpartition(":")
    if model not in MODELS and not (module and function.isidentifier()):
        raise UsageError(
            f"--model={model} is not one of {', '.join(MODELS)}, nor a model function given as "
            "PATH.py:FUNCTION or package.module:FUNCTION."
        )


def _short_name(setting: str) -> str:
    """A model function or data path as a folder-name part: `examples/wine.py:build` is `wine.build`."""
    if setting.startswith(ARRAYS_PREFIX):
        return "arrays"
    module, _, function = setting.rpartition(":")
    stem = os.path.basename(module or setting).removesuffix(".py").removesuffix(".npz")
    return f"{stem}.{function}" if module else stem


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"--{name}={value!r} is not one of {', '.join(choices)}.")


def _check_factor(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise UsageError(f"--{name}={value} must be a finite number >= 0 (a regularization factor; 0 turns it off).")


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise UsageError(f"--{name}={value} must be a positive integer.")
