"""Logs for runs nobody watches (cron, SLURM, systemd, a watched inbox): a log file with timestamped lines, or
JSON lines for a log collector, next to the usual lines on stderr.

Progress is a terminal bar only where stderr is a terminal; elsewhere `capsule_batch.run.progress.Progress` logs a
plain line every `--progress-every` seconds (recording, frames done / total, frames/s, ETA, flagged so far), and
the pipeline one line per recording finished. In JSON those lines carry their numbers as fields (`progress`,
`result`), so a collector need not parse the text.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import sys
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


#: the stderr lines of the command line (`capsule-batch -v/-q`)
STDERR_FORMAT = "%(levelname)s %(name)s: %(message)s"
#: libraries whose INFO lines are noise unless -vv
NOISY_LOGGERS = ("timm", "PIL", "matplotlib", "urllib3", "h5py")


def stderr_handlers() -> list[logging.Handler]:
    """The root logger's stderr handlers (those `logging.basicConfig` made; log files are FileHandlers)."""
    return [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]


def logging_state() -> dict[str, Any]:
    """This process's logging set-up as plain data (a worker process sets itself up the same way from it): the root
    level, the stderr level, the log files with their format and level, and the noisy libraries' levels."""
    root = logging.getLogger()
    stderr = stderr_handlers()
    files = [{"path": h.baseFilename, "format": "json" if isinstance(h.formatter, JsonFormatter) else "text",
              "level": h.level} for h in root.handlers if isinstance(h, logging.FileHandler)]
    return {"level": root.level, "stderr_level": stderr[0].level if stderr else root.level, "files": files,
            "loggers": {n: logging.getLogger(n).level for n in NOISY_LOGGERS}}


def apply_logging_state(state: dict[str, Any]) -> None:
    """Set this process's logging up as `logging_state()` described another's."""
    logging.basicConfig(level=state["level"], format=STDERR_FORMAT, stream=sys.stderr, force=True)
    root = logging.getLogger()
    for h in root.handlers:
        h.setLevel(state["stderr_level"])
    for f in state["files"]:
        add_log_file(f["path"], f["format"], level=f["level"])
    for name, level in state["loggers"].items():
        logging.getLogger(name).setLevel(level)


__all__ = ["FIELDS", "JsonFormatter", "LOG_FORMATS", "NOISY_LOGGERS", "STDERR_FORMAT", "TEXT_FORMAT", "add_log_file",
           "apply_logging_state", "logging_state", "stderr_handlers"]
