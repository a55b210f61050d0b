"""Progress on stderr: a bar (count, rate, ETA) where stderr is a terminal; elsewhere (cron, SLURM, nohup, a
service: stderr is a file) a plain log line every `log_every` seconds, which a person or a log collector can read."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

_logger = logging.getLogger(__name__)


def clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds != float("inf") else "--:--:--"


class Progress:
    """`enabled`: the bar (default: when `stream` is a terminal). `log_every`: without the bar, a log line (INFO,
    this module's logger) every so many seconds (0: none); `fields()` adds to it (e.g. flagged frames so far).
    `start`: the count already done (a resumed run)."""

    def __init__(self, total: int | None, label: str = "", unit: str = "frames", stream: TextIO | None = None,
                 enabled: bool | None = None, interval: float = 0.25, log_every: float = 0.0,
                 fields: Callable[[], dict[str, Any]] | None = None, start: int = 0):
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.interval = interval
        self.log_every = 0.0 if self.enabled else float(log_every or 0.0)
        self.fields = fields
        self.count = self._start = int(start)  # a resumed run starts there; the rate counts what this run did
        self.t0 = time.perf_counter()
        self._last = 0.0
        self._logged = self.t0

    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return (self.count - self._start) / dt if dt > 0 else 0.0

    def update(self, n: int = 1, total: int | None = None) -> None:
        self.count += n
        if total is not None:
            self.total = total
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.interval or (self.total and self.count >= self.total)):
            self._last = now
            self._draw()
        elif self.log_every and now - self._logged >= self.log_every:
            self._logged = now
            self.log()

    def set(self, count: int, total: int | None = None) -> None:
        self.update(count - self.count, total)

    def log(self) -> None:
        """One plain line: label, count/total (%), rate, ETA, and `fields()`; its numbers as `progress` (JSON logs)."""
        rate = self.rate
        extra = self.fields() if self.fields else {}
        d: dict[str, Any] = {"recording": self.label, "done": self.count, "total": self.total,
                             "per_s": round(rate, 1), **extra}
        of = f"/{self.total} {self.unit} ({100 * self.count / self.total:.1f} %)" if self.total else f" {self.unit}"
        text = f"{self.label}: {self.count}{of}, {rate:,.1f} {self.unit}/s"
        if self.total:
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            d["eta_s"] = None if eta == float("inf") else round(eta, 1)
            text += f", ETA {clock(eta)}"
        text += "".join(f", {v} {k.replace('_', ' ')}" for k, v in extra.items())
        _logger.info("%s", text, extra={"progress": d})

    def _draw(self) -> None:
        rate = self.rate
        if self.total:
            frac = min(1.0, self.count / self.total)
            bar = "#" * int(frac * 24)
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            line = f"{self.label} [{bar:<24}] {self.count}/{self.total} {self.unit} {rate:,.0f}/s ETA {clock(eta)}"
        else:
            line = f"{self.label} {self.count} {self.unit} {rate:,.0f}/s"
        self.stream.write("\r" + line[:150] + "\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
