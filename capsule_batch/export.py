"""Export a study file for people and spreadsheets: event thumbnails as JPEG files, events.csv, frames.csv."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from capsule_batch.errors import StudyError
from capsule_batch.store import STATUS_NAMES, StudyReader
from capsule_batch.triage import classify

_logger = logging.getLogger(__name__)


def _seconds(t: float) -> str:
    """A stored timestamp for a CSV cell: empty where the recording has no times (NaN)."""
    return f"{t:.3f}" if np.isfinite(t) else ""


def export_study(study: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
                 block: int = 65536) -> dict[str, Any]:
    """Write OUT/thumbs/*.jpg, OUT/events.csv and OUT/frames.csv (every frame: pts, status, score, flag,
    class, probabilities); returns what was written. Frames are streamed, so memory stays bounded.

    Times are left empty where the recording has none (a frame folder run without --fps); a frame folder's study
    adds each frame's file name (`file` in frames.csv, `peak_file` in events.csv)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise StudyError(f"{out}: folder is not empty (use --overwrite)")
    thumbs_dir = out / "thumbs"
    thumbs_dir.mkdir(parents=True, exist_ok=True)
    with StudyReader(study) as rd:
        names = rd.class_names
        cfg = rd.triage
        if cfg is None:
            raise StudyError(f"{study}: no triage settings recorded")
        events = rd.events_table()
        named = rd.has_files
        with open(out / "events.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["event", "class", "start_frame", "end_frame", "start_s", "end_s", "peak_frame", "peak_score",
                        "flagged_frames", *(["peak_file"] if named else [])])
            for lo in range(0, len(events), 4096):  # events are sorted by start: read the pts they span
                chunk = events[lo:lo + 4096]
                first = int(chunk["start"].min())
                pts = rd.pts(first, int(chunk["end"].max()) + 1)
                for i, e in enumerate(chunk, start=lo):
                    w.writerow([i, names[e["class"]], e["start"], e["end"], _seconds(pts[e["start"] - first]),
                                _seconds(pts[e["end"] - first]), e["peak_frame"], f"{e['peak_score']:.4f}",
                                e["n_flagged"], *([rd.frame_file(int(e["peak_frame"]))] if named else [])])
        files = []
        for t in rd.thumbs():
            cls = names[int(events[t.event]["class"])]
            p = thumbs_dir / f"event{t.event:05d}_{cls}_frame{t.frame:07d}.jpg"
            p.write_bytes(t.jpeg)
            files.append(p)
        with open(out / "frames.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["frame", "pts", "status", "score", "flagged", "class", *names, *(["file"] if named else [])])
            for lo, hi in rd.blocks(block):
                p = rd.probs(lo, hi)
                score, flagged, cls = classify(p, cfg)
                file_names = rd.files(lo, hi) if named else [None] * (hi - lo)
                for f, t, s, sc, fl, c, row, fn in zip(rd.index(lo, hi), rd.pts(lo, hi), rd.status(lo, hi), score,
                                                       flagged, cls, p, file_names, strict=True):
                    w.writerow([int(f), _seconds(t), STATUS_NAMES.get(int(s), str(s)), f"{sc:.4f}", int(fl),
                                names[int(c)] if fl else "", *(f"{x:.4f}" for x in row), *([fn] if named else [])])
        n = len(rd)
    _logger.info("%s: exported %d events, %d thumbnails, %d frames to %s", study, len(events), len(files), n, out)
    return {"study": str(study), "output": str(out), "events": len(events), "thumbnails": len(files), "frames": n,
            "events_csv": str(out / "events.csv"), "frames_csv": str(out / "frames.csv")}
