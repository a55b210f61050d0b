"""Ground-truth comparison: caught / class-matched findings, false events, flag rate, CSV errors, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from capsule_batch.errors import CapsuleError
from capsule_batch.evaluation.groundtruth import compare, read_findings
from capsule_batch.study.store import StudyReader
from tests.review_studies import make_study

ROOT = Path(__file__).resolve().parents[1]


def write_findings(path: Path, rows: list[tuple[int, str, int, int]]) -> Path:
    path.write_text("finding,class,start_frame,end_frame\n" + "".join(f"{k},{c},{s},{e}\n" for k, c, s, e in rows))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # events of classes 1 (Bleeding) 40-52, 8 (Ulcer) 120-126, 7 (Polyp) 200-230, 0 300-305, 3 350-360
    return make_study(tmp_path_factory.mktemp("gt") / "s.h5")


def test_caught_class_matched_and_false_events(study: Path, tmp_path: Path) -> None:
    with StudyReader(study) as r:
        events = [(e.start, e.end, r.class_names[e.cls]) for e in r.events()]
        flagged = r.attrs["flagged_frames"]
    assert len(events) == 5
    findings = write_findings(tmp_path / "f.csv", [
        (0, "Bleeding", 45, 47),       # inside the Bleeding event: caught, right class
        (1, "Polyp", 110, 121),         # touches the Ulcer event's first frames: caught, wrong class
        (2, "Worms", 250, 260),         # nothing there: missed
        (3, "Polyp", 230, 240),         # overlaps the Polyp event's last frame only
    ])
    c = compare(study, findings)
    assert (c.findings, c.caught, c.caught_class) == (4, 3, 2)
    assert [r.caught for r in c.rows] == [True, True, False, True]
    assert c.rows[1].event_classes == ["Ulcer"] and c.rows[2].event_classes == []
    assert c.events == 5 and c.false_events == 2  # the events at 300 and 350 overlap no finding
    assert c.frames == 400 and c.flagged_frames == flagged and c.flag_rate == pytest.approx(flagged / 400)
    assert json.loads(json.dumps(c.to_json()))["flag_rate"] == pytest.approx(c.flag_rate)


def test_edges_do_not_overlap(study: Path, tmp_path: Path) -> None:
    with StudyReader(study) as r:
        e = r.events()[0]
    c = compare(study, write_findings(tmp_path / "f.csv", [(0, "Bleeding", e.end + 1, e.end + 3),
                                                            (1, "Bleeding", max(0, e.start - 3), e.start - 1)]))
    assert c.caught == 0


@pytest.mark.parametrize("text, message", [
    ("finding,class,start\n0,Polyp,3\n", "missing start_frame, end_frame"),
    ("finding,class,start_frame,end_frame\n0,Polyp,a,4\n", "line 2"),
    ("finding,class,start_frame,end_frame\n0,Polyp,9,4\n", "before start_frame"),
])
def test_bad_findings_file(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(CapsuleError, match=message) as e:
        read_findings(p)
    assert str(p) in str(e.value)
    with pytest.raises(CapsuleError, match="no such findings file"):
        read_findings(tmp_path / "none.csv")


def test_cli(study: Path, tmp_path: Path) -> None:
    findings = write_findings(tmp_path / "f.csv", [(0, "Bleeding", 45, 47), (1, "Worms", 250, 260)])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "capsule_batch", "compare", str(study), str(findings)]
    out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, check=True).stdout
    d = json.loads(out)
    assert (d["caught"], d["findings"], d["caught_class"]) == (1, 2, 1)
    text = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    assert "caught 1/2 findings" in text and "missed" in text
    bad = subprocess.run([*cmd[:-1], str(tmp_path / "f.csv.missing")], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "f.csv.missing" in bad.stderr
