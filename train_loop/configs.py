"""The run's settings: one frozen `Config` of plain types (no TensorFlow here), checked where it
is built (`settings`), and the run's name made from it."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from train_loop import settings
from train_loop.errors import UsageError
from train_loop.settings import ARRAYS_PREFIX, TFRECORD_PREFIX

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
    "loss",
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
    # Streamed data (issue 21).
    "input",
    "shuffle_buffer",
    "steps_per_epoch",
    # What a divergence does (issue 22): a rollback changes the numbers from there on.
    "on_divergence",
    "divergence_lr_factor",
    "divergence_skip",
    "max_rollbacks",
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
    best_metric: str = ""  # validation/<a term or metric of the task>; empty: the run keeps its last weights.
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
    # What the run minimizes (model/tasks.py): the classifier when all three are empty.
    loss: str = ""  # A Keras loss's registered name.
    metrics: str = ""  # Keras metric names, comma-separated.
    task: str = ""  # PATH.py:NAME or package.module:NAME of a task object.
    # Gradient accumulation: each update's batch run as this many micro-batches, one after another.
    accumulation_steps: int = 1
    # Streamed data (data/streams.py): an input function, the shuffle buffer, and an epoch's steps.
    input: str = ""  # PATH.py:FUNCTION or package.module:FUNCTION, `input_fn(split, context)`; replaces --dataset.
    shuffle_buffer: int = 10_000  # Examples in a stream's shuffle buffer; 0: no shuffling.
    steps_per_epoch: int = 0  # 0: one pass over a finite stream; needed for an infinite or unknown-length one.
    # Weights exempt from the global regularizers and from weight decay (regular expressions; "": none).
    l2_exclude: str = ""  # Searched in each weight's `<layer path>/<weight name>` (models.excluded_weights).
    weight_decay_exclude: str = ""  # Searched in each weight's own name, by Keras' exclude_from_weight_decay.
    # Before training, audit the regularizers and prove their gradients reach the update (checks/regularizers.py).
    check_regularizers: bool = False
    # Before training, the first update on the run's strategy against one device (checks/equivalence.py).
    check_equivalence: bool = False
    # A loop call whose measurements are not finite (training/divergence.py): stop, or roll back and go on.
    on_divergence: str = "stop"  # stop or rollback; either way the divergence is reported.
    divergence_lr_factor: float = 1.0  # rollback: multiplies the learning rate from each rollback on.
    divergence_skip: bool = False  # rollback: the step that diverged is skipped (its batch is not trained on).
    max_rollbacks: int = 3  # rollback: past this many, the run stops as with stop.

    def __post_init__(self) -> None:
        # Resolved once, where the run starts: a relative logdir would follow the working folder, which
        # a user's code may change mid-run (splitting the run in two), and TensorFlow rewrites a
        # checkpoint index under a relative folder with paths that climb out of it.
        object.__setattr__(self, "logdir", os.path.abspath(self.logdir))
        settings.check(self)

    @property
    def default_run_name(self) -> str:
        """The model (a task's, which gives its model) plus every naming setting that differs from its
        default: `convnet-l2=0.001`, `vae.VAE-dataset=fashion_mnist`. One folder: a value's "/"
        (`best_metric=validation/accuracy`) becomes "." rather than a folder inside another."""
        parts = [_short_name(self.task) if self.task else self.model_name, *self.changed_settings()]
        return "-".join(parts).replace("/", ".")

    def changed_settings(self) -> list[str]:
        """Each naming setting that differs from its default, as `name=value` (`l2=0.001`)."""
        defaults = Config()
        parts = []
        for name in _NAMING_FIELDS:
            value = getattr(self, name)
            if value != getattr(defaults, name):
                value = {"dataset": self.dataset_name, "input": _short_name(self.input)}.get(name, value)
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
        return settings.parse_profile_steps(self.profile_steps)

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
        # The task and its metrics name the measurements a checkpoint keeps, so they must match too; the
        # exclusions change what is computed, but a regular expression does not belong in a folder name.
        return {
            name: getattr(self, name)
            for name in ("model", "task", "metrics", "l2_exclude", "weight_decay_exclude", *_NAMING_FIELDS)
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _short_name(setting: str) -> str:
    """A model function or data path as a folder-name part: `examples/wine.py:build` is `wine.build`."""
    if setting.startswith(ARRAYS_PREFIX):
        return "arrays"
    if setting.startswith(TFRECORD_PREFIX):
        return f"tfrecord.{os.path.basename(os.path.normpath(setting.removeprefix(TFRECORD_PREFIX)))}"
    module, _, function = setting.rpartition(":")
    stem = os.path.basename(module or setting).removesuffix(".py").removesuffix(".npz")
    return f"{stem}.{function}" if module else stem
