"""Which CPU this is, as far as speed goes: its model name, the instruction sets that change which
kernels run fast, and the cores this process may use. A speed fact holds only for the CPU it was
measured on, so the XLA choice's cache and the bench record these."""

from __future__ import annotations

import os
import platform

# CPU features that change which kernels run fast (oneDNN's ISA, bfloat16 units).
_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (platform's guess elsewhere)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def features() -> list[str]:
    """Which of the speed-relevant instruction sets (AVX2, AVX-512, AMX, bfloat16) the CPU has."""
    flags = set(_cpuinfo_field("flags").split())
    return [feature for feature in _FEATURES if feature in flags]


def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
