"""What a study costs a reader: frames to look at and an estimated reading time, flagged set against the whole.

The estimate is a model with two stated assumptions (docs/evaluation.md):
- a reader looks at `fps` frames per second (default 15, about the fastest capsule readers go), and
- spends `event_s` seconds on each event on top of its frames (default 5: open it, decide, note the verdict).
Reading the whole recording takes `frames / fps`; reading only what triage flagged takes
`frames_to_read / fps + events * event_s`, where `frames_to_read` is the number of distinct frames inside the
study's events (the union of their `start..end` spans, gap frames included: the review app shows them), but never
more than reading the whole recording: a reader whose events would cost more than that reads straight through
instead (`ReadingModel.triage_seconds`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DEFAULT_READING_FPS = 15.0
DEFAULT_EVENT_S = 5.0


@dataclass(frozen=True)
class ReadingModel:
    """The assumptions behind every reading-time figure; they travel with the figures they produced."""

    fps: float = DEFAULT_READING_FPS
    event_s: float = DEFAULT_EVENT_S

    def __post_init__(self) -> None:
        if not self.fps > 0 or not self.event_s >= 0:
            raise ValueError(f"reading speed must be > 0 frames/s and the per-event time >= 0 s, got {self}")

    def seconds(self, frames: float, events: float = 0) -> float:
        return frames / self.fps + events * self.event_s

    def triage_seconds(self, frames_to_read: float, events: float, frames: float | None) -> float:
        """Reading what triage flagged: its frames and events, capped at reading all `frames` of the recording
        (None: unknown, no cap)."""
        flagged = self.seconds(frames_to_read, events)
        return flagged if frames is None else min(flagged, self.seconds(frames))

    def describe(self) -> str:
        return f"a reader reads {self.fps:g} frames/s and spends {self.event_s:g} s per event"


def frames_in_spans(starts: np.ndarray, ends: np.ndarray) -> int:
    """Distinct frames covered by inclusive spans start..end (overlapping spans count their frames once)."""
    starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    if not len(starts):
        return 0
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    reach = np.maximum.accumulate(e)  # the furthest frame covered by any span that starts at or before this one
    new = np.r_[True, s[1:] > reach[:-1]]  # a span that starts after everything before it: a new run
    runs_start = s[new]
    runs_end = reach[np.r_[np.flatnonzero(new)[1:] - 1, len(s) - 1]]
    return int((runs_end - runs_start + 1).sum())


@dataclass
class ReadingEstimate:
    """Frames to read and the estimated reading time of one study (see the module docstring)."""

    frames: int
    frames_to_read: int
    events: int
    reading_s: float
    full_s: float
    model: ReadingModel

    @property
    def fraction_to_read(self) -> float:
        return self.frames_to_read / self.frames if self.frames else 0.0

    @property
    def saved_s(self) -> float:
        return self.full_s - self.reading_s

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = asdict(self.model)
        d.update(fraction_to_read=self.fraction_to_read, saved_s=self.saved_s,
                 reading_min=self.reading_s / 60, full_min=self.full_s / 60)
        return d

    def describe(self) -> str:
        return (f"{self.frames_to_read} of {self.frames} frames to read ({100 * self.fraction_to_read:.1f}%) in "
                f"{self.events} events: about {clock(self.reading_s)} against {clock(self.full_s)} for the whole "
                f"recording ({self.model.describe()})")


def estimate(n_frames: int, starts: np.ndarray, ends: np.ndarray, model: ReadingModel | None = None
             ) -> ReadingEstimate:
    """The reading estimate of a study with `n_frames` frames and events spanning `starts`..`ends`."""
    model = model or ReadingModel()
    to_read = frames_in_spans(starts, ends)
    return ReadingEstimate(int(n_frames), to_read, len(starts), model.triage_seconds(to_read, len(starts), n_frames),
                           model.seconds(n_frames), model)


def study_estimate(reader: Any, model: ReadingModel | None = None) -> ReadingEstimate:
    """`estimate` for an open `StudyReader`."""
    t = reader.events_table()
    return estimate(len(reader), t["start"], t["end"], model)


def clock(sec: float | None) -> str:
    """h:mm:ss, rounded to the second."""
    if sec is None:
        return ""
    s = int(round(sec))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
