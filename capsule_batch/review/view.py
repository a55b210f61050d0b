"""What the review app and the report show of a study, computed once from a `StudyReader`.

Large studies (1M frames, thousands of events) stay fast because the timeline is downsampled here
(per bin: the highest probability of each class, and the class of the strongest event touching it),
the event list is served in pages, and per-frame data is read only for the range an event view needs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from capsule_batch.study.store import StudyReader
from capsule_batch.study.triage import events_from_table

_logger = logging.getLogger(__name__)

TIMELINE_BINS = 1200
CONTEXT_POINTS = 400
SORTS = ("time", "score", "class")



def _seconds(t: float) -> float | None:
    """A time for JSON: None where it is unknown (NaN is not JSON)."""
    return float(t) if np.isfinite(t) else None


@dataclass
class Timeline:
    """Per-bin maxima of each class probability, bins of `bin_frames` frames, and flagged ticks per bin."""

    start: int
    stop: int
    bin_frames: float
    probs: np.ndarray  # (bins, C) float32
    ticks: np.ndarray  # (bins,) int16: class of the strongest event in the bin, -1 where none
    failed: np.ndarray  # (bins,) frames in the bin that could not be decoded during the run

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "stop": self.stop, "bin_frames": self.bin_frames,
                "probs": np.round(self.probs.astype(np.float64), 2).tolist(), "ticks": self.ticks.tolist(),
                "failed": self.failed.tolist()}


def bin_max(reader: StudyReader, start: int, stop: int, bins: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(bins, C) per-bin maxima of the probabilities of frames start..stop-1 and (bins,) counts of frames that
    failed to decode (NaN probabilities, ignored in the maxima), read block by block."""
    n = max(0, stop - start)
    bins = max(1, min(bins, n))
    edges = start + (np.arange(bins + 1) * n) // bins
    out = np.zeros((bins, len(reader.class_names)), np.float32)
    failed = np.zeros(bins, np.int64)
    block = 1 << 17
    for lo in range(start, stop, block):
        hi = min(stop, lo + block)
        p = reader.probs(lo, hi)
        first = max(0, int(np.searchsorted(edges, lo, "right")) - 1)
        last = int(np.searchsorted(edges, hi - 1, "right")) - 1
        cuts = np.clip(edges[first:last + 1], lo, hi) - lo
        red = np.fmax.reduceat(p, cuts, axis=0)
        out[first:last + 1] = np.fmax(out[first:last + 1], red)
        failed[first:last + 1] += np.add.reduceat((reader.status(lo, hi) != 0).astype(np.int64), cuts)
    return np.nan_to_num(out), failed, n / bins


class StudyView:
    """A study opened for display: events as arrays, thumbnails by frame and by event, the timeline."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.reader = StudyReader(self.path)
        r = self.reader
        try:
            with r.guard():
                self.attrs = r.attrs
                self.class_names = r.class_names
                self.n_frames = len(r)
                table = r.events_table()
                self.events = events_from_table(table)
                self.ev_start = table["start"].astype(np.int64)
                self.ev_end = table["end"].astype(np.int64)
                self.ev_cls = table["class"].astype(np.int64)
                self.ev_score = table["peak_score"].astype(np.float64)
                self._orders = {"time": np.lexsort((np.arange(len(table)), self.ev_start)),
                                "score": np.lexsort((self.ev_start, -self.ev_score)),
                                "class": np.lexsort((self.ev_start, self.ev_cls))}
                self.thumbs: dict[int, bytes] = {}
                self.thumbs_of_event: dict[int, list[int]] = {}
                for t in r.thumbs():
                    self.thumbs[t.frame] = t.jpeg
                    if t.event >= 0:
                        self.thumbs_of_event.setdefault(t.event, []).append(t.frame)
                for frames in self.thumbs_of_event.values():
                    frames.sort()
                fps = self.attrs.get("fps")
                self.fps = float(fps) if isinstance(fps, (int, float)) and fps > 0 else None
                pts = r.pts()  # one read of the whole column (8 MB for 1M frames) instead of one per listed event
                self.ev_time = pts[self.ev_start].astype(np.float64) if len(table) else np.zeros(0)
                if self.fps:  # a frame folder run with --fps stores its times; a time is never invented without one
                    self.ev_time = np.where(np.isfinite(self.ev_time), self.ev_time, self.ev_start / self.fps)
        except BaseException:
            r.close()
            raise
        self._timeline: Timeline | None = None

    def close(self) -> None:
        self.reader.close()

    @property
    def normal_index(self) -> int | None:
        cfg = self.reader.triage
        name = cfg.normal_class if cfg else None
        return self.class_names.index(name) if name in self.class_names else None

    @property
    def source_name(self) -> str:
        return Path(str(self.attrs.get("source_path", self.path.stem))).name

    def timeline(self, start: int = 0, stop: int | None = None, bins: int = TIMELINE_BINS) -> Timeline:
        """The whole recording's timeline is computed once; a zoomed range is computed on request."""
        stop = self.n_frames if stop is None else max(0, min(stop, self.n_frames))
        start = max(0, min(start, stop))
        whole = start == 0 and stop == self.n_frames and bins == TIMELINE_BINS
        if whole and self._timeline is not None:
            return self._timeline
        probs, failed, width = bin_max(self.reader, start, stop, bins)
        ticks = np.full(len(probs), -1, np.int16)
        sel = np.nonzero((self.ev_end >= start) & (self.ev_start < stop))[0]
        for i in sel[np.argsort(self.ev_score[sel])]:  # stronger events drawn last win their bins
            b0 = int((max(self.ev_start[i], start) - start) // width)
            b1 = int((min(self.ev_end[i], stop - 1) - start) // width)
            ticks[b0:b1 + 1] = self.ev_cls[i]
        tl = Timeline(start, stop, width, probs, ticks, failed)
        if whole:
            self._timeline = tl
        return tl

    @property
    def n_failed(self) -> int:
        """Frames that could not be decoded during the run (they have no probabilities)."""
        return int(self.timeline().failed.sum())

    def decoded(self, frame: int) -> bool:
        return 0 <= frame < self.n_frames and int(self.reader.status(frame, frame + 1)[0]) == 0

    def order(self, sort: str, descending: bool = False) -> np.ndarray:
        o = self._orders[sort]
        return o[::-1] if descending else o

    def event_json(self, i: int) -> dict[str, Any]:
        e = self.events[i]
        return {"id": i, "start": e.start, "end": e.end, "cls": e.cls, "class": self.class_names[e.cls],
                "classes": [self.class_names[c] for c in e.class_set if c < len(self.class_names)],
                "peak_frame": e.peak_frame, "peak_score": round(float(e.peak_score), 4), "n_flagged": e.n_flagged,
                "time": _seconds(self.ev_time[i]), "peak_file": self.frame_file(e.peak_frame),
                "thumbs": len(self.thumbs_of_event.get(i, []))}

    def event_files(self, i: int, most: int = 256) -> dict[str, str]:
        """Frame folders: file names of the event's frames (its thumbnails and peak only, for a long event)."""
        if not self.reader.has_files:
            return {}
        e = self.events[i]
        if e.end - e.start < most:
            return {str(e.start + k): n for k, n in enumerate(self.reader.files(e.start, e.end + 1))}
        return {str(f): self.frame_file(f) or "" for f in {e.peak_frame, *self.thumbs_of_event.get(i, [])}}

    def frame_file(self, frame: int) -> str | None:
        """A frame folder's file name for `frame` (None for video, and for studies made before names were stored)."""
        return self.reader.frame_file(frame) if self.reader.has_files and 0 <= frame < self.n_frames else None

    def frame_time(self, frame: int) -> float | None:
        """Seconds from the start of the recording (stored pts; fps when pts are missing; None when unknown)."""
        if 0 <= frame < self.n_frames:
            t = float(self.reader.pts(frame, frame + 1)[0])
            if np.isfinite(t):
                return t
        return frame / self.fps if self.fps else None

    def event_detail(self, i: int) -> dict[str, Any]:
        """The event, its peak probabilities, and a downsampled probability trace around it."""
        e = self.events[i]
        span = e.end - e.start + 1
        ctx = max(30, span)
        lo, hi = max(0, e.start - ctx), min(self.n_frames, e.end + ctx + 1)
        probs = self.reader.probs(lo, hi)
        step = max(1, -(-(hi - lo) // CONTEXT_POINTS))
        cut = np.arange(0, hi - lo, step)
        trace = np.nan_to_num(np.fmax.reduceat(probs, cut, axis=0))
        peak = np.nan_to_num(self.reader.probs(e.peak_frame, e.peak_frame + 1)[0])
        prev_i = np.nonzero(self.ev_start < e.start)[0]
        next_i = np.nonzero(self.ev_start > e.start)[0]
        return {**self.event_json(i), "peak_probs": np.round(peak.astype(np.float64), 4).tolist(),
                "context": {"start": lo, "stop": hi, "step": step,
                            "probs": np.round(trace.astype(np.float64), 3).tolist()},
                "thumb_frames": self.thumbs_of_event.get(i, []),
                "files": self.event_files(i),
                "prev": int(prev_i[np.argmax(self.ev_start[prev_i])]) if len(prev_i) else None,
                "next": int(next_i[np.argmin(self.ev_start[next_i])]) if len(next_i) else None}

    def provenance(self) -> dict[str, Any]:
        a = self.attrs
        keys = ("source_path", "source_size", "source_hash", "bundle_name", "bundle_sha256", "backend", "precision",
                "software_version", "created", "finished", "fps", "decoder", "frame_sizes", "argv", "triage")
        return {k: a[k] for k in keys if k in a}
