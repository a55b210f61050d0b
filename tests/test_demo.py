"""The README's demo path (`make demo` -> `python -m train.demo`), smaller: the caught-findings figure it
prints must equal what the study file's events and the synthetic ground truth give, computed here
without capsule_batch.evaluation.groundtruth; the summary speaks a reader's terms and says what to do next,
and the report says what it is for."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~1.5 min on 2 shared cores: trains the demo model
def test_demo_catches_most_findings(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "CAPSULE_BATCH_ENGINES": str(tmp_path / "engines")}  # the ONNX export stays out of the checkout
    cmd = [sys.executable, "-m", "train.demo", "-o", str(out), "--frames", "800", "--train-frames", "300",
           "--epochs", "12"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for name in ("study.h5", "study.html", "study.mp4", "study.findings.csv", "model/bundle/model.json"):
        assert (out / name).is_file(), name
    assert "<html" in (out / "study.html").read_text()[:500].lower()

    # independent count: a finding is caught when an event's [start, end] overlaps its [start_frame, end_frame]
    with h5py.File(out / "study.h5", "r") as f:
        events = f["events"][:]
        frames = int(f.attrs["frames_done"])
        names = json.loads(f.attrs["class_names"])
        flagged = int(f.attrs["flagged_frames"])
    with open(out / "study.findings.csv", newline="") as fh:
        findings = list(csv.DictReader(fh))
    caught = class_ok = 0
    for row in findings:
        s, e = int(row["start_frame"]), int(row["end_frame"])
        hit = [ev for ev in events if int(ev["start"]) <= e and int(ev["end"]) >= s]
        caught += bool(hit)
        seen = {names[c] for ev in hit for c in range(len(names)) if int(ev["classes"]) >> c & 1}
        class_ok += row["class"] in seen
    assert frames == summary["frames"] == 800
    assert (summary["findings"], summary["caught"], summary["caught_class"]) == (len(findings), caught, class_ok)
    assert summary["events"] == len(events) and summary["flagged_frames"] == flagged
    assert f"findings caught   {caught} of {len(findings)} injected" in proc.stdout
    # a sensible model: most injected findings caught, far from flagging everything, about one stop per finding
    assert len(findings) >= 8 and caught >= 0.7 * len(findings), summary
    assert summary["flag_rate"] < 0.6, summary
    assert summary["events"] <= 3 * len(findings), summary
    assert summary["reading_min"] <= summary["full_reading_min"], summary  # never worse than reading everything
    assert "reading " in proc.stdout and "x shorter" in proc.stdout and "next:" in proc.stdout
    assert "capsule-batch review" in proc.stdout and "capsule-batch compare" in proc.stdout
    report = (out / "study.html").read_text(encoding="utf-8")
    assert "not a medical device" in report and "Reading estimate" in report
