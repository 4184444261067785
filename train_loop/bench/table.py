"""The bench's table: each contender's speed against Keras' and its peak memory, then what the
figures say (XLA's choice, the costs of summaries and input, the roofline, the whole run)."""

from __future__ import annotations

from typing import Any

from train_loop.bench.contenders import ACCUMULATION_STEPS, CONTENDERS


def print_table(figures: dict[str, Any]) -> None:
    keras_speed = figures["keras_fit"]["examples_per_second"]
    keras_best = max(
        figures[name]["examples_per_second"] for name in ("keras_fit", "keras_fit_nojit") if name in figures
    )
    print(
        f"\n{figures['cpu']} ({', '.join(figures['cpu_features']) or 'no AVX2'}), {figures['cores']} cores; "
        f"{figures['dataset']}, batch {figures['batch_size']}, {figures['precision']}, "
        f"{figures['steps']} timed steps each, fastest of {figures['rounds']} interleaved round(s)"
    )
    print(f"| {'contender':36} | examples/s | vs Keras default | vs Keras best | peak RSS |")
    print(f"|{'-' * 38}|-----------:|-----------------:|--------------:|---------:|")
    for name, title in CONTENDERS.items():
        if name not in figures:
            continue
        if name == "keras_fit":
            title = f"Keras 3 fit, default (chose XLA {'on' if figures[name]['jit_compile'] else 'off'})"
        speed = figures[name]["examples_per_second"]
        print(
            f"| {title:36} | {speed:10,.0f} | {speed / keras_speed:15.2f}x | {speed / keras_best:12.2f}x | "
            f"{figures[name]['peak_rss_bytes'] / 2**30:6.2f} GB |"
        )
    if figures["rounds"] > 1:
        shortfalls = [
            1 - min(figures[name]["rounds"]) / max(figures[name]["rounds"]) for name in CONTENDERS if name in figures
        ]
        print(
            f"each contender's slowest round ran {100 * min(shortfalls):.0f}-{100 * max(shortfalls):.0f}% below "
            "its fastest: this machine's noise between processes"
        )
    default = figures["train_loop"]
    if "train_loop_xla" in figures and "train_loop_noxla" in figures:
        xla, no_xla = (figures[name]["examples_per_second"] for name in ("train_loop_xla", "train_loop_noxla"))
        print(
            f"auto chose XLA {'on' if default['jit_compile'] else 'off'}; the forced runs found XLA "
            f"{'on' if xla > no_xla else 'off'} faster ({max(xla, no_xla):,.0f} vs {min(xla, no_xla):,.0f} "
            f"examples/s); auto's own run: {default['examples_per_second'] / max(xla, no_xla):.2f}x the faster"
        )
    _print_ratios(figures)
    print(
        "time to the first training step (process start, imports, data, tracing): "
        f"{default['seconds_to_first_step']:.1f} s; the default run's phases: "
        + ", ".join(f"{name} {value:.2f} s" for name, value in default["seconds"].items())
    )
    seconds = default["seconds"]
    print(
        f"summaries and histograms at the default cadence: {100 * seconds['summaries'] / seconds['training']:.1f}% "
        "of training time"
    )
    if "train_loop_quiet" in figures and "train_loop_cached" in figures:
        quiet = figures["train_loop_quiet"]["examples_per_second"]
        cached = figures["train_loop_cached"]["examples_per_second"]
        speed = default["examples_per_second"]
        print(
            f"summaries + histograms cost {100 * (quiet / speed - 1):.1f}% of training time; "
            f"the input pipeline {100 * (cached / speed - 1):.1f}%"
        )
    print(
        f"training FLOPs per example {figures['training_flops_per_example'] / 1e6:.1f} M; achieved "
        f"{figures['achieved_flops_per_second'] / 1e9:.1f} GFLOP/s; measured matmul peak "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in figures["peak_flops_per_second"].items())
        + f"; utilization {100 * figures['utilization']:.0f}%"
    )
    if "whole_run_seconds" in figures:
        whole = figures["whole_run_seconds"]
        print(
            f"whole one-epoch L2 run: Keras script {whole['keras']:.1f} s, python -m train_loop "
            f"{whole['train_loop']:.1f} s ({whole['keras'] / whole['train_loop']:.2f}x)"
        )


# The rows timed against the default run, each with its issue's target (at the batch it names).
_RATIOS = {
    "train_loop_streamed": ("streamed from TFRecord shards", "the same data in memory", "0.9x at batch 32"),
    "train_loop_accumulation": (f"--accumulation_steps={ACCUMULATION_STEPS}", "K=1", "0.85x at batch 128"),
}


def _print_ratios(figures: dict[str, Any]) -> None:
    """Each ratio row's examples/s over the default run's, or why it was not timed."""
    speed = figures["train_loop"]["examples_per_second"]
    for name, (what, against, target) in _RATIOS.items():
        if name in figures:
            ratio = figures[name]["examples_per_second"] / speed
            batch = figures["batch_size"]
            print(f"{what}: {ratio:.2f}x the examples/s of {against} at batch {batch} (target >= {target})")
        elif name in figures["skipped"]:
            print(f"{what}: skipped, {figures['skipped'][name]}")
