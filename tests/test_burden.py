"""What triage saves and risks, on two small studies whose every figure is computed by hand in the comments:
a finding caught late, one caught with another class, one missed, an event on no finding, a study with no
findings; pooled sensitivity with Wilson intervals (checked against scipy), false alerts per hour and frames to
read with bootstrap intervals over studies, the reading-budget curve, the CLI (text, JSON, SVG) and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from review_studies import make_event_study

from capsule_batch.errors import CapsuleError
from capsule_batch.evaluation.burden import summarise
from capsule_batch.evaluation.groundtruth import compare, pair_studies, recording_duration
from capsule_batch.evaluation.reading_time import ReadingModel, estimate, frames_in_spans
from capsule_batch.evaluation.stats import bootstrap, mean_of, wilson

ROOT = Path(__file__).resolve().parents[1]
HEADER = "finding,class,start_frame,end_frame\n"

# Study A: 3600 frames at 2 frames/s = 1800 s = 0.5 h.
A_EVENTS = [(100, 119, "Bleeding", 0.9),   # e0: 20 frames, catches f0 ten frames (5 s) after it starts
            (500, 509, "Polyp", 0.6),      # e1: 10 frames, catches f1 (Polyp) and f4 (Ulcer: not its class)
            (2000, 2004, "Ulcer", 0.8)]    # e2: 5 frames on no finding: a false alert
A_FINDINGS = [("f0", "Bleeding", 90, 130), ("f1", "Polyp", 500, 505), ("f2", "Worms", 3000, 3010),
              ("f4", "Ulcer", 505, 509)]
# Study B: 1800 frames at 2 frames/s = 0.25 h, no findings: both events are false alerts (15 frames to read).
B_EVENTS = [(10, 14, "Bleeding", 0.95), (1000, 1009, "Polyp", 0.5)]


def write_findings(path: Path, rows: list[tuple[str, str, int, int]]) -> Path:
    path.write_text(HEADER + "".join(f"{k},{c},{s},{e}\n" for k, c, s, e in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("burden")
    make_event_study(d / "a.h5", 3600, A_EVENTS)
    make_event_study(d / "b.h5", 1800, B_EVENTS)
    write_findings(d / "a.findings.csv", A_FINDINGS)
    write_findings(d / "b.findings.csv", [])
    return d


def test_one_study_by_hand(studies: Path) -> None:
    c = compare(studies / "a.h5", studies / "a.findings.csv")
    assert (c.findings, c.caught, c.caught_class, c.events, c.false_events) == (4, 3, 2, 3, 1)
    rows = {r.finding: r for r in c.rows}
    assert (rows["f0"].detected_frame, rows["f0"].delay_frames, rows["f0"].delay_s) == (100, 10, 5.0)  # late
    assert (rows["f1"].delay_frames, rows["f1"].delay_s, rows["f1"].events) == (0, 0.0, [1])
    assert rows["f4"].caught and not rows["f4"].class_matched and rows["f4"].event_classes == ["Polyp"]
    assert rows["f4"].detected_frame == 505  # the event began before the finding: detected at its first frame
    assert not rows["f2"].caught and rows["f2"].delay_frames is None and [r.finding for r in c.misses] == ["f2"]
    assert [e.findings for e in c.event_rows] == [["f0"], ["f1", "f4"], []]
    assert c.duration_s == 1800.0 and c.false_alerts_per_hour == 2.0  # 1 false alert in 0.5 h
    r = c.reading
    assert (r.frames, r.frames_to_read, r.events) == (3600, 35, 3)  # 20 + 10 + 5 frames inside events
    assert r.reading_s == pytest.approx(35 / 15 + 3 * 5) and r.full_s == 240.0  # 15 frames/s, 5 s per event
    assert r.fraction_to_read == pytest.approx(35 / 3600)

    s = summarise([c])
    o = s.overall
    assert (o.findings, o.caught, o.caught_class, o.false_alerts) == (4, 3, 2, 1)
    assert o.sensitivity == 0.75 and o.sensitivity_class == 0.5
    assert o.false_alerts_per_hour == 2.0 and o.frames_to_read == 35.0
    assert o.reading_min == pytest.approx((35 / 15 + 15) / 60)
    assert (o.delay_frames_median, o.delay_s_median, o.delay_s_max) == (0.0, 0.0, 5.0)  # delays 10, 0, 0 frames
    assert o.false_alerts_per_hour_ci is None and o.frames_to_read_ci is None  # one study: nothing to resample
    assert o.sensitivity_ci == pytest.approx(wilson(3, 4))
    assert list(s.per_class) == ["Bleeding", "Polyp", "Ulcer", "Worms"]  # model order, classes that occur
    b, p, u, w = (s.per_class[k] for k in ("Bleeding", "Polyp", "Ulcer", "Worms"))
    assert (b.findings, b.caught, b.events, b.false_alerts, b.frames_to_read, b.delay_s_median) == (1, 1, 1, 0, 20, 5.0)
    assert b.reading_min == pytest.approx((20 / 15 + 5) / 60)
    assert (p.caught, p.caught_class, p.frames_to_read) == (1, 1, 10)
    assert (u.findings, u.caught, u.caught_class, u.false_alerts, u.false_alerts_per_hour) == (1, 1, 0, 1, 2.0)
    assert (w.findings, w.caught, w.sensitivity, w.events, w.frames_to_read) == (1, 0, 0.0, 0, 0)
    assert s.misses == [{"study": str(studies / "a.h5"), "finding": "f2", "class": "Worms", "start": 3000,
                         "end": 3010}]


def test_two_studies_pooled_with_intervals(studies: Path) -> None:
    cs = [compare(studies / n, studies / n.replace(".h5", ".findings.csv")) for n in ("a.h5", "b.h5")]
    assert (cs[1].findings, cs[1].false_events, cs[1].reading.frames_to_read) == (0, 2, 15)
    s = summarise(cs)
    o = s.overall
    assert (s.studies, s.frames, s.hours) == (2, 5400, 0.75)
    assert (o.findings, o.caught, o.sensitivity) == (4, 3, 0.75)
    # 3 false alerts in 0.75 h; resampling the two studies gives AA 1/0.5 h = 2, AB 3/0.75 h = 4, BB 2/0.25 h = 8,
    # drawn 1/4, 1/2, 1/4 of the time: the central 95 % runs from AA's 2 to BB's 8
    assert o.false_alerts_per_hour == 4.0 and o.false_alerts_per_hour_ci == (2.0, 8.0)
    assert o.frames_to_read == 25.0 and o.frames_to_read_ci == (15.0, 35.0)  # mean of 35 and 15
    a_s, b_s = 35 / 15 + 3 * 5, 15 / 15 + 2 * 5
    assert o.reading_min == pytest.approx((a_s + b_s) / 2 / 60)
    assert o.reading_min_ci == pytest.approx((b_s / 60, a_s / 60))
    assert s.full_reading_min == pytest.approx((240 + 120) / 2 / 60)
    bl = s.per_class["Bleeding"]  # A's event caught f0; B's Bleeding event is a false alert
    assert (bl.findings, bl.caught, bl.events, bl.false_alerts) == (1, 1, 2, 1)
    assert bl.false_alerts_per_hour == pytest.approx(1 / 0.75)
    assert s.to_json()["assumptions"]["rate_ci"].startswith("percentile bootstrap over studies, 2000 resamples")

    # the curve: events of both studies ranked by peak score
    cv = s.curve
    assert cv.thresholds[0] is None and cv.thresholds[1:] == pytest.approx([0.95, 0.9, 0.8, 0.6, 0.5])
    # frames to read per study: B's 0.95 event (5 frames) first, then A's 0.9 (20), 0.8 (5), 0.6 (10), B's 0.5 (10)
    assert cv.frames == pytest.approx([0, 2.5, 12.5, 15, 20, 25])
    assert cv.sensitivity["all"] == pytest.approx([0, 0, 0.25, 0.25, 0.75, 0.75])
    assert cv.sensitivity["Bleeding"] == pytest.approx([0, 0, 1, 1, 1, 1])
    assert cv.sensitivity["Ulcer"] == pytest.approx([0, 0, 0, 0, 1, 1])  # caught by A's Polyp event at 0.6
    assert cv.sensitivity["Worms"] == [0.0] * 6
    assert cv.minutes[4] == pytest.approx((35 / 15 + 3 * 5 + 5 / 15 + 5) / 2 / 60)  # A: 3 events, B: 1


def test_wilson_against_hand_values_and_scipy() -> None:
    from scipy.stats import binomtest

    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 4) == pytest.approx((0.0, 0.4899), abs=1e-4)  # z^2/(n + z^2) = 3.8416 / 7.8416
    assert wilson(0, 0) is None
    for k, n in [(0, 1), (1, 1), (3, 4), (17, 20), (45, 45), (93, 100)]:
        ref = binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert wilson(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)
        ref90 = binomtest(k, n).proportion_ci(0.90, method="wilson")
        assert wilson(k, n, 0.90) == pytest.approx((ref90.low, ref90.high), abs=1e-9)


def test_bootstrap_is_deterministic_and_degenerate_cases() -> None:
    v = np.array([1.0, 2.0, 3.0, 4.0])
    first = bootstrap(mean_of(v), 4)
    assert first == bootstrap(mean_of(v), 4) and 1.0 <= first[0] < 2.5 < first[1] <= 4.0
    assert bootstrap(mean_of(np.array([7.0, 7.0, 7.0])), 3) == (7.0, 7.0)
    assert bootstrap(mean_of(v[:1]), 1) is None and bootstrap(mean_of(v), 4, draws=0) is None


def test_frames_in_spans_counts_overlaps_once() -> None:
    assert frames_in_spans(np.array([0, 5, 20, 14]), np.array([9, 14, 20, 16])) == 18  # 0..16 and 20
    assert frames_in_spans(np.array([3]), np.array([3])) == 1 and frames_in_spans(np.array([]), np.array([])) == 0
    e = estimate(100, np.array([0, 0]), np.array([9, 9]), ReadingModel(fps=10, event_s=2))
    assert (e.frames_to_read, e.reading_s, e.full_s) == (10, 10 / 10 + 2 * 2, 10.0)
    with pytest.raises(ValueError, match="reading speed"):
        ReadingModel(fps=0)


def test_duration_from_timestamps_when_no_fps(tmp_path: Path) -> None:
    # no fps attribute: the span of the timestamps plus one median interval (0.5 s): 9.5 + 0.5 = 10 s
    assert recording_duration(20, None, np.arange(20) / 2.0) == 10.0
    assert recording_duration(20, None, np.full(20, np.nan)) is None
    study = make_event_study(tmp_path / "s.h5", 20, [(4, 5, "Bleeding", 0.9)], fps=None, pts=np.arange(20) / 2.0)
    c = compare(study, write_findings(tmp_path / "f.csv", [("x", "Bleeding", 2, 6)]))
    assert c.duration_s == 10.0 and c.rows[0].delay_s == 1.0 and c.false_alerts_per_hour == 0.0


def test_pairing_studies_with_findings(studies: Path, tmp_path: Path) -> None:
    pairs = pair_studies(studies)
    assert pairs == [(studies / "a.h5", studies / "a.findings.csv"), (studies / "b.h5", studies / "b.findings.csv")]
    assert pair_studies(studies / "a.h5") == [(studies / "a.h5", studies / "a.findings.csv")]
    other = tmp_path / "findings"
    other.mkdir()
    write_findings(other / "a.findings.csv", [])
    with pytest.raises(CapsuleError, match=r"no findings file for 1 of 2 studies: .*b\.findings\.csv"):
        pair_studies(studies, other)
    with pytest.raises(CapsuleError, match="no study files"):
        pair_studies(other)
    with pytest.raises(CapsuleError, match="no such study file or folder"):
        pair_studies(tmp_path / "nothing")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "capsule_batch", "compare", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)


def test_cli_folder_json_text_and_plot(studies: Path, tmp_path: Path) -> None:
    r = _cli(studies, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert [Path(s["study"]).name for s in d["studies"]] == ["a.h5", "b.h5"]
    o = d["summary"]["overall"]
    assert (o["findings"], o["caught"], o["false_alerts"], o["false_alerts_per_hour"]) == (4, 3, 3, 4.0)
    assert o["false_alerts_per_hour_ci"] == [2.0, 8.0]
    assert d["summary"]["assumptions"]["reading_fps"] == 15.0
    assert d["studies"][0]["missed"] == ["f2"] and d["studies"][0]["rows"][0]["delay_s"] == 5.0

    svg = tmp_path / "curve.svg"
    r = _cli(studies, "--reading-fps", "10", "--event-seconds", "0", "--plot", svg)
    assert r.returncode == 0, r.stderr
    assert "missed: a.h5 finding f2 (Worms, frames 3000-3010)" in r.stdout
    assert "a reader reads 10 frames/s and spends 0 s per event" in r.stdout
    assert "caught 3/4 findings (2 with the right class); 5 events, 3 on no finding" in r.stdout
    assert "0.75 (0.30-0.95)" in r.stdout  # Wilson 3/4
    root = ET.fromstring(svg.read_text())
    labels = [p.get("data-label") for p in root.iter("{http://www.w3.org/2000/svg}polyline")]
    assert labels == ["all", "Bleeding", "Polyp", "Ulcer", "Worms"]

    r = _cli(studies / "a.h5", "--plot", tmp_path / "curve.png")
    assert r.returncode == 2 and "name it *.svg" in r.stderr
    r = _cli(studies / "a.h5", tmp_path / "missing.csv")
    assert r.returncode == 1 and "missing.csv: no such findings file" in r.stderr


def test_hostile_class_names_stay_text_in_the_chart(tmp_path: Path) -> None:
    from capsule_batch.evaluation.burden import curve_svg

    study = make_event_study(tmp_path / "s.h5", 50, [(4, 5, "Bleeding", 0.9)])
    hostile = "<script>alert(1)</script>&"
    c = compare(study, write_findings(tmp_path / "f.csv", [("x", hostile, 2, 6)]))
    svg = curve_svg(summarise([c]).curve)
    assert "<script>" not in svg
    labels = [t.text for t in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}text")]
    assert hostile in labels


def test_sensitivity_interval_respects_findings_clustered_in_studies() -> None:
    """Correlated findings (a study's lesions caught or missed together) widen the interval; independent-looking
    ones (every study alike) keep Wilson's."""
    from capsule_batch.evaluation.stats import clustered_proportion_ci

    n = np.full(10, 10.0)
    together = np.array([10.0] * 5 + [0.0] * 5)  # five studies with every finding caught, five with none
    even = np.full(10, 5.0)  # 5 of 10 in every study
    w = wilson(50, 100)
    assert w == pytest.approx((0.4038, 0.5962), abs=1e-4)
    lo, hi = clustered_proportion_ci(together, n)
    assert lo < 0.25 and hi > 0.75  # about 0.2-0.8: the studies, not the 100 findings, are the units
    assert clustered_proportion_ci(even, n) == pytest.approx(w)
    assert clustered_proportion_ci(np.array([3.0]), np.array([4.0])) == pytest.approx(wilson(3, 4))  # one study
