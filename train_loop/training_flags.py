"""The training flags: one absl flag for each field of `Config`, with its default taken from
`Config` and its help; the one module that defines them (`cli` reads them, `study` and `launch`
pass them on)."""

from __future__ import annotations

from absl import flags

from train_loop import apps, configs, settings

_DEFAULTS = configs.Config()

flags.DEFINE_string(
    "dataset",
    _DEFAULTS.dataset,
    f"Data set to train on: one of {', '.join(settings.DATASETS)}, or a path to an .npz "
    "holding x_train, y_train, x_test, y_test (any input shape, labels 0..K-1), "
    f"or {settings.TFRECORD_PREFIX}FOLDER, TFRecord shards streamed (docs/streams.md).",
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
flags.DEFINE_string(
    "l2_exclude",
    _DEFAULTS.l2_exclude,
    "A regular expression searched (Python's re.search) in each weight's <layer path>/<weight name>, e.g. "
    "dense/bias or encoder/norm/gamma: the weights it matches get no --l1, --l2, --bias_l1 or --bias_l2. "
    "It must match some weight; empty: none is exempt.",
)
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
flags.DEFINE_string(
    "weight_decay_exclude",
    _DEFAULTS.weight_decay_exclude,
    "A regular expression searched (re.search, by Keras' optimizer.exclude_from_weight_decay) in each "
    "trainable weight's own name only, not its layer's: kernel, bias, gamma, beta, embeddings, or a custom "
    "weight's name; e.g. bias|gamma|beta. The weights it matches are not decayed. It must match some weight.",
)
flags.DEFINE_bool(
    "check_regularizers",
    _DEFAULTS.check_regularizers,
    "Before training: print which regularizer covers each trainable weight, flag the weights --l1/--l2 miss, "
    "and check under the run's strategy, precision and accumulation that each weight's regularization "
    "gradient is its closed form, counted once per update, and moves the update (docs/checks.md).",
)
flags.DEFINE_bool(
    "check_equivalence",
    _DEFAULTS.check_equivalence,
    "Before training: compute the first update's loss terms and gradients on the run's strategy, precision and "
    "accumulation and again on one device on the same batch, print each difference, and stop (exit status 70, "
    "nothing trained) when one differs, naming a term off by the number of replicas or micro-batches "
    "(docs/checks-equivalence.md).",
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
    "validation/<a loss term or metric of the task> (the classifier's: validation/accuracy or "
    "validation/cross_entropy): keep the weights that scored best on it (in <run>/best/; they become "
    "model.keras and are tested); lower is better but for metrics of hits (accuracy, auc, precision, "
    "recall); empty: the last weights.",
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

flags.DEFINE_integer(
    "accumulation_steps",
    _DEFAULTS.accumulation_steps,
    "Run each update's --batch_size as this many micro-batches, one after another, and sum their "
    "gradients: the same update in less memory (BatchNorm sees micro-batches). Must divide the per-replica batch.",
)
# Streamed data (data/streams.py).
flags.DEFINE_string(
    "input",
    _DEFAULTS.input,
    "PATH.py:FUNCTION or package.module:FUNCTION: input_fn(split, context) returning a tf.data.Dataset of "
    "unbatched examples for split train, validation (or None) and test; replaces --dataset. See docs/streams.md.",
)
flags.DEFINE_integer(
    "shuffle_buffer",
    _DEFAULTS.shuffle_buffer,
    "Streamed data: the examples of the seeded shuffle buffer (part of every checkpoint); 0: no shuffling.",
    lower_bound=0,
)
flags.DEFINE_integer(
    "steps_per_epoch",
    _DEFAULTS.steps_per_epoch,
    "Streamed data: the steps of an epoch; 0: one pass (an infinite or unknown-length stream needs it).",
    lower_bound=0,
)

apps.require_utf8("logdir")
apps.require_utf8("run_name")

# What the run minimizes (model/tasks.py).
flags.DEFINE_string(
    "loss",
    _DEFAULTS.loss,
    "A Keras loss by its registered name (mean_squared_error, huber, binary_crossentropy, ...), per "
    "example, from logits where it takes from_logits; targets may be floats of any shape. Empty: the "
    "classifier (sparse cross-entropy on class indices 0..K-1, accuracy, confusion matrix).",
)
flags.DEFINE_string(
    "metrics",
    _DEFAULTS.metrics,
    "Keras metric names, comma-separated (mean_absolute_error, binary_accuracy, ...): per-example "
    "means, logged beside the loss terms.",
)
flags.DEFINE_string(
    "task",
    _DEFAULTS.task,
    "PATH.py:NAME or package.module:NAME: an object giving model() and loss_terms(batch, outputs) "
    "(named per-example terms), and optionally metrics(batch, outputs) and split(batch).",
)

# What a divergence does (training/divergence.py).
flags.DEFINE_enum(
    "on_divergence",
    _DEFAULTS.on_divergence,
    settings.ON_DIVERGENCE,
    "When a loop call's loss terms or gradient are not finite: stop (exit status 3), or rollback: restore the "
    "last checkpoint and go on; either way the step, term, layer, replica and examples that diverged are "
    "reported (<run>/divergence.json). See docs/reliability.md.",
)
flags.DEFINE_float(
    "divergence_lr_factor",
    _DEFAULTS.divergence_lr_factor,
    "With --on_divergence=rollback: multiply the learning rate by this at each rollback, e.g. 0.5.",
)
flags.DEFINE_bool(
    "divergence_skip",
    _DEFAULTS.divergence_skip,
    "With --on_divergence=rollback: skip the step that diverged (no update on its batch).",
)
flags.DEFINE_integer(
    "max_rollbacks",
    _DEFAULTS.max_rollbacks,
    "With --on_divergence=rollback: the most rollbacks; at the next divergence the run stops.",
)
