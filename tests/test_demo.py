"""The README's demo (`make demo` -> `python -m train.demo`, its defaults): the figures it prints must equal what
the study file's events and the synthetic ground truth give, computed here without
capsule_batch.evaluation.groundtruth; they must meet the demo's goals (the README's tolerance: on any x86-64 CPU);
the summary speaks a reader's terms and says what to do next, and the report says what it is for."""

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


@pytest.mark.slow  # ~6 min on 2 cores: trains the demo model, calibrates it, runs an 83-minute study
def test_the_demo_meets_its_goals(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "CAPSULE_BATCH_ENGINES": str(tmp_path / "engines")}  # the ONNX export stays out of the checkout
    cmd = [sys.executable, "-m", "train.demo", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
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
    assert frames == summary["frames"] == 20000
    assert (summary["findings"], summary["caught"], summary["caught_class"]) == (len(findings), caught, class_ok)
    assert summary["events"] == len(events) and summary["flagged_frames"] == flagged
    assert f"findings caught   {caught} of {len(findings)} injected" in proc.stdout
    # the goals (README, "Try it"): at most 10 % of frames flagged, every injected finding but at most one caught,
    # at most 2 events per finding, reading the events at least 5x shorter than reading every frame
    assert len(findings) == 20, summary
    assert summary["flag_rate"] <= 0.10 and flagged <= 0.10 * frames, summary
    assert caught >= len(findings) - 1, summary
    assert len(events) <= 2 * len(findings), summary
    assert summary["full_reading_min"] >= 5 * summary["reading_min"], summary
    # the reading estimate, recomputed: 15 frames/s over the distinct frames inside events, 5 s per event
    span = set().union(*(range(int(ev["start"]), int(ev["end"]) + 1) for ev in events))
    assert abs(summary["reading_min"] * 60 - min(len(span) / 15 + 5 * len(events), frames / 15)) < 1e-6, summary
    assert abs(summary["full_reading_min"] * 60 - frames / 15) < 1e-6, summary
    assert summary["budget"] == 0.05 and summary["calibration"]["overall_flag_rate"] <= 0.05, summary
    bundle_json = json.loads((out / "model" / "bundle" / "model.json").read_text(encoding="utf-8"))
    assert bundle_json["thresholds"], "the demo's bundle carries calibrated thresholds"
    assert "reading " in proc.stdout and "x shorter" in proc.stdout and "next:" in proc.stdout
    assert "capsule-batch review" in proc.stdout and "capsule-batch compare" in proc.stdout
    report = (out / "study.html").read_text(encoding="utf-8")
    assert "not a medical device" in report and "Reading estimate" in report
