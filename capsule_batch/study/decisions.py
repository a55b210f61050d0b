"""Reviewer decisions: the journal beside a study and its `review` group, kept so that a crash never corrupts it.

The group's HDF5 side is capsule_batch.study.store's (`read_review_log`, `write_review_log`); this module decides
what is written when. Schema (`review` group, attribute `schema` = `capsule-batch-review/1`):

- `review/decisions`: one row per reviewed event, the latest decision: `event` (u4, row of `events`),
  `verdict` (u1: 0 none, 1 confirm, 2 reject), `class` (i2: reassigned class index, -1 = keep the
  detected class), `time` (ISO 8601 UTC), `reviewer`, `comment` (UTF-8 strings), `seq` (u8).
- `review/log`: every decision ever made, in order, same columns (an audit trail).
- attributes: `schema`, `journal_seq` (the last journal entry folded in), `updated`.

Crash safety, in two steps:

1. Each decision is first appended as one JSON line to the journal `NAME.h5.review.jsonl` beside the
   study, flushed and fsync'ed before the app answers. A line cut short by a crash is ignored on reading.
2. The journal is folded into the HDF5 file by copy-on-write (`capsule_batch.study.store.write_review_log`): the
   study is copied to a temporary file in the same folder, the `review` group is rewritten there, the copy is
   flushed, fsync'ed and then `os.replace`d over the study. The study file is never modified in place, so at
   every instant it is either the old or the new complete file; HDF5 in-place writes cannot promise that.
   Journal entries with `seq <= journal_seq` are then dropped from the journal (idempotent: replaying them
   is harmless).

Readers call `read_decisions`, which overlays journal entries not yet folded in, so a decision is never
lost between the two steps. Copying costs about the file size (tens of MB for a 1M-frame study), so the
app folds in the background, at most about once a second, and once more on exit.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from capsule_batch.errors import StudyError
from capsule_batch.study.store import REVIEW_SCHEMA, REVIEW_VERDICTS, read_review_log, side_files, write_review_log

_logger = logging.getLogger(__name__)

VERDICTS = REVIEW_VERDICTS
MAX_COMMENT = 4000
MAX_REVIEWER = 200
__all__ = ["REVIEW_SCHEMA", "VERDICTS", "BackgroundFolder", "Decision", "DecisionLog", "journal_path", "latest",
           "read_decisions", "read_log", "write_review_group"]


@dataclass(frozen=True)
class Decision:
    """A reviewer's decision on one event; `cls` None keeps the detected class."""

    event: int
    verdict: str
    cls: int | None
    comment: str
    reviewer: str
    time: str
    seq: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def journal_path(study: str | os.PathLike) -> Path:
    return side_files(study).journal


def _read_h5(study: Path) -> tuple[list[Decision], int]:
    """(the log in order, journal_seq) from the study's `review` group; empty when none was written."""
    log, seq = read_review_log(study)
    return [Decision(**d) for d in log], seq


def _read_journal(path: Path) -> list[Decision]:
    """Complete journal lines; a line cut short by a crash (no newline or bad JSON) is skipped."""
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.endswith("\n"):
                _logger.warning("%s: line %d is incomplete (interrupted write); ignored", path, n)
                break
            try:
                out.append(Decision(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                _logger.warning("%s: line %d is not a decision (%s); ignored", path, n, e)
    return out


def latest(log: list[Decision]) -> dict[int, Decision]:
    """The latest decision per event."""
    out: dict[int, Decision] = {}
    for d in sorted(log, key=lambda d: d.seq):
        out[d.event] = d
    return out


def read_log(study: str | os.PathLike) -> list[Decision]:
    """Every decision in order: the HDF5 `review/log` plus journal entries not yet folded in."""
    study = Path(study)
    log, seq = _read_h5(study)
    return log + [d for d in _read_journal(journal_path(study)) if d.seq > seq]


def read_decisions(study: str | os.PathLike) -> dict[int, Decision]:
    """The latest decision per event (event row -> Decision), including journal entries not yet folded in."""
    return latest(read_log(study))


def write_review_group(study: str | os.PathLike, log: list[Decision]) -> None:
    """Copy-on-write `study` with its `review` group replaced by `log` (see the module docstring)."""
    latest_first = sorted(latest(log).values(), key=lambda d: d.event)
    write_review_log(study, [d.to_json() for d in log], [d.to_json() for d in latest_first])


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class DecisionLog:
    """Record decisions for one study (journal first, HDF5 by copy-on-write). Thread-safe.

    `n_events` and `n_classes` bound what a decision may name; the app validates requests through `record`.
    """

    def __init__(self, study: str | os.PathLike, n_events: int, n_classes: int):
        self.study = Path(study)
        self.journal = journal_path(self.study)
        self.n_events, self.n_classes = n_events, n_classes
        self._lock = threading.Lock()
        self._fold_lock = threading.Lock()
        self.log = read_log(self.study)
        self._seq = max((d.seq for d in self.log), default=0)
        self._folded = _read_h5(self.study)[1]

    @property
    def decisions(self) -> dict[int, Decision]:
        with self._lock:
            return latest(self.log)

    @property
    def pending(self) -> bool:
        return self._seq > self._folded

    def record(self, event: int, verdict: str, cls: int | None, comment: str, reviewer: str) -> Decision:
        """Validate, append to the journal durably and return the decision (not yet folded into the HDF5)."""
        if not 0 <= event < self.n_events:
            raise StudyError(f"{self.study}: no event {event} (the study has {self.n_events})")
        if verdict not in VERDICTS:
            raise StudyError(f"verdict must be one of {VERDICTS[1:]} or empty, got {verdict!r}")
        if cls is not None and not 0 <= cls < self.n_classes:
            raise StudyError(f"class index must be 0..{self.n_classes - 1}, got {cls}")
        if len(comment) > MAX_COMMENT or len(reviewer) > MAX_REVIEWER:
            raise StudyError(f"comment ({MAX_COMMENT}) or reviewer name ({MAX_REVIEWER}) too long")
        with self._lock:
            self._seq += 1
            d = Decision(event, verdict, cls, comment, reviewer, _now(), self._seq)
            with open(self.journal, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(d.to_json(), ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self.log.append(d)
        return d

    def fold(self) -> bool:
        """Fold the journal into the HDF5 file; True when something was written."""
        with self._fold_lock:
            with self._lock:
                log = list(self.log)
            seq = max((d.seq for d in log), default=0)
            if seq <= self._folded:
                return False
            write_review_group(self.study, log)
            self._folded = seq
            with self._lock:
                keep = [d for d in _read_journal(self.journal) if d.seq > seq]
                if keep:
                    tmp = self.journal.with_name(self.journal.name + ".tmp")
                    tmp.write_text("".join(json.dumps(d.to_json(), ensure_ascii=False) + "\n" for d in keep),
                                   encoding="utf-8")
                    os.replace(tmp, self.journal)
                else:
                    self.journal.unlink(missing_ok=True)
            _logger.debug("%s: %d decisions folded into the study file", self.study, len(log))
            return True


class BackgroundFolder:
    """Folds a DecisionLog into the study file shortly after each decision, coalescing bursts."""

    def __init__(self, log: DecisionLog, delay: float = 1.0):
        self.log, self.delay = log, delay
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="review-fold", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.wait(self.delay):
                break
            self._fold()

    def _fold(self) -> None:
        try:
            self.log.fold()
        except Exception:  # the journal still holds every decision; the next fold retries
            _logger.exception("%s: could not write decisions into the study file (kept in %s)",
                              self.log.study, self.log.journal)

    def flush(self) -> None:
        """Fold now, in the caller's thread."""
        self._fold()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self._fold()
