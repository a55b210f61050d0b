"""Logs for runs nobody watches (cron, SLURM, systemd, a watched inbox): a log file with timestamped lines, or
JSON lines for a log collector, next to the usual lines on stderr.

Progress is a terminal bar only where stderr is a terminal; elsewhere `capsule_batch.progress.Progress` logs a
plain line every `--progress-every` seconds (recording, frames done / total, frames/s, ETA, flagged so far), and
the pipeline one line per recording finished. In JSON those lines carry their numbers as fields (`progress`,
`result`), so a collector need not parse the text.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: record attributes whose values a JSON line carries as fields
FIELDS = ("progress", "result")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, and the record's FIELDS."""

    def format(self, record: logging.LogRecord) -> str:
        d: dict[str, Any] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(), "pid": record.process}
        for k in FIELDS:
            if hasattr(record, k):
                d[k] = getattr(record, k)
        if record.exc_info:
            d["exception"] = self.formatException(record.exc_info)
        return json.dumps(d, default=str)


def add_log_file(path: str | os.PathLike, fmt: str = "text", level: int | None = None) -> logging.Handler:
    """Append this process's log to `path` (created with its folder), timestamped text or JSON lines; returns the
    handler (the root logger's; its level: the root's unless given)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    handler.setLevel(level if level is not None else root.level)
    root.addHandler(handler)
    return handler


__all__ = ["FIELDS", "JsonFormatter", "LOG_FORMATS", "TEXT_FORMAT", "add_log_file"]
