"""Synthetic study files for the review tests: known runs of a class, real events and JPEG thumbnails."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from capsule_batch.model.classes import CE24_CLASSES
from capsule_batch.sources.synthesize import Scene
from capsule_batch.study.store import StudyWriter, recording_identity
from capsule_batch.study.triage import TriageConfig, compute_events, thumbnail_frames

NORMAL = CE24_CLASSES.index("Normal")


def study_attrs(source: str = "/data/rec.mp4", **kw: object) -> dict:
    d = {"source_path": source, "source_size": 1234, "source_hash": "sha256-ends:" + "a" * 64,
         "bundle_sha256": "b" * 64, "bundle_name": "eva02-test", "class_names": list(CE24_CLASSES),
         "probs_dtype": "float16", "backend": "torch", "precision": "fp32", "fps": 4.0}
    d.update(kw)
    return d


def run_probs(n: int, runs: list[tuple[int, int, int, float]], seed: int = 0) -> np.ndarray:
    """Mostly-normal probabilities with `runs` (start, end inclusive, class, peak prob) flagged."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(len(CE24_CLASSES), 0.3), n).astype(np.float32) * 0.1
    p[:, NORMAL] += 0.9
    for start, end, cls, peak in runs:
        k = np.arange(start, end + 1)
        bump = peak * (1 - 0.3 * np.abs(k - (start + end) / 2) / max(1, (end - start) / 2))
        p[k] *= (1 - bump)[:, None]
        p[k, cls] += bump
    return p / p.sum(1, keepdims=True)


def jpeg(img: np.ndarray, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_study(path: Path, n: int = 400, runs: list[tuple[int, int, int, float]] | None = None,
               source: str = "/data/rec.mp4", thumb_size: int = 96, per_event: int = 4, max_thumbs: int = 10_000,
               block: int = 100_000, pts: np.ndarray | None = None, seed: int = 0, failed: tuple[int, ...] = (),
               recording: Path | None = None) -> Path:
    """Write a complete study; events come from the real triage on the synthetic probabilities. Frames in
    `failed` are stored as the pipeline stores decode failures: status 1, NaN probabilities and timestamp.
    `recording`: a real file or folder whose identity (path, size, content hash) the study records."""
    runs = runs if runs is not None else [(40, 52, 1, 0.9), (120, 126, 8, 0.8), (200, 230, 7, 0.7),
                                          (300, 305, 0, 0.95), (350, 360, 3, 0.75)]
    probs = run_probs(n, runs, seed)
    pts = np.arange(n) / 4.0 if pts is None else pts.copy()
    stored, status = probs.copy(), np.zeros(n, np.uint8)
    idx = list(failed)
    stored[idx], pts[idx], status[idx] = np.nan, np.nan, 1
    probs[idx] = np.eye(len(CE24_CLASSES))[NORMAL]  # never flagged
    identity = recording_identity(recording) if recording is not None else {}
    w = StudyWriter.open(path, study_attrs(source, **identity))
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        w.append(np.arange(lo, hi), pts[lo:hi], stored[lo:hi], status[lo:hi])
    cfg = TriageConfig(tuple(CE24_CLASSES), "Normal")
    events, n_flagged = compute_events(iter([(np.arange(n), probs)]), cfg)
    scene = Scene(thumb_size, min(n, 2000), seed, 4.0, 0.0, stamp=True)
    thumbs = [(f, ev, jpeg(scene.render(f % scene.frames))) for f, evs in
              sorted(thumbnail_frames(events, per_event, max_thumbs).items()) for ev in evs]
    out = w.finish(events, n_flagged, cfg, thumbs)
    w.close()
    return out


def make_event_study(path: Path, n: int, events: list[tuple[int, int, str, float]], fps: float | None = 2.0,
                     pts: np.ndarray | None = None) -> Path:
    """A complete study whose events are exactly `events` (start, end inclusive, class name, peak score), for
    figures computed by hand: every frame is stored as plainly normal, the events table is written as given."""
    from capsule_batch.study.triage import Event

    probs = np.tile(np.eye(len(CE24_CLASSES), dtype=np.float32)[NORMAL], (n, 1))
    pts = (np.arange(n) / (fps or 1.0)) if pts is None else pts
    attrs = study_attrs(fps=fps) if fps is not None else {k: v for k, v in study_attrs().items() if k != "fps"}
    w = StudyWriter.open(path, attrs)
    w.append(np.arange(n), pts, probs, np.zeros(n, np.uint8))
    evs = [Event(s, e, CE24_CLASSES.index(c), s, peak, e - s + 1) for s, e, c, peak in events]
    out = w.finish(evs, sum(e.n_flagged for e in evs), TriageConfig(tuple(CE24_CLASSES), "Normal"), [])
    w.close()
    return out
