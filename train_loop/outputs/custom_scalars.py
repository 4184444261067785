"""The layout of TensorBoard's Custom Scalars dashboard (`#custom_scalars`): the loss and its terms
first, then each layer's regularization term, then the weight and gradient norms, which the Time
Series page would otherwise bury under the metrics and the histograms, then the metrics. Each
chart matches its tags by a regular expression in every run, so the validation and test terms
join the train ones."""

from __future__ import annotations

import re

from tensorboard.plugins.custom_scalar import layout_pb2

from train_loop.model.measurements import (
    LAYER_GRADIENT_NORM,
    LAYER_REGULARIZATION,
    LAYER_WEIGHT_NORM,
    Table,
    layer_tag,
)


def scalars_layout(table: Table) -> layout_pb2.Layout:
    """The dashboard's categories for a run of `table`'s task, in the order it shows them."""
    losses = [table.tag(name) for name in (*table.terms, "regularization", "total")]
    terms = " + ".join(name.replace("_", "-") for name in table.terms)
    return layout_pb2.Layout(
        category=[
            _category(
                f"Loss: {terms} + regularization = total (train; validation and test: {terms})",
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
                _chart(f"{table.tag('gradient_norm')} (all weights)", _exactly(table.tag("gradient_norm"))),
            ),
            *(_category(name.replace("_", " ").capitalize(), _chart(name, _exactly(name))) for name in table.metrics),
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
