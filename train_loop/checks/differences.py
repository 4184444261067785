"""The comparison of a run's values with one device's (`equivalence`): each one's difference, the
tolerance of the run's precision, the factor of the replicas or micro-batches that explains a
difference, and the verdict: its lines, its record, its one line of failure."""

from __future__ import annotations

import dataclasses

import numpy as np

# The largest relative difference from one device's value that passes. N replicas add the same
# products in another order (per-replica sums, then an all-reduce), so a value rounds apart by
# a few units of its precision's rounding, more where many values are summed in 16 bits: float32's
# unit is 6e-8, float16's 4.9e-4, bfloat16's 3.9e-3. Measured on digits, 2 replicas, batch 32
# (docs/checks-equivalence.md): at most 7e-7, 2.3e-3 and 0.12 (a convolution's bias gradient,
# summed over 32 x 8 x 8 values in bfloat16). A wrong scaling is a factor of 2 or more: a ratio
# of 1/2 is 50% off, past every tolerance.
TOLERANCES = {"float32": 1e-5, "mixed_float16": 1e-2, "mixed_bfloat16": 0.25}
NEAR_FACTOR = 0.05  # A ratio within 5% of a factor is that factor: a wrong scaling is exact.


@dataclasses.dataclass(frozen=True)
class Difference:
    """One value on the run's strategy and on one device: a term, or a variable's gradient (its
    norm; `ratio` is then its projection on one device's gradient)."""

    name: str
    subject: str  # As a message names it: "loss term cross_entropy", "the regularization of layer dense".
    run: float
    one_device: float
    relative: float
    ratio: float


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The check's outcome: every difference, and the one line of its failure ("" when it passed)."""

    differences: list[Difference]
    failure: str
    seconds: float
    replicas: int
    accumulation_steps: int
    precision: str
    # mixed_float16's: the run's loss scale, and the one compared at, lower where the run's overflowed.
    loss_scales: tuple[float, float] | None = None

    def lines(self) -> list[str]:
        """What the run prints: a line per term and per layer's gradients, then the verdict."""
        header = (
            f"check_equivalence: {_setup(self.replicas, self.accumulation_steps)}, {self.precision}"
            f"{_at_loss_scale(self.loss_scales)}, against one device on the same batch (tolerance "
            f"{TOLERANCES[self.precision]:g} relative):"
        )
        columns = f"  {'value':<34} {'this run':>13} {'one device':>13}"
        rows = [
            f"  {item.name:<34} {item.run:>13.6g} {item.one_device:>13.6g}  relative difference {item.relative:.1e}"
            for item in self.differences
        ]
        verdict = "FAILED" if self.failure else "passed: the run computes what one device computes"
        return [header, columns, *rows, f"check_equivalence: {verdict} ({self.seconds:.1f} s)."]

    def to_dict(self) -> dict[str, object]:
        """The verdict as settings.json records it."""
        worst = max(self.differences, key=lambda item: item.relative)
        return {
            "passed": not self.failure,
            "failure": self.failure,
            "replicas": self.replicas,
            "accumulation_steps": self.accumulation_steps,
            "precision": self.precision,
            "tolerance": TOLERANCES[self.precision],
            # JSON has no infinity: a value that was not finite is recorded as null.
            "worst": {
                "name": worst.name,
                "relative_difference": worst.relative if np.isfinite(worst.relative) else None,
            },
            "seconds": round(self.seconds, 2),
            **({"loss_scale": self.loss_scales[1]} if self.loss_scales else {}),
        }


def difference(
    name: str, subject: str, run: float, one_device: float, *, relative: float | None = None, ratio: float | None = None
) -> Difference:
    """`run` against `one_device` (by default their relative difference and their ratio); a value
    that is not finite differs infinitely."""
    if relative is None:
        relative = abs(run - one_device) / abs(one_device) if one_device else abs(run)
    if ratio is None:
        ratio = run / one_device if one_device else np.nan
    return Difference(name, subject, run, one_device, relative if np.isfinite(relative) else np.inf, ratio)


def failure(differences: list[Difference], replicas: int, accumulation_steps: int, precision: str) -> str:
    """The one line that fails the check, or "": the first value off by a factor the replicas or the
    micro-batches explain, else the worst one past the tolerance."""
    factors: dict[int, str] = {}
    for factor, counted in (
        (replicas, f"the {replicas} replicas"),
        (accumulation_steps, f"the {accumulation_steps} micro-batches (--accumulation_steps)"),
        (replicas * accumulation_steps, f"the {replicas} replicas times {accumulation_steps} micro-batches"),
    ):
        if factor > 1:
            factors.setdefault(factor, counted)
    for item in differences:
        for factor, counted in factors.items():
            for scale, times in ((factor, f"{factor} times"), (1 / factor, f"1/{factor} of")):
                if abs(item.ratio / scale - 1) < NEAR_FACTOR:
                    return _scaling_line(item, times, counted, larger=scale > 1)
    worst = max(differences, key=lambda item: item.relative)
    tolerance = TOLERANCES[precision]
    if worst.relative <= tolerance:
        return ""
    return (
        f"--check_equivalence: {worst.subject} differs from one device's on the same batch by {worst.relative:.2g} "
        f"relative ({worst.run:.6g} against {worst.one_device:.6g}), more than the {tolerance:g} {precision} allows: "
        "something depends on how the batch is split (a per-replica statistic such as BatchNormalization's, a "
        "random draw per replica such as keras.layers.Dropout's)."
    )


def _scaling_line(item: Difference, times: str, counted: str, *, larger: bool) -> str:
    if item.subject.startswith("loss term"):
        fix = "return each term per example and unscaled: the step divides its sum by the global batch itself"
    elif item.subject.startswith("the gradient"):
        fix = "leave the gradient unscaled: the step sums the replicas' and micro-batches' shares itself"
    elif larger:
        fix = "leave what a layer adds unscaled: the step divides it by the replicas and micro-batches itself"
    else:
        fix = "what a layer adds (add_loss, an activity regularizer) must be a mean over its batch, not a sum"
    return (
        f"--check_equivalence: {item.subject} is {times} one device's on the same batch ({item.run:.6g} against "
        f"{item.one_device:.6g}), the factor of {counted}: the classic scaling bug; {fix}."
    )


def _setup(replicas: int, accumulation_steps: int) -> str:
    micro = f" x {accumulation_steps} micro-batches" if accumulation_steps > 1 else ""
    return f"{replicas} replica{'s' if replicas > 1 else ''}{micro}"


def _at_loss_scale(loss_scales: tuple[float, float] | None) -> str:
    if not loss_scales:
        return ""
    run, compared = loss_scales
    if run == compared:
        return f" at loss scale {compared:g}"
    return (
        f" at loss scale {compared:g} (the gradients overflow at the run's {run:g} and down to {2 * compared:g}: "
        "its step skips those updates, halving the scale)"
    )
