"""A small progress line on stderr (count, rate, ETA), quiet when stderr is not a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int | None, label: str = "", unit: str = "frames", stream: TextIO | None = None,
                 enabled: bool | None = None, interval: float = 0.25):
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.interval = interval
        self.count = 0
        self.t0 = time.perf_counter()
        self._last = 0.0

    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.count / dt if dt > 0 else 0.0

    def update(self, n: int = 1, total: int | None = None) -> None:
        self.count += n
        if total is not None:
            self.total = total
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.interval or (self.total and self.count >= self.total)):
            self._last = now
            self._draw()

    def set(self, count: int, total: int | None = None) -> None:
        self.update(count - self.count, total)

    def _draw(self) -> None:
        rate = self.rate
        if self.total:
            frac = min(1.0, self.count / self.total)
            bar = "#" * int(frac * 24)
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "--:--:--"
            line = f"{self.label} [{bar:<24}] {self.count}/{self.total} {self.unit} {rate:,.0f}/s ETA {eta_s}"
        else:
            line = f"{self.label} {self.count} {self.unit} {rate:,.0f}/s"
        self.stream.write("\r" + line[:150] + "\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
