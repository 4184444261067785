"""The layout of TensorBoard's Custom Scalars dashboard (`#custom_scalars`): the loss and its terms
first, then each layer's regularization term, then the weight and gradient norms, which the Time
Series page would otherwise bury under `accuracy` and the histograms. Each chart matches its tags
by a regular expression in every run, so the validation and test cross-entropy join the train one."""

from __future__ import annotations

import re

from tensorboard.plugins.custom_scalar import layout_pb2

from train_loop.model.measurements import (
    BY_NAME,
    LAYER_GRADIENT_NORM,
    LAYER_REGULARIZATION,
    LAYER_WEIGHT_NORM,
    layer_tag,
)

# The loss and the two terms it sums, by their measurement names.
LOSS_TERMS = ("cross_entropy", "regularization", "total")


def scalars_layout() -> layout_pb2.Layout:
    """The dashboard's categories, in the order it shows them."""
    losses = [BY_NAME[name].tag for name in LOSS_TERMS]
    return layout_pb2.Layout(
        category=[
            _category(
                "Loss: cross-entropy + regularization = total (train; validation and test: cross-entropy)",
                _chart("the loss and its terms", *map(_exactly, losses)),
                *(_chart(tag, _exactly(tag)) for tag in losses),
            ),
            _category(
                "Regularization term by layer",
                _chart(layer_tag(LAYER_REGULARIZATION, "<layer>"), _per_layer(LAYER_REGULARIZATION)),
            ),
            _category(
                "Weight and gradient norms",
                _chart(layer_tag(LAYER_WEIGHT_NORM, "<layer>"), _per_layer(LAYER_WEIGHT_NORM)),
                _chart(layer_tag(LAYER_GRADIENT_NORM, "<layer>"), _per_layer(LAYER_GRADIENT_NORM)),
                _chart(f"{BY_NAME['gradient_norm'].tag} (all weights)", _exactly(BY_NAME["gradient_norm"].tag)),
            ),
            _category("Accuracy", _chart(BY_NAME["accuracy"].tag, _exactly(BY_NAME["accuracy"].tag))),
        ]
    )


def _category(title: str, *charts: layout_pb2.Chart) -> layout_pb2.Category:
    return layout_pb2.Category(title=title, chart=list(charts))


def _chart(title: str, *patterns: str) -> layout_pb2.Chart:
    """A chart of every (run, tag) whose tag matches one of `patterns`: one line each."""
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=list(patterns)))


def _exactly(tag: str) -> str:
    return f"^{re.escape(tag)}$"


def _per_layer(prefix: str) -> str:
    return f"^{re.escape(layer_tag(prefix, ''))}"
