"""Progress lines for long-running work: rate and ETA, printed at a bounded frequency."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


class Progress:
    """Counts units of work and prints ``label: done/total, rate/s, ETA`` every ``interval`` s."""

    def __init__(self, label: str, total: int | None = None, unit: str = "img",
                 interval: float = 5.0, stream: TextIO | None = None):
        self.label = label
        self.total = total
        self.unit = unit
        self.interval = interval
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.monotonic()
        self._last_print = 0.0

    @property
    def rate(self) -> float:
        """Units per second since the start."""
        elapsed = time.monotonic() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        """Seconds left at the current rate, when the total is known."""
        if not self.total or not self.rate:
            return None
        return max(0.0, (self.total - self.done) / self.rate)

    def line(self, extra: str = "") -> str:
        """The current progress line."""
        total = f"/{self.total}" if self.total else ""
        eta = self.eta()
        parts = [f"{self.label}: {self.done}{total} {self.unit}", f"{self.rate:.1f} {self.unit}/s"]
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        if extra:
            parts.append(extra)
        return ", ".join(parts)

    def update(self, count: int = 1, extra: str = "", force: bool = False) -> None:
        """Add ``count`` finished units and print a line if ``interval`` has passed."""
        self.done += count
        now = time.monotonic()
        if force or now - self._last_print >= self.interval:
            self._last_print = now
            print(self.line(extra), file=self.stream, flush=True)
