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
from capsule_batch.sources.synthesize import FINDING_CLASSES, Scene, Style, read_stamp, synthesize


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


def test_styles_change_the_look_but_not_the_findings():
    """A style is another camera on the same scene: same findings on the same frames, a measurable shift."""
    base = Scene(96, 120, seed=3, fps=4.0, findings_per_1000=30)
    assert Scene(96, 120, seed=3, fps=4.0, findings_per_1000=30, style=Style()).render(40).tobytes() == \
        base.render(40).tobytes()

    def styled(**kw: object) -> Scene:
        return Scene(96, 120, seed=3, fps=4.0, findings_per_1000=30, style=Style(**kw))  # type: ignore[arg-type]

    frames = (0, 40, 77)
    ref = np.stack([base.render(i) for i in frames]).astype(np.float64)
    fov = base.vignette[..., 0] > 0.5  # the lit centre, away from the black border
    dim = np.stack([styled(lighting=0.5).render(i) for i in frames]).astype(np.float64)
    assert dim[:, fov].mean() / ref[:, fov].mean() == pytest.approx(0.5, abs=0.01)
    cast = np.stack([styled(color_cast=(1.0, 1.2, 0.8)).render(i) for i in frames]).astype(np.float64)
    ratios = cast[:, fov].mean((0, 1)) / ref[:, fov].mean((0, 1))
    assert ratios == pytest.approx([1.0, 1.2, 0.8], abs=0.01)

    def edge_to_centre(img: np.ndarray) -> float:
        yy, xx = np.mgrid[0:96, 0:96]
        r = np.hypot(xx - 47.5, yy - 47.5) / 48
        return img[(r > 0.8) & (r < 0.95)].mean() / img[r < 0.3].mean()

    plain, strong, none = (edge_to_centre(s.render(40).astype(np.float64))
                           for s in (base, styled(vignette=2.0), styled(vignette=0.0)))
    assert strong < plain - 0.1 and none > plain + 0.1 and none > 0.85

    def roughness(scene: Scene) -> float:  # mean horizontal pixel difference in the field of view
        img = scene.render(0).astype(np.float64).mean(-1)
        return float(np.abs(np.diff(img, axis=1))[fov[:, 1:] & fov[:, :-1]].mean())

    # without vignetting (its gradient would dominate), a 3x magnified texture is much smoother
    assert roughness(styled(texture_scale=3.0, vignette=0.0)) < 0.5 * roughness(styled(vignette=0.0))
    for scene in (styled(lighting=0.5), styled(texture_scale=3.0), styled(color_cast=(0.9, 1.1, 1.1), vignette=2)):
        assert scene.findings == base.findings
        assert [scene.label(i) for i in range(120)] == [base.label(i) for i in range(120)]


def test_magnified_texture_keeps_each_finding_where_the_camera_sees_it():
    style = Style(texture_scale=2.0)
    scene = Scene(128, 400, seed=2, fps=4.0, findings_per_1000=10, classes=("Bleeding",), style=style)
    plain = Scene(128, 400, seed=2, fps=4.0, findings_per_1000=0, style=style)
    f = scene.findings[0]
    mid = (f.start + f.end) // 2
    changed = np.abs(scene.render(mid).astype(int) - plain.render(mid).astype(int)).sum(-1) > 30
    ys, xs = np.nonzero(changed)
    ox, oy = (int(v) % scene.tex_size for v in scene.path[mid])
    # at its middle frame a finding lies near the centre, offset by its texture offset magnified twice
    expect = (64 + 2 * (f.tx - ox - 64), 64 + 2 * (f.ty - oy - 64))
    assert changed.mean() > 0.01
    assert abs(xs.mean() - expect[0]) < 8 and abs(ys.mean() - expect[1]) < 8


def test_cli_synth_style_options(tmp_path):
    runner = CliRunner()
    out = tmp_path / "t.mp4"
    res = runner.invoke(cli, ["synth", "-o", str(out), "--frames", "12", "--size", "64", "--seed", "1", "--json",
                              "--lighting", "0.7", "--color-cast", "0.9,1.1,1.1", "--texture-scale", "2",
                              "--vignette", "1.5"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["style"] == {"lighting": 0.7, "color_cast": [0.9, 1.1, 1.1], "texture_scale": 2.0,
                                "vignette": 1.5}
    plain = synthesize(tmp_path / "p.mp4", 12, size=64, seed=1)
    assert out.read_bytes() != plain.path.read_bytes()
    assert (tmp_path / "t.labels.csv").read_text() == plain.labels_csv.read_text()
    res = runner.invoke(cli, ["synth", "-o", str(tmp_path / "x.mp4"), "--frames", "4", "--color-cast", "1,2"])
    assert res.exit_code == 2 and "expected three numbers R,G,B" in res.output
    res = runner.invoke(cli, ["synth", "-o", str(tmp_path / "x.mp4"), "--frames", "4", "--color-cast", "1,1,9"])
    assert res.exit_code == 1 and "color cast must be three gains" in res.output
