"""The bench's roofline: the training FLOPs of one example, counted from the built model's
layers, and this machine's measured matmul peak, so utilization = achieved FLOP/s / peak."""

from __future__ import annotations

import time
from typing import Any


def _training_flops_per_example(model) -> int:
    """Forward plus backward FLOPs of one example through `model`'s weighted layers, read from the
    built layers: each output element of a layer takes one multiply-add per kernel entry that feeds
    it (a `Conv2D`'s window, a `Dense` layer's inputs).

    Forward: 2 FLOPs per multiply-add. Backward: the gradient of the weights costs as much again,
    and the gradient of the layer's input too, except for the first layer, whose input needs none.
    """
    import math

    from train_loop.model import models

    forward = [
        2 * math.prod(layer.output.shape[1:-1]) * math.prod(layer.kernel.shape)
        for _, layer in models.weighted_layers(model)
    ]
    return sum(forward) + sum(2 * flops for flops in forward) - forward[0]


def roofline(figures: dict[str, Any], *, config, quick: bool) -> dict[str, Any]:
    """Achieved FLOP/s of the default train_loop, the measured matmul peaks, and their ratio;
    `config` is the contenders' (its model and precision), `quick` measures fewer sizes."""
    import tensorflow as tf

    from train_loop.model import models

    flops = _training_flops_per_example(models.build_model(config, (28, 28, 1)))
    achieved = flops * figures["train_loop"]["examples_per_second"]
    sizes = (512, 1024) if quick else (512, 1024, 2048, 4096)
    peaks = {"float32": _matmul_peak(tf.float32, sizes)}
    if _has_bfloat16_matmul(tf):
        peaks["bfloat16"] = _matmul_peak(tf.bfloat16, sizes)
    compute = "bfloat16" if config.precision == "mixed_bfloat16" and "bfloat16" in peaks else "float32"
    return {
        "training_flops_per_example": flops,
        "achieved_flops_per_second": achieved,
        "peak_flops_per_second": peaks,
        "utilization": achieved / peaks[compute],
    }


def _matmul_peak(dtype, sizes: tuple[int, ...], repeats: int = 8) -> float:
    """The best FLOP/s of square matmul chains over `sizes`, compiled by XLA and not (the step
    may run either way, and either may be the faster library on a CPU): a peak never read low."""
    import tensorflow as tf

    best = 0.0
    for size in sizes:
        a = tf.cast(tf.random.uniform([size, size], dtype=tf.float32), dtype)
        for jit_compile in (True, False):

            @tf.function(jit_compile=jit_compile)
            def chain(x, a=a):
                for _ in range(repeats):
                    x = tf.matmul(x, a) * tf.constant(1e-3, dtype)
                return x

            float(tf.reduce_sum(tf.cast(chain(a), tf.float32)))
            for _ in range(2):
                started = time.perf_counter()
                float(tf.reduce_sum(tf.cast(chain(a), tf.float32)))
                best = max(best, 2 * size**3 * repeats / (time.perf_counter() - started))
    return best


def _has_bfloat16_matmul(tf) -> bool:
    """True where bfloat16 matmuls run natively: a GPU or TPU, or a CPU with AMX or AVX-512 bf16."""
    from train_loop.training import cpu

    if tf.config.list_physical_devices("GPU"):
        return True
    return bool({"amx_bf16", "avx512_bf16"} & set(cpu.features()))
