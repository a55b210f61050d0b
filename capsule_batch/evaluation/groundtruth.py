"""Compare a study's events with annotated findings: what triage caught, how late, at what false-alert and
reading cost.

The annotation is a findings CSV (`finding, class, start_frame, end_frame`, inclusive frame numbers), as
`capsule-batch synth` writes beside every synthetic recording (`<stem>.findings.csv`); an annotated real
recording in the same format validates triage the same way. Definitions (docs/evaluation.md):
- a finding is *caught* when some event overlaps its frame range, *caught with its class* when such an event
  carries the finding's class;
- it is *detected* at the first of its frames that lies inside an overlapping event
  (max(finding start, earliest overlapping event start)); the delay is that frame minus the finding's first
  frame, in frames and in seconds of recording time (stored timestamps; frame / fps where they are missing);
- a *false alert* is an event that overlaps no finding; per class, an event of that class that overlaps none;
- the reading estimate is `capsule_batch.evaluation.reading_time`'s (frames inside events, reading time under stated
  assumptions).
Across many studies, `capsule_batch.evaluation.burden` pools these and adds confidence intervals.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from capsule_batch.errors import CapsuleError
from capsule_batch.evaluation.reading_time import ReadingEstimate, ReadingModel, estimate
from capsule_batch.study.store import StudyReader
from capsule_batch.study.triage import classes_in, event_classes

_logger = logging.getLogger(__name__)

FINDINGS_COLUMNS = ("finding", "class", "start_frame", "end_frame")
FINDINGS_SUFFIX = ".findings.csv"


@dataclass(frozen=True)
class Finding:
    finding: str
    cls: str
    start: int
    end: int


@dataclass
class FindingResult:
    """One annotated finding and what triage did with it; `events` are rows of the study's events table."""

    finding: str
    cls: str
    start: int
    end: int
    caught: bool
    class_matched: bool
    event_classes: list[str]
    events: list[int] = field(default_factory=list)
    detected_frame: int | None = None
    delay_frames: int | None = None
    delay_s: float | None = None


@dataclass
class EventMatch:
    """One event of the study and the findings it overlaps (none: a false alert)."""

    id: int
    cls: str
    start: int
    end: int
    peak_score: float
    findings: list[str]


@dataclass
class Comparison:
    """Totals and one row per finding and per event; `false_events` are events that overlap no finding."""

    frames: int
    flagged_frames: int
    events: int
    findings: int
    caught: int
    caught_class: int
    false_events: int
    rows: list[FindingResult] = field(default_factory=list)
    study: str = ""
    class_names: list[str] = field(default_factory=list)
    duration_s: float | None = None
    event_rows: list[EventMatch] = field(default_factory=list)
    reading: ReadingEstimate | None = None

    @property
    def flag_rate(self) -> float:
        return self.flagged_frames / self.frames if self.frames else 0.0

    @property
    def hours(self) -> float | None:
        return self.duration_s / 3600 if self.duration_s else None

    @property
    def false_alerts_per_hour(self) -> float | None:
        return self.false_events / self.hours if self.hours else None

    @property
    def misses(self) -> list[FindingResult]:
        return [r for r in self.rows if not r.caught]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["reading"] = self.reading.to_json() if self.reading else None
        d.update(flag_rate=self.flag_rate, false_alerts_per_hour=self.false_alerts_per_hour,
                 missed=[r.finding for r in self.misses])
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
            except (TypeError, ValueError):
                raise CapsuleError(f"{path}: line {n}: start_frame/end_frame must be frame numbers") from None
            if start < 0:
                raise CapsuleError(f"{path}: line {n}: start_frame {start} is negative")
            if end < start:
                raise CapsuleError(f"{path}: line {n}: end_frame {end} is before start_frame {start}")
            out.append(Finding(row["finding"], row["class"], start, end))
    return out


def recording_duration(n_frames: int, fps: Any, pts: np.ndarray) -> float | None:
    """Seconds of recording: frames / fps when the study records a frame rate, else the span of the stored
    timestamps plus one median frame interval; None when neither is known."""
    if isinstance(fps, (int, float)) and not isinstance(fps, bool) and fps > 0:
        return n_frames / float(fps)
    t = pts[np.isfinite(pts)]
    if len(t) >= 2 and t[-1] > t[0]:
        return float(t[-1] - t[0] + np.median(np.diff(t)))
    return None


def _seconds_between(pts: np.ndarray, fps: Any, a: int, b: int) -> float | None:
    """Recording time from frame a to frame b: stored timestamps, or (b - a) / fps when one is missing."""
    ta, tb = (float(pts[k]) if 0 <= k < len(pts) else float("nan") for k in (a, b))
    if np.isfinite(ta) and np.isfinite(tb):
        return tb - ta
    if isinstance(fps, (int, float)) and fps > 0:
        return (b - a) / float(fps)
    return None


def compare(study: str | os.PathLike, findings: str | os.PathLike | list[Finding],
            reading: ReadingModel | None = None) -> Comparison:
    """Match the study's events against the findings (see the module docstring for the rules)."""
    truth = findings if isinstance(findings, list) else read_findings(findings)
    with StudyReader(study) as r:
        names = r.class_names
        table = r.events_table()
        frames = len(r)
        attrs = r.attrs
        pts = r.pts()
    flagged = int(attrs.get("flagged_frames") or 0)
    fps = attrs.get("fps")
    unknown = sorted({f.cls for f in truth} - set(names))
    if unknown:
        _logger.warning("%s: findings of classes the model does not have (%s): they can be caught, never with "
                        "their class", study, ", ".join(unknown))
    outside = [f.finding for f in truth if f.start >= frames]
    if outside:
        _logger.warning("%s: %d findings start after the last frame (%d), e.g. finding %s: another recording's "
                        "annotation?", study, len(outside), frames - 1, outside[0])
    starts, ends = table["start"].astype(np.int64), table["end"].astype(np.int64)
    masks = event_classes(table)  # every class an event saw (a merged event: several)
    on: list[list[str]] = [[] for _ in range(len(table))]
    rows = []
    for f in truth:
        over = np.flatnonzero((starts <= f.end) & (ends >= f.start))
        classes = sorted({names[c] for m in masks[over].tolist() for c in classes_in(m) if c < len(names)})
        row = FindingResult(f.finding, f.cls, f.start, f.end, bool(len(over)), f.cls in classes, classes,
                            over.tolist())
        if len(over):
            row.detected_frame = max(f.start, int(starts[over].min()))
            row.delay_frames = row.detected_frame - f.start
            row.delay_s = _seconds_between(pts, fps, f.start, row.detected_frame)
        for k in over.tolist():
            on[k].append(f.finding)
        rows.append(row)
    event_rows = [EventMatch(k, names[int(table["class"][k])], int(starts[k]), int(ends[k]),
                             float(table["peak_score"][k]), on[k]) for k in range(len(table))]
    return Comparison(frames=frames, flagged_frames=flagged, events=len(table), findings=len(truth),
                      caught=sum(x.caught for x in rows), caught_class=sum(x.class_matched for x in rows),
                      false_events=sum(not e.findings for e in event_rows), rows=rows, study=str(study),
                      class_names=names, duration_s=recording_duration(frames, fps, pts), event_rows=event_rows,
                      reading=estimate(frames, starts, ends, reading))


def pair_studies(studies: str | os.PathLike, findings: str | os.PathLike | None = None) -> list[tuple[Path, Path]]:
    """(study, findings CSV) pairs: a study file with a findings file (or a folder holding `<stem>.findings.csv`,
    by default the study's own folder), or a folder of studies (`*.h5`) with a folder of findings files (by
    default the same folder). Every study must have its findings file: a missing one is an error naming it,
    since leaving a study out would bias every pooled figure."""
    studies = Path(studies)
    if studies.is_dir():
        found = sorted(p for p in studies.glob("*.h5") if p.is_file())
        if not found:
            raise CapsuleError(f"{studies}: no study files (*.h5) in this folder")
        where = Path(findings) if findings is not None else studies
        if not where.is_dir():
            raise CapsuleError(f"{where}: for a folder of studies, give a folder of findings files "
                               f"(<study stem>{FINDINGS_SUFFIX})")
    elif studies.is_file() or studies.suffix == ".h5":
        found = [studies]
        where = Path(findings) if findings is not None else studies.parent
        if not where.is_dir():
            return [(studies, where)]
    else:
        raise CapsuleError(f"{studies}: no such study file or folder")
    pairs = [(s, where / (s.stem + FINDINGS_SUFFIX)) for s in found]
    missing = [str(f) for _, f in pairs if not f.is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CapsuleError(f"no findings file for {len(missing)} of {len(pairs)} studies: {shown} (a study without "
                           f"findings needs a findings file with the header line only)")
    return pairs
