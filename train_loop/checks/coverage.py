"""Which regularizer covers each trainable weight, and the weights the global --l1/--l2 miss."""

from __future__ import annotations

import dataclasses

import keras

from train_loop.configs import Config
from train_loop.model.models import excluded_weights, held_weights
from train_loop.model.optimizers import decayed

# A weight by these names is an offset, the --bias_l1/--bias_l2 flags' to regularize, not --l1/--l2's.
_BIAS_NAMES = ("bias", "beta")
_NORMALIZATIONS = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
)


@dataclasses.dataclass(frozen=True)
class Row:
    """One trainable weight of the table: what regularizes it, and why it is flagged ("": it is not)."""

    weight: str  # `<layer path>/<weight name>`.
    shape: tuple[int, ...]
    regularizer: str  # "L2(0.001)", or "-".
    activity: str  # Its layer's activity regularizer, or "-".
    decay: bool  # The optimizer's decoupled weight decay applies to it.
    flag: str

    def to_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "shape": list(self.shape)}


def coverage(model: keras.Model, optimizer: keras.optimizers.Optimizer, config: Config) -> list[Row]:
    """A row for every trainable weight, in the model's order of layers, then the weights a
    subclassed model made on itself."""
    excluded = excluded_weights(model, config.l2_exclude)
    return [
        Row(
            f"{path}/{weight.name}",
            tuple(weight.shape),
            describe(weight.regularizer),
            describe(layer.activity_regularizer),
            decayed(optimizer, weight),
            "" if weight.regularizer or f"{path}/{weight.name}" in excluded else _missed(config, layer, weight.name),
        )
        for path, layer, weight in held_weights(model, trainable=True)
    ]


def _missed(config: Config, layer: keras.layers.Layer, name: str) -> str:
    """Why the global flags, which ask to regularize weights of this kind, left this one out; ""
    when they do not ask (a bias without --bias_l1/--bias_l2, any weight without the flags)."""
    flags = ("bias_l1", "bias_l2") if name in _BIAS_NAMES else ("l1", "l2")
    asked = [f"--{flag}" for flag in flags if getattr(config, flag)]
    if not asked:
        return ""
    if isinstance(layer, keras.layers.Embedding):
        what = "an Embedding table"
    elif isinstance(layer, _NORMALIZATIONS):
        what = f"a normalization layer's {name}"
    elif isinstance(layer, keras.Model):  # A weight the model made on itself, in no layer.
        what = f"the {type(layer).__name__} model's own {name}"
    else:  # The flags reach every KERNEL_LAYERS weight: a layer of the user's own.
        what = f"a {type(layer).__name__} layer's {name}"
    verb = "misses" if len(asked) == 1 else "miss"
    return (
        f"{' and '.join(asked)} {verb} {what}: the flags reach the kernels and biases of Dense and Conv layers "
        "only; exempt it on purpose with --l2_exclude, or give the model its own regularizers instead of the flags"
    )


def describe(regularizer: object) -> str:
    """A regularizer as the table shows it: `L2(0.001)`, `L1L2(l1=0.01, l2=0.001)`, a custom one's
    class name, or "-"."""
    if regularizer is None:
        return "-"
    if isinstance(regularizer, keras.regularizers.L1L2):
        return f"L1L2(l1={regularizer.l1:g}, l2={regularizer.l2:g})"
    if isinstance(regularizer, keras.regularizers.L2):
        return f"L2({regularizer.l2:g})"
    if isinstance(regularizer, keras.regularizers.L1):
        return f"L1({regularizer.l1:g})"
    return type(regularizer).__name__


def table(rows: list[Row]) -> list[str]:
    """The rows as aligned lines, a flagged one followed by its reason."""
    header = ("weight", "shape", "regularizer", "activity", "decay")
    cells = [
        header,
        *((row.weight, str(row.shape), row.regularizer, row.activity, "yes" if row.decay else "-") for row in rows),
    ]
    widths = [max(len(line[column]) for line in cells) for column in range(len(header))]
    lines = []
    for line, row in zip(cells, [None, *rows]):
        lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        if row is not None and row.flag:
            lines.append(f"    warning: {row.flag}.")
    return lines
