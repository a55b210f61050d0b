"""Synthetic recordings: real encoders, exact frame counts, stamps, ground truth, determinism."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from capsule_batch.cli import cli
from capsule_batch.errors import CapsuleError
from capsule_batch.synth import FINDING_CLASSES, Scene, read_stamp, synthesize


def decode_all(path: Path) -> tuple[list[np.ndarray], list[float]]:
    """Reference decode with PyAV (or PIL for frame folders, in natural order)."""
    if path.is_dir():
        files = sorted(path.iterdir(), key=lambda p: int(p.stem.split("_")[-1]))
        return [np.asarray(Image.open(f).convert("RGB")) for f in files], []
    frames, pts = [], []
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            frames.append(f.to_ndarray(format="rgb24"))
            pts.append(float(f.time))
    return frames, pts


def read_labels(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("name, codec", [("r.mp4", "h264"), ("r.avi", "mjpeg"), ("r.webm", "vp9"),
                                         ("frames", "png"), ("jframes", "jpg")])
def test_recording_decodes_to_requested_frames_with_stamps_and_labels(tmp_path, name, codec):
    n = 90
    res = synthesize(tmp_path / name, n, codec=codec, size=128, seed=5, stamp=True, findings_per_1000=30)
    frames, _ = decode_all(res.path)
    assert len(frames) == n
    assert [read_stamp(f) for f in frames] == list(range(n))
    assert frames[0].shape == (128, 128, 3)
    labels = read_labels(res.labels_csv)
    assert [int(r["frame"]) for r in labels] == list(range(n))
    findings = read_labels(res.findings_csv)
    assert len(findings) == len(res.findings) >= 2
    expected = ["Normal"] * n
    for f in findings:
        assert f["class"] in FINDING_CLASSES
        for i in range(int(f["start_frame"]), int(f["end_frame"]) + 1):
            expected[i] = f["class"]
    assert [r["label"] for r in labels] == expected


def test_findings_change_the_pixels_where_labelled(tmp_path):
    scene = Scene(160, 400, seed=2, fps=4.0, findings_per_1000=10, classes=("Bleeding",))
    f = scene.findings[0]
    mid = (f.start + f.end) // 2
    plain = Scene(160, 400, seed=2, fps=4.0, findings_per_1000=0)
    with_finding, without = scene.render(mid).astype(int), plain.render(mid).astype(int)
    assert scene.label(mid) == "Bleeding" and scene.label(f.end + 1) == "Normal"
    changed = np.abs(with_finding - without).sum(-1) > 30
    assert changed.mean() > 0.01  # a visible blob, not noise
    assert np.array_equal(scene.render(f.end + 1), plain.render(f.end + 1))


def test_deterministic_by_seed():
    a, b, c = (Scene(96, 50, seed=s, fps=4.0, findings_per_1000=40) for s in (7, 7, 8))
    assert all(np.array_equal(a.render(i), b.render(i)) for i in (0, 17, 49))
    assert a.findings == b.findings
    assert not np.array_equal(a.render(3), c.render(3))


def test_variable_frame_rate_timestamps(tmp_path):
    res = synthesize(tmp_path / "v.mp4", 60, size=96, vfr=True, seed=1)
    frames, pts = decode_all(res.path)
    assert len(frames) == 60
    gaps = np.diff(pts)
    assert np.all(gaps > 0) and gaps.max() > 2 * gaps.min()  # really variable
    csv_pts = [float(r["pts"]) for r in read_labels(res.labels_csv)]
    assert np.allclose(pts, csv_pts, atol=1.5e-3)


@pytest.mark.parametrize("name, codec, message", [
    ("x.mp4", "vp9", "codec vp9 is written to a .webm file"),
    ("x.mp4", "png", "writes a folder of frames"),
    ("x.mkv", "bogus", "unknown codec"),
])
def test_bad_codec_choices(tmp_path, name, codec, message):
    with pytest.raises(CapsuleError, match=message):
        synthesize(tmp_path / name, 5, codec=codec)


def test_cli_synth_json_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "rec.webm"
    runner = CliRunner()
    res = runner.invoke(cli, ["synth", "-o", str(out), "--frames", "24", "--size", "64", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["frames"] == 24 and Path(summary["labels"]).is_file()
    assert len(decode_all(out)[0]) == 24
    res = runner.invoke(cli, ["synth", "-o", str(out), "--frames", "24"])
    assert res.exit_code == 1 and "already exists" in res.output


def test_parallel_rendering_gives_the_same_frames(tmp_path):
    """`--workers` only changes who renders: the decoded frames are identical."""
    one = synthesize(tmp_path / "one", 300, codec="png", size=64, seed=4, stamp=True)
    two = synthesize(tmp_path / "two", 300, codec="png", size=64, seed=4, stamp=True, workers=2)
    a, b = decode_all(one.path)[0], decode_all(two.path)[0]
    assert len(a) == len(b) == 300 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert one.labels_csv.read_text() == two.labels_csv.read_text()
