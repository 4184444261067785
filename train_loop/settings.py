"""What each setting of a run may hold (the choices the flags offer) and the checks of a `Config`
against them: each bad setting is one `UsageError` line naming the flag, the value and the fix."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from train_loop.errors import UsageError

if TYPE_CHECKING:
    from train_loop.configs import Config

DATASETS = ("mnist", "fashion_mnist", "digits", "synthetic")
# What `--dataset` records for arrays given to `train_loop.train(data=...)`: this, then their fingerprint.
ARRAYS_PREFIX = "arrays:"
# `--dataset=tfrecord:FOLDER`: a folder of TFRecord shards, streamed (`data/tfrecords.py`).
TFRECORD_PREFIX = "tfrecord:"
MODELS = ("convnet", "linear")
OPTIMIZERS = ("rmsprop", "adam", "sgd")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
CLUSTER_RESOLVERS = ("tf_config", "slurm")  # Where a multi-worker run learns its cluster.
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
LR_SCHEDULES = ("constant", "cosine", "step")
# What --best_metric names: a validation measurement of the run's task (its terms' and metrics'
# names, which the task alone knows: `best.BestModel` checks the name).
BEST_METRIC_PREFIX = "validation/"
EXPORTS = ("saved_model", "none")
ON_DIVERGENCE = ("stop", "rollback")
# Keras' initializers take seeds in [0, 2**32); each layer adds a small offset to `seed`, so the
# flag stays in the int32 range, which every seeded op accepts.
MAX_SEED = 2**31 - 1


def check(config: Config) -> None:
    """Raises a `UsageError` for the first setting of `config` that is out of range, or that
    contradicts another; `configs.Config` calls it where it is built."""
    _check_dataset(config.dataset)
    _check_model(config.model)
    _check_task_settings(config)
    _check_choice("optimizer", config.optimizer, OPTIMIZERS)
    _check_choice("strategy", config.strategy, STRATEGIES)
    _check_choice("precision", config.precision, PRECISIONS)
    _check_choice("cluster_resolver", config.cluster_resolver, CLUSTER_RESOLVERS)
    if config.cluster_resolver != "tf_config" and config.strategy != "multi_worker":
        raise UsageError(
            f"--cluster_resolver={config.cluster_resolver} finds the workers of a multi-worker run: "
            "add --strategy=multi_worker."
        )
    for name in ("l1", "l2", "bias_l1", "bias_l2"):
        _check_factor(name, getattr(config, name))
    _check_exclusions(config)
    _check_fraction("dropout", config.dropout, "it is the fraction of activations dropped; use 0 for no Dropout layer.")
    if config.dropout and config.model not in MODELS:
        raise UsageError(
            f"--dropout={config.dropout} applies to the built-in models only, not to --model={config.model}: "
            "add Dropout layers to your model instead."
        )
    if not (math.isfinite(config.learning_rate) and config.learning_rate > 0):
        raise UsageError(
            f"--learning_rate={config.learning_rate} must be a positive finite number, e.g. --learning_rate=0.001."
        )
    _check_optimizer_settings(config)
    for name in ("epochs", "batch_size", "steps_per_loop", "summary_every"):
        _check_positive(name, getattr(config, name))
    _check_fraction(
        "validation_split",
        config.validation_split,
        "the share of the training split held out for validation, e.g. 0.1; 0 for none.",
    )
    if config.eval_every and not config.validation_split:
        raise UsageError(
            f"--eval_every={config.eval_every} evaluates the validation split, and --validation_split=0 "
            "holds none out: pass --validation_split=0.1, or leave --eval_every out."
        )
    _check_best_model_settings(config)
    _check_choice("export", config.export, EXPORTS)
    for name in ("histogram_every", "checkpoint_every", "eval_every", "cpu_replicas"):
        if getattr(config, name) < 0:
            raise UsageError(f"--{name}={getattr(config, name)} must be 0 or more (0 means its default).")
    if not 0 <= config.seed <= MAX_SEED:
        raise UsageError(f"--seed={config.seed} must be in [0, {MAX_SEED}], the range the weight initializers take.")
    if config.cpu_replicas == 1:
        raise UsageError("--cpu_replicas=1 splits nothing: use 0 (no split) or 2 or more.")
    if config.jit_compile not in (True, False, "auto") or not isinstance(config.jit_compile, (bool, str)):
        raise UsageError(
            f"--jit_compile={config.jit_compile!r} must be auto (measure both on this machine), true or false."
        )
    parse_profile_steps(config.profile_steps)
    _check_stream_settings(config)
    if "/" in config.run_name or config.run_name in (".", ".."):
        raise UsageError(f"--run_name={config.run_name!r} must be a plain folder name, without '/'.")
    _check_accumulation(config)
    _check_divergence_settings(config)


def _check_divergence_settings(config: Config) -> None:
    """`--on_divergence=rollback`'s options: a factor that keeps the rate positive, a count, and
    nothing of a rollback's without one."""
    _check_choice("on_divergence", config.on_divergence, ON_DIVERGENCE)
    if not (math.isfinite(config.divergence_lr_factor) and config.divergence_lr_factor > 0):
        raise UsageError(
            f"--divergence_lr_factor={config.divergence_lr_factor} must be a positive finite number: it multiplies "
            "the learning rate at each rollback, e.g. --divergence_lr_factor=0.5 (1: unchanged)."
        )
    if config.max_rollbacks < 0:
        raise UsageError(
            f"--max_rollbacks={config.max_rollbacks} must be 0 or more: the rollbacks before the run stops as "
            "--on_divergence=stop does."
        )
    defaults = type(config)
    given = [
        f"--{name}={getattr(config, name)}"
        for name in ("divergence_lr_factor", "divergence_skip", "max_rollbacks")
        if getattr(config, name) != getattr(defaults, name)
    ]
    if given and config.on_divergence != "rollback":
        raise UsageError(
            f"{given[0]} applies to a rollback, and --on_divergence={config.on_divergence} stops at a divergence: "
            f"pass --on_divergence=rollback, or leave {given[0].split('=')[0]} out."
        )


def _check_accumulation(config: Config) -> None:
    """What `--accumulation_steps` can split: the per-replica batch is checked once the replicas are
    known (`distribute.check_global_batch`)."""
    if config.accumulation_steps < 1:
        raise UsageError(
            f"--accumulation_steps={config.accumulation_steps} must be 1 or more: the number of micro-batches "
            "each update's batch is split into (1: the whole batch at once)."
        )


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """`--profile_steps=START,END` as (START, END), or None when empty."""
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
    if config.lr_schedule != "step" and config.lr_decay_rate != type(config).lr_decay_rate:
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
    _check_fraction("ema", config.ema, "the momentum of the weights' moving average, e.g. --ema=0.999; 0 turns it off.")


def _check_exclusions(config: Config) -> None:
    """--l2_exclude and --weight_decay_exclude compile and exempt weights from something the flags
    turn on; whether they match a weight is checked once the model is built."""
    global_flags = any(getattr(config, name) for name in ("l1", "l2", "bias_l1", "bias_l2"))
    for name, applies, what in (
        ("l2_exclude", global_flags, "--l1, --l2, --bias_l1 or --bias_l2"),
        ("weight_decay_exclude", config.weight_decay, "--weight_decay"),
    ):
        pattern = getattr(config, name)
        if not pattern:
            continue
        try:
            re.compile(pattern)
        except re.error as error:
            raise UsageError(
                f"--{name}={pattern!r} is not a regular expression ({error}): write one such as 'bias|gamma'."
            ) from None
        if not applies:
            raise UsageError(
                f"--{name}={pattern!r} exempts weights from {what}, which this run does not use: drop --{name} "
                f"(or turn {what} on)."
            )


def _check_best_model_settings(config: Config) -> None:
    """`--best_metric` needs a validation split; early stopping needs a best metric."""
    measured = config.best_metric.removeprefix(BEST_METRIC_PREFIX)
    if config.best_metric and not (config.best_metric.startswith(BEST_METRIC_PREFIX) and measured.isidentifier()):
        raise UsageError(
            f"--best_metric={config.best_metric!r} is not validation/<a loss term or metric>, e.g. "
            "validation/accuracy or validation/cross_entropy (or empty: keep the last weights)."
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


def _check_task_settings(config: Config) -> None:
    """--loss and --task are two ways to say what is minimized; --metrics are names."""
    if config.loss and config.task:
        raise UsageError(
            f"--loss={config.loss} and --task={config.task} both say what the run minimizes: a task gives its "
            "own loss terms, so drop --loss (or --task)."
        )
    if config.task and (config.model != "convnet" or config.dropout):
        given = f"--model={config.model}" if config.model != "convnet" else f"--dropout={config.dropout}"
        raise UsageError(
            f"{given} and --task={config.task}: a task gives its own model, which {given} would not change; drop "
            f"{given.split('=')[0]} (or put it into the task's model)."
        )
    module, _, name = config.task.rpartition(":")
    if config.task and not (module and name.isidentifier()):
        raise UsageError(
            f"--task={config.task} is not PATH.py:NAME or package.module:NAME (an object with model and loss_terms)."
        )
    bad = [name for name in config.metrics.split(",") if not name.isidentifier()]
    if config.metrics and bad:
        raise UsageError(
            f"--metrics={config.metrics}: {bad[0]!r} is not a metric name; give Keras metric names separated by "
            "commas, e.g. --metrics=mean_absolute_error."
        )


def _check_dataset(dataset: str) -> None:
    if dataset.startswith(TFRECORD_PREFIX) and dataset != TFRECORD_PREFIX:
        return
    if dataset not in DATASETS and not dataset.endswith(".npz") and not dataset.startswith(ARRAYS_PREFIX):
        raise UsageError(
            f"--dataset={dataset} is not one of {', '.join(DATASETS)}, nor a path to an .npz holding "
            f"x_train, y_train, x_test, y_test, nor {TFRECORD_PREFIX}FOLDER (a folder of TFRecord shards)."
        )


def is_stream(config: Config) -> bool:
    """Whether the run streams its data (`--input`, or a TFRecord folder) rather than holding it."""
    return bool(config.input) or config.dataset.startswith(TFRECORD_PREFIX)


def _check_stream_settings(config: Config) -> None:
    """`--input` replaces `--dataset`; `--shuffle_buffer` and `--steps_per_epoch` are a stream's."""
    module, _, function = config.input.rpartition(":")
    if config.input and not (module and function.isidentifier()):
        raise UsageError(
            f"--input={config.input} is not an input function given as PATH.py:FUNCTION or package.module:FUNCTION."
        )
    if config.input and config.dataset != type(config).dataset:
        raise UsageError(
            f"--input={config.input} gives the data, and so does --dataset={config.dataset}: pass one of them."
        )
    if is_stream(config) and config.strategy == "tpu":
        raise UsageError(
            f"--strategy={config.strategy}: streamed data runs on CPUs and GPUs for now (its position in the "
            "checkpoint is a host iterator's); use --strategy=mirrored, one_device or multi_worker, or arrays."
        )
    for name in ("shuffle_buffer", "steps_per_epoch"):
        if getattr(config, name) < 0:
            raise UsageError(f"--{name}={getattr(config, name)} must be 0 or more.")
    # A task's input_fn streams too, which is known once the task is loaded (`check_stream_only`).
    if not is_stream(config) and not config.task:
        check_stream_only(config)


def check_stream_only(config: Config) -> None:
    """Refuses `--shuffle_buffer` and `--steps_per_epoch` for a run of arrays: they are a stream's.

    Raises:
      UsageError: one of them is given.
    """
    for name in ("shuffle_buffer", "steps_per_epoch"):
        if getattr(config, name) != getattr(type(config), name):
            raise UsageError(
                f"--{name}={getattr(config, name)} applies to streamed data (--input, "
                f"--dataset={TFRECORD_PREFIX}FOLDER, a task's input_fn); arrays are shuffled whole, one pass an "
                "epoch: leave it out."
            )


def _check_model(model: str) -> None:
    module, _, function = model.rpartition(":")
    if model not in MODELS and not (module and function.isidentifier()):
        raise UsageError(
            f"--model={model} is not one of {', '.join(MODELS)}, nor a model function given as "
            "PATH.py:FUNCTION or package.module:FUNCTION."
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"--{name}={value!r} is not one of {', '.join(choices)}.")


def _check_fraction(name: str, value: float, meaning: str) -> None:
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise UsageError(f"--{name}={value} must be in [0, 1): {meaning}")


def _check_factor(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise UsageError(f"--{name}={value} must be a finite number >= 0 (a regularization factor; 0 turns it off).")


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise UsageError(f"--{name}={value} must be a positive integer.")
