"""Compare a study's events with annotated findings: which findings did triage catch, at what flag rate.

The annotation is a findings CSV (`finding, class, start_frame, end_frame`, inclusive frame numbers), as
`capsule-batch synth` writes beside every synthetic recording (`<stem>.findings.csv`); an annotated real
recording in the same format validates triage the same way. A finding counts as caught when some event
overlaps its frame range, and as caught with its class when such an event carries the finding's class.
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from capsule_batch.errors import CapsuleError
from capsule_batch.store import StudyReader

FINDINGS_COLUMNS = ("finding", "class", "start_frame", "end_frame")


@dataclass(frozen=True)
class Finding:
    finding: str
    cls: str
    start: int
    end: int


@dataclass
class FindingResult:
    finding: str
    cls: str
    start: int
    end: int
    caught: bool
    class_matched: bool
    event_classes: list[str]


@dataclass
class Comparison:
    """Totals and one row per finding; `false_events` are events that overlap no finding."""

    frames: int
    flagged_frames: int
    events: int
    findings: int
    caught: int
    caught_class: int
    false_events: int
    rows: list[FindingResult] = field(default_factory=list)

    @property
    def flag_rate(self) -> float:
        return self.flagged_frames / self.frames if self.frames else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["flag_rate"] = self.flag_rate
        return d


def read_findings(path: str | os.PathLike) -> list[Finding]:
    """The findings CSV; a missing column or a non-integer frame is an error naming the file and row."""
    path = Path(path)
    if not path.is_file():
        raise CapsuleError(f"{path}: no such findings file")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in FINDINGS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise CapsuleError(f"{path}: needs columns {', '.join(FINDINGS_COLUMNS)} (missing {', '.join(missing)})")
        out = []
        for n, row in enumerate(reader, start=2):
            try:
                start, end = int(row["start_frame"]), int(row["end_frame"])
            except ValueError:
                raise CapsuleError(f"{path}: line {n}: start_frame/end_frame must be frame numbers") from None
            if end < start:
                raise CapsuleError(f"{path}: line {n}: end_frame {end} is before start_frame {start}")
            out.append(Finding(row["finding"], row["class"], start, end))
    return out


def compare(study: str | os.PathLike, findings: str | os.PathLike | list[Finding]) -> Comparison:
    """Match the study's events against the findings (see the module docstring for the rule)."""
    truth = findings if isinstance(findings, list) else read_findings(findings)
    with StudyReader(study) as r:
        names = r.class_names
        events = r.events()
        frames = len(r)
        flagged = int(r.attrs.get("flagged_frames") or 0)
    rows = []
    hit_events: set[int] = set()
    for f in truth:
        over = [k for k, e in enumerate(events) if e.start <= f.end and e.end >= f.start]
        hit_events.update(over)
        classes = sorted({names[events[k].cls] for k in over})
        rows.append(FindingResult(f.finding, f.cls, f.start, f.end, bool(over), f.cls in classes, classes))
    return Comparison(frames=frames, flagged_frames=flagged, events=len(events), findings=len(truth),
                      caught=sum(x.caught for x in rows), caught_class=sum(x.class_matched for x in rows),
                      false_events=len(events) - len(hit_events), rows=rows)
