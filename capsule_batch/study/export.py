"""Export a study file for people and spreadsheets: event thumbnails as JPEG files, events.csv, frames.csv."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from capsule_batch.errors import StudyError
from capsule_batch.study.schema import STATUS_NAMES
from capsule_batch.study.store import StudyReader
from capsule_batch.study.triage import classes_in, classify, event_classes

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
                        "flagged_frames", "classes", *(["peak_file"] if named else [])])
            masks = event_classes(events)
            for lo in range(0, len(events), 4096):  # events are sorted by start: read the pts (files) they span
                chunk = events[lo:lo + 4096]
                first, last = int(chunk["start"].min()), int(chunk["end"].max()) + 1
                pts = rd.pts(first, last)
                peak_files = rd.files(first, last) if named else None
                for i, e in enumerate(chunk, start=lo):
                    w.writerow([i, names[e["class"]], e["start"], e["end"], _seconds(pts[e["start"] - first]),
                                _seconds(pts[e["end"] - first]), e["peak_frame"], f"{e['peak_score']:.4f}",
                                e["n_flagged"], ";".join(names[c] for c in classes_in(masks[i]) if c < len(names)),
                                *([peak_files[int(e["peak_frame"]) - first]] if peak_files is not None else [])])
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


# ---------------------------------------------------------------------------------------------------------------
# Readers' decisions out: for the hospital's records (decisions.csv) and for training (labels per recording)

DECISION_COLUMNS = ["recording", "study", "event", "start_frame", "end_frame", "start_s", "end_s", "peak_frame",
                    "peak_file", "detected_class", "decision", "class", "note", "reviewer", "time"]


def _decided_events(rd: StudyReader) -> list[tuple[Any, Any]]:
    """[(event row, its latest decision)] of the events a reader decided on, by event."""
    from capsule_batch.study.decisions import read_decisions

    decisions = read_decisions(rd.path)
    events = rd.events_table()
    return [(events[i], decisions[i]) for i in sorted(decisions) if i < len(events) and decisions[i].verdict]


def export_decisions(studies: list[Path], out: Path) -> dict[str, Any]:
    """OUT/decisions.csv: every reviewer decision of `studies` (the latest per event), one row each: the recording,
    the event's frames and times, the detected class, confirm/reject, the class the reader gave, note, who, when."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "decisions.csv"
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(DECISION_COLUMNS)
        for study in studies:
            with StudyReader(study) as rd:
                attrs, names = rd.attrs, rd.class_names
                for e, d in _decided_events(rd):
                    pts = rd.pts(int(e["start"]), int(e["end"]) + 1)
                    detected = names[int(e["class"])]
                    given = names[d.cls] if d.cls is not None else detected
                    w.writerow([attrs.get("source_path", ""), str(study), d.event, int(e["start"]), int(e["end"]),
                                _seconds(pts[0]), _seconds(pts[-1]), int(e["peak_frame"]),
                                rd.frame_file(int(e["peak_frame"])) or "", detected, d.verdict, given, d.comment,
                                d.reviewer, d.time])
                    n += 1
    _logger.info("wrote %s (%d decisions from %d studies)", path, n, len(studies))
    return {"decisions_csv": str(path), "decisions": n, "studies": len(studies)}


def export_labels(studies: list[Path], out: Path) -> dict[str, Any]:
    """Frame labels from the readers' decisions, as `python -m train` reads labelled frames inside recordings: per
    study OUT/<study>.labels.csv (`frame`, `label`, and `file` for a frame folder) and OUT/datasets.yaml with one
    `kind: recording` dataset per study, to put under `data.train`. A confirmed event's frames get its class (or the
    class the reader gave); a rejected event's frames the class the reader gave, else the normal class. Frames of
    events nobody decided, and frames outside events, are not labelled."""
    out.mkdir(parents=True, exist_ok=True)
    specs, total = [], 0
    for study in studies:
        labels: dict[int, str] = {}
        with StudyReader(study) as rd:
            attrs, names = rd.attrs, rd.class_names
            normal = attrs.get("normal_class") or "Normal"
            for e, d in _decided_events(rd):
                if d.verdict == "confirm":
                    label = names[d.cls] if d.cls is not None else names[int(e["class"])]
                else:
                    label = names[d.cls] if d.cls is not None else normal
                for f in range(int(e["start"]), int(e["end"]) + 1):
                    labels[f] = label  # a later decision on overlapping events wins
            files = rd.files() if rd.has_files else None
        csv_path = out / f"{study.stem}.labels.csv"
        with open(csv_path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["frame", "label", *(["file"] if files else [])])
            for f in sorted(labels):
                w.writerow([f, labels[f], *([files[f]] if files else [])])
        source = str(attrs.get("source_path", ""))
        spec: dict[str, Any] = {"kind": "recording", "name": study.stem, "labels": str(csv_path.resolve())}
        if files:
            spec.update(frames=source, file_column="file")
        else:
            spec["video"] = source
        specs.append(spec)
        total += len(labels)
    yaml_path = out / "datasets.yaml"
    lines = ["# capsule-batch export --labels: the readers' decisions as labelled frames inside recordings;",
             "# put these under data.train (or data.val) of a python -m train config (docs/training.md)"]
    lines += ["- " + json.dumps(s) for s in specs]  # JSON objects are YAML flow mappings
    yaml_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _logger.info("wrote %s (%d labelled frames from %d studies)", yaml_path, total, len(studies))
    return {"datasets_yaml": str(yaml_path), "frames": total, "studies": len(studies),
            "labels_csv": [s["labels"] for s in specs]}
