"""The XLA choice's memory: measured choices in one small JSON file (`TRAIN_LOOP_CACHE`), keyed by
the CPU and the step, so that the second run of a setting on a machine measures nothing."""

from __future__ import annotations

import json
import os
from typing import Any

from train_loop import files
from train_loop.data import idx

CACHE_ENV = "TRAIN_LOOP_CACHE"  # A file path, or "off" to measure every time.
_CACHE_BYTES = 1 << 20  # A cache holds a few KB; past this bound it is taken as unreadable.


class SpeedCache:
    """Measured choices in one JSON file, keyed by `xla_choice.step_key`.

    A cache must never fail a run: an unreadable or corrupt file reads as empty, and a file that
    cannot be written is left alone (the next run measures again). A FIFO, a device or a file
    past `_CACHE_BYTES` is unreadable, and is never written over (see `regular_files`).
    """

    def __init__(self, path: str):
        self.path = path

    @classmethod
    def open(cls) -> SpeedCache | None:
        """The cache `TRAIN_LOOP_CACHE` names (default: the user's cache folder); None if it says off."""
        path = os.environ.get(CACHE_ENV, "")
        if path.lower() == "off":
            return None
        return cls(path or os.path.join(idx.user_cache_folder(), "speed.json"))

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self._read().get(key)
        valid = isinstance(entry, dict) and isinstance(entry.get("jit_compile"), bool)
        return entry if valid and isinstance(entry.get("examples_per_second"), dict) else None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        content = json.dumps({**self._read(), key: entry}, indent=1).encode()
        files.replace_quietly(self.path, lambda stream: stream.write(content))

    def _read(self) -> dict[str, Any]:
        try:
            entries = json.loads(files.read_regular(self.path, limit=_CACHE_BYTES))
        except (OSError, ValueError, RecursionError):  # RecursionError: brackets nested too deep.
            return {}
        return entries if isinstance(entries, dict) else {}
