"""The study file's schema, written once: its name, the per-frame datasets, the frame status values, the events
table's row type. `store.py` reads and writes files by it, the run's writer stage hands rows in its order, and
triage builds events in its row type (docs/design.md, "The study file")."""

from __future__ import annotations

import numpy as np

SCHEMA = "capsule-batch/1"

#: frames/status values
STATUS_OK, STATUS_DECODE_FAILED = 0, 1
STATUS_NAMES = {STATUS_OK: "ok", STATUS_DECODE_FAILED: "decode-failed"}

#: the per-frame datasets under `frames/`, one row per frame, in the order rows are handed to the writer:
#: name -> (dimensions, dtype kinds a reader accepts, dtype written; None: the study's `probs_dtype`)
FRAME_DATASETS: dict[str, tuple[int, str, str | None]] = {
    "index": (1, "iu", "<u4"),
    "pts": (1, "f", "<f8"),
    "probs": (2, "f", None),
    "status": (1, "iu", "u1"),
}

#: one row of the study file's `events` table; `classes` is a bit mask of every class flagged inside the event (bit c
#: for class c; the leading `class` included). Studies made before it have no `classes` column: see
#: `triage.event_classes`
EVENT_DTYPE = np.dtype([("start", "<u4"), ("end", "<u4"), ("class", "<u2"), ("peak_frame", "<u4"),
                        ("peak_score", "<f4"), ("n_flagged", "<u4"), ("classes", "<u4")])
