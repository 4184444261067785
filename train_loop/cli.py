"""The command line: the training flags (each tool defines its own in its module, see `apps`);
flags become a `Config`, user errors become one line on stderr and exit status 2."""

from __future__ import annotations

import copy
import signal
import sys
from collections.abc import Callable, Sequence

from absl import flags

from train_loop import apps, configs, errors, orphans, settings, startup

_DEFAULTS = configs.Config()

flags.DEFINE_string(
    "dataset",
    _DEFAULTS.dataset,
    f"Data set to train on: one of {', '.join(settings.DATASETS)}, or a path to an .npz "
    "holding x_train, y_train, x_test, y_test (any input shape, labels 0..K-1).",
)
flags.DEFINE_string(
    "data_dir",
    _DEFAULTS.data_dir,
    "Folder holding <dataset>.npz or the four IDX files (gzipped or not); "
    "searched before Keras' cache and Debian's dataset-fashion-mnist.",
)
flags.DEFINE_string(
    "model",
    _DEFAULTS.model,
    "convnet: Conv2D(32)-Conv2D(16)-Flatten-Dense(10), the study's network; "
    "linear: Flatten-Dense(10); or PATH.py:FUNCTION or package.module:FUNCTION, a "
    "function of no arguments returning an uncompiled keras.Model that outputs logits.",
)
flags.DEFINE_float("dropout", _DEFAULTS.dropout, "Rate of a Dropout layer after each conv layer; 0 means none.")
flags.DEFINE_float("l1", _DEFAULTS.l1, "L1 factor on every kernel: l1 * sum(|w|).")
flags.DEFINE_float("l2", _DEFAULTS.l2, "L2 factor on every kernel: l2 * sum(w**2).")
flags.DEFINE_float("bias_l1", _DEFAULTS.bias_l1, "L1 factor on every bias.")
flags.DEFINE_float("bias_l2", _DEFAULTS.bias_l2, "L2 factor on every bias.")
flags.DEFINE_integer("epochs", _DEFAULTS.epochs, "Passes over the training split.")
flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Global batch, split across replicas.")
flags.DEFINE_enum("optimizer", _DEFAULTS.optimizer, settings.OPTIMIZERS, "Keras optimizer.")
flags.DEFINE_float(
    "learning_rate",
    _DEFAULTS.learning_rate,
    "The optimizer's learning rate: the peak of a schedule, reached after any warm-up.",
)
flags.DEFINE_enum(
    "lr_schedule",
    _DEFAULTS.lr_schedule,
    settings.LR_SCHEDULES,
    "constant; cosine: decays to 0 over --lr_decay_steps; step: multiplied by "
    "--lr_decay_rate every --lr_decay_steps (keras.optimizers.schedules).",
)
flags.DEFINE_integer(
    "lr_decay_steps",
    _DEFAULTS.lr_decay_steps,
    "Steps (after the warm-up) over which cosine decays, or between step's decays; 0: cosine decays over "
    "the whole run after the warm-up, step decays at the end of each epoch.",
)
flags.DEFINE_float(
    "lr_decay_rate",
    _DEFAULTS.lr_decay_rate,
    "With --lr_schedule=step: the factor in (0, 1] applied every --lr_decay_steps.",
)
flags.DEFINE_integer(
    "warmup_steps",
    _DEFAULTS.warmup_steps,
    "Steps over which the rate rises linearly from 0 to --learning_rate; 0: none.",
)
flags.DEFINE_float(
    "global_clipnorm",
    _DEFAULTS.global_clipnorm,
    "Clip the global L2 norm of the whole batch's gradient (summed over replicas) to this; 0: no clipping.",
)
flags.DEFINE_float(
    "weight_decay",
    _DEFAULTS.weight_decay,
    "Decoupled weight decay of every trainable weight, biases included (the optimizer's own, not a loss "
    "term): w -= learning_rate * weight_decay * w at each step; 0: none.",
)
flags.DEFINE_float(
    "ema",
    _DEFAULTS.ema,
    "Momentum of an exponential moving average of the weights, e.g. 0.999; evaluation "
    "and model.keras use the averaged weights; 0: none.",
)
flags.DEFINE_float(
    "validation_split",
    _DEFAULTS.validation_split,
    "Share of the training split held out (seeded by --seed) and evaluated every "
    "--eval_every steps; the test split is evaluated once, at the end. 0: none.",
)
flags.DEFINE_integer(
    "eval_every",
    _DEFAULTS.eval_every,
    "Steps between evaluations of the validation split; 0: at the end of each epoch.",
)
flags.DEFINE_string(
    "best_metric",
    _DEFAULTS.best_metric,
    f"{' or '.join(settings.BEST_METRICS)}: keep the weights that scored best on it "
    "(in <run>/best/; they become model.keras and are tested); empty: the last weights.",
)
flags.DEFINE_integer(
    "early_stopping_patience",
    _DEFAULTS.early_stopping_patience,
    "Stop after this many validations without an improvement of --best_metric; 0: never.",
)
flags.DEFINE_float(
    "early_stopping_min_delta",
    _DEFAULTS.early_stopping_min_delta,
    "The least change of --best_metric that counts as an improvement.",
)
flags.DEFINE_enum(
    "export",
    _DEFAULTS.export,
    settings.EXPORTS,
    "saved_model: write <run>/saved_model/ for serving (Keras' model.export; it serves logits); none: do not.",
)
flags.DEFINE_enum(
    "strategy",
    _DEFAULTS.strategy,
    settings.STRATEGIES,
    "tf.distribute strategy; auto: mirrored over several GPUs, multi_worker "
    "under a TF_CONFIG of several workers, else one device.",
)
flags.DEFINE_integer(
    "cpu_replicas", _DEFAULTS.cpu_replicas, "N >= 2 splits the host CPU into N logical devices (mirrored without GPUs)."
)
# The class's default as written: an instance's is made absolute.
flags.DEFINE_string("logdir", configs.Config.logdir, "Root folder; a run writes into <logdir>/<run_name>/.")
flags.DEFINE_string(
    "run_name",
    _DEFAULTS.run_name,
    "Run folder name; default: the model and the settings that differ from their defaults, e.g. convnet-l2=0.001.",
)
flags.DEFINE_integer("steps_per_loop", _DEFAULTS.steps_per_loop, "Training steps run inside one tf.function call.")
flags.DEFINE_integer(
    "summary_every", _DEFAULTS.summary_every, "Steps between scalar summaries (also at the end of every epoch)."
)
flags.DEFINE_integer(
    "histogram_every", _DEFAULTS.histogram_every, "Steps between histogram summaries; 0: at the end of each epoch."
)
flags.DEFINE_integer(
    "checkpoint_every", _DEFAULTS.checkpoint_every, "Steps between checkpoints; 0: at the end of each epoch."
)
flags.DEFINE_integer("seed", _DEFAULTS.seed, f"Seeds weights, shuffling and dropout; 0 to {settings.MAX_SEED}.")
flags.DEFINE_enum(
    "precision",
    _DEFAULTS.precision,
    settings.PRECISIONS,
    "float32; mixed_bfloat16 (CPUs with AMX or AVX-512 bf16, TPUs); mixed_float16 "
    "(GPUs; the loss is scaled by hand). Weights, logits and losses stay float32.",
)


class _AutoOrBoolParser(flags.BooleanParser):
    """A boolean flag that also takes `auto`, so `--jit_compile` / `--nojit_compile` still force it."""

    def parse(self, argument: str | int) -> bool | str:
        if isinstance(argument, str) and argument.lower() == "auto":
            return "auto"
        try:
            return super().parse(argument)
        except (TypeError, ValueError):
            raise ValueError(f"{argument!r} is not auto, true or false") from None

    def flag_type(self) -> str:
        return "auto or bool"


class _AutoOrBoolFlag(flags.Flag):
    def _serialize(self, value: bool | str) -> str:
        return f"--{self.name}=auto" if value == "auto" else super()._serialize(value)


flags.DEFINE_flag(
    _AutoOrBoolFlag(
        _AutoOrBoolParser(),
        flags.ArgumentSerializer(),
        "jit_compile",
        _DEFAULTS.jit_compile,
        "Compile the per-replica step with XLA (not the loop around it, which reads the input iterator). "
        "auto: time the step both ways on this machine the first time a setting meets it, and remember "
        "the faster (TRAIN_LOOP_CACHE); --jit_compile / --nojit_compile force it.",
        boolean=True,
    )
)

flags.DEFINE_string(
    "profile_steps",
    _DEFAULTS.profile_steps,
    "START,END: trace steps START+1..END for TensorBoard's profile dashboard (install train_loop[profile] to view it).",
)

flags.DEFINE_bool(
    "deterministic",
    _DEFAULTS.deterministic,
    "Deterministic ops (tf.config.experimental.enable_op_determinism): a run killed "
    "and resumed ends with the same numbers as one that was not.",
)
flags.DEFINE_string(
    "tpu", _DEFAULTS.tpu, "With --strategy=tpu: the TPU's name or grpc:// address; empty: the TPU VM's own."
)

flags.DEFINE_enum(
    "cluster_resolver",
    _DEFAULTS.cluster_resolver,
    settings.CLUSTER_RESOLVERS,
    "With --strategy=multi_worker: where the cluster comes from; tf_config: the TF_CONFIG "
    "variable; slurm: the Slurm job step this task runs in (srun), by SlurmClusterResolver.",
)

FLAGS = flags.FLAGS

# The training flags by purpose, for --helpshort; every flag of `Config` is in one group (tested).
GROUPS = {
    "data": ("dataset", "data_dir", "validation_split", "batch_size", "epochs", "seed"),
    "model": ("model", "dropout"),
    "regularization": ("l1", "l2", "bias_l1", "bias_l2", "weight_decay"),
    "optimizer": ("optimizer", "learning_rate", "global_clipnorm", "ema"),
    "schedule": ("lr_schedule", "lr_decay_steps", "lr_decay_rate", "warmup_steps"),
    "evaluation": ("eval_every", "best_metric", "early_stopping_patience", "early_stopping_min_delta"),
    "distribution and speed": (
        "strategy",
        "cpu_replicas",
        "cluster_resolver",
        "tpu",
        "precision",
        "jit_compile",
        "steps_per_loop",
        "deterministic",
    ),
    "outputs": (
        "logdir",
        "run_name",
        "summary_every",
        "histogram_every",
        "checkpoint_every",
        "export",
        "profile_steps",
    ),
}


def require_utf8(name: str) -> None:
    """Makes the parsing of the flag `name`, a path or a folder's name, refuse bytes that are not
    UTF-8 (the command line hands them over as surrogate escapes): TensorFlow takes file names as
    UTF-8 text, so such a run would fail at its first TensorFlow write, after its folder was made."""
    flags.register_validator(name, _check_utf8)


def _check_utf8(value: str | None) -> bool:
    try:
        (value or "").encode("utf-8")
    except UnicodeEncodeError:
        raise flags.ValidationError(
            "it holds bytes that are not UTF-8, and TensorFlow takes file names as UTF-8 text: use a UTF-8 name"
        ) from None
    return True


require_utf8("logdir")
require_utf8("run_name")


def given_training_flags() -> list[str]:
    """The training flags set on this command line, as `--name=value`: for tools (study, launch)
    whose command lines accept them and pass them on."""
    return [FLAGS[name].serialize() for name in configs.Config.__dataclass_fields__ if FLAGS[name].present]


def config_from_args(args: Sequence[str]) -> configs.Config:
    """A `Config` from command-line flags given as a list (flagfiles included), as if they were
    the only ones: every other flag is at its default. Bad flags exit as `apps.parse_flags` does.

    They are parsed into copies of the training flags, so absl's `FLAGS` (this process's own
    command line) is left as it was: a study that turns each experiment's flag lines into a
    `Config` does not leave the last experiment's settings in it.
    """
    values = flags.FlagValues()
    for name in configs.Config.__dataclass_fields__:
        values[name] = copy.deepcopy(FLAGS[name])
        values[name].unparse()
    apps.parse_flags(["train_loop", *args], flag_values=values)
    return _config(values)


def config_from_flags() -> configs.Config:
    """The `Config` of this command line's flags."""
    return _config(FLAGS)


def _config(values: flags.FlagValues) -> configs.Config:
    """Every flag that `Config` has, by name: the two lists cannot drift apart."""
    return configs.Config(**{field: values[field].value for field in configs.Config.__dataclass_fields__})


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        apps.fail(f"unexpected arguments {' '.join(argv[1:])!r}: every setting is a --flag=value.")

    def train_from_flags() -> None:
        config = config_from_flags()
        startup.start_tensorflow(config.cpu_replicas, config.strategy)
        from train_loop.training.run import train  # Deferred: --help should not wait for TensorFlow.

        train(config)

    run_guarded(train_from_flags)


def run_guarded(work: Callable[[], None]) -> None:
    """Runs `work`: a user error becomes one line and exit 2; a run stopped on purpose or by a fault
    (divergence 3, full disk 74, SIGTERM 143, SIGINT 130) one line and its own status.

    Ctrl-C outside the training loop (start-up, the final save) lands here as KeyboardInterrupt:
    every file is written through a temporary name, so the run is left as it was and resumes.
    """
    try:
        work()
    except errors.UsageError as error:
        apps.fail(str(error))
    except errors.RunStopped as stopped:
        print(f"train_loop: {'error: ' if stopped.is_error else ''}{stopped}", file=sys.stderr)
        sys.exit(stopped.exit_status)
    except KeyboardInterrupt:
        print(
            "train_loop: stopped by SIGINT outside the training loop; the same command resumes (or starts) the run.",
            file=sys.stderr,
        )
        sys.exit(128 + signal.SIGINT)


USAGE = """Usage: train-loop [--flag=value ...]   (or: python -m train_loop [--flag=value ...])

Trains one model and writes the run to <logdir>/<run_name>/: TensorBoard logs, checkpoints,
model.keras and result.json. Started again with the same flags, it resumes the run.
Flags may also come from a file: --flagfile=PATH, one --flag=value per line.
"""


def run() -> None:
    """The console script `train-loop` and `python -m train_loop`."""
    orphans.end_with_parent()  # A child of `jobs` stops (with a checkpoint) when its parent dies.
    # Ctrl-C means KeyboardInterrupt (see `run_guarded`) even in a worker that the launcher
    # started with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    apps.run(main, usage=USAGE, groups=GROUPS)
