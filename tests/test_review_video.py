"""`--video`: full-resolution frames from the recording, frame-exact (stamped synthetic videos), and the
`review` command's start-up and shutdown."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import av
import h5py
import numpy as np
import pytest
from PIL import Image
from review_studies import make_study

from capsule_batch.errors import SourceError
from capsule_batch.review.app import ReviewApp, Server
from capsule_batch.review.frames import VideoFrames
from capsule_batch.sources.synthesize import read_stamp, synthesize
from capsule_batch.study.decisions import read_decisions

ROOT = Path(__file__).resolve().parents[1]


def video_pts(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return np.array(sorted(float(f.pts * s.time_base) for f in c.decode(s)))


@pytest.mark.parametrize("codec, vfr", [("h264", False), ("h264", True), ("vp9", False)])
def test_frames_are_exact(tmp_path: Path, codec: str, vfr: bool) -> None:
    rec = synthesize(tmp_path / f"rec.{'webm' if codec == 'vp9' else 'mp4'}", 90, codec=codec, size=96, stamp=True,
                     vfr=vfr, findings_per_1000=0).path
    pts = video_pts(rec)
    assert len(pts) == 90
    frames = VideoFrames(rec)
    try:
        for i in [0, 89, 45, 46, 44, 7, 88, 1, 60, 30]:  # backwards and forwards, across keyframes
            img = np.asarray(Image.open(io.BytesIO(frames.jpeg(i))).convert("RGB"))
            assert img.shape == (96, 96, 3)
            assert read_stamp(img) == i
    finally:
        frames.close()


def test_app_serves_recording_frames(tmp_path: Path) -> None:
    rec = synthesize(tmp_path / "rec.mp4", 120, codec="h264", size=128, stamp=True, findings_per_1000=0).path
    pts = video_pts(rec)
    study = make_study(tmp_path / "s.h5", n=120, runs=[(30, 40, 1, 0.9)], pts=pts, failed=(7,), recording=rec)
    with Server(ReviewApp(study, rec)) as srv:
        req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/frame/7", headers={"X-Token": srv.review.token})
        with pytest.raises(urllib.error.HTTPError) as e:  # failed during the run: no stand-in from its neighbours
            urllib.request.urlopen(req, timeout=20)
        assert e.value.code == 404
        for i in (35, 3, 119):
            req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/frame/{i}",
                                         headers={"X-Token": srv.review.token})
            img = np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(req, timeout=20).read())).convert("RGB"))
            assert img.shape == (128, 128, 3) and read_stamp(img) == i


def test_a_recording_other_than_the_studys_is_refused(tmp_path: Path) -> None:
    """Frames of a re-encoded or different recording are not what the model saw: refused, naming both files."""
    rec = synthesize(tmp_path / "rec.mp4", 30, size=64, stamp=True, findings_per_1000=0).path
    other = synthesize(tmp_path / "other.mp4", 30, size=64, stamp=True, seed=1, findings_per_1000=0).path
    study = make_study(tmp_path / "s.h5", n=30, runs=[(10, 15, 1, 0.9)], pts=video_pts(rec), recording=rec)
    with pytest.raises(SourceError, match=f"{other}: not the recording this study was made from \\({rec}\\)"):
        ReviewApp(study, other)
    ReviewApp(study, rec).close()  # the lock of the refused attempt was released
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "capsule_batch", "review", str(study), "--video", str(other),
                        "--no-browser"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "not the recording this study was made from" in r.stderr, r.stderr


@pytest.mark.cpu_choice
def test_a_frame_folder_study_shows_its_frames(tmp_path: Path, tiny_bundle: object) -> None:
    """A study `run` made from a frame folder: `--video FOLDER` serves frame i from the i-th file (natural order:
    f_2 before f_10), full resolution; a file that went missing since gives 404, not another frame."""
    from conftest import ENGINE, cli_cmd, cli_env

    rec = synthesize(tmp_path / "rec.mp4", 24, size=80, stamp=True, findings_per_1000=0).path
    folder = tmp_path / "frames"
    folder.mkdir()
    with av.open(str(rec)) as c:
        for i, f in enumerate(c.decode(video=0)):
            f.to_image().save(folder / f"f_{i}.png")
    r = subprocess.run(cli_cmd("run", str(folder), "-m", str(tiny_bundle.path), "-o", str(tmp_path / "out"),
                               "--engine", ENGINE, "--source", "images", "--device", "cpu", "--batch-size", "8"),
                       capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    study = tmp_path / "out" / f"{tmp_path.name}_frames.h5"  # `frames` says nothing: the parent's name leads
    with Server(ReviewApp(study, folder)) as srv:
        def get(i: int) -> bytes:
            url = f"http://127.0.0.1:{srv.port}/frame/{i}"
            req = urllib.request.Request(url, headers={"X-Token": srv.review.token})
            return urllib.request.urlopen(req, timeout=20).read()

        for i in (0, 2, 10, 23, 11):
            img = np.asarray(Image.open(io.BytesIO(get(i))).convert("RGB"))
            assert img.shape == (80, 80, 3) and read_stamp(img) == i
        (folder / "f_5.png").unlink()
        with pytest.raises(urllib.error.HTTPError) as e:
            get(5)
        assert e.value.code == 404


@pytest.mark.parametrize(("sig", "to_a_thread"), [(signal.SIGINT, False), (signal.SIGTERM, False),
                                                  (signal.SIGINT, True)])
def test_review_command_prints_a_tokened_url_and_saves_on_exit(tmp_path: Path, sig: int, to_a_thread: bool) -> None:
    """`to_a_thread`: the signal reaches the server thread, not the main one (the kernel picks any thread for a
    signal sent to a process; CI once hung here for 30 s when the main thread waited without a timeout)."""
    from conftest import signal_other_thread

    study = make_study(tmp_path / "s.h5", n=100, runs=[(10, 20, 1, 0.9)])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "capsule_batch", "review", str(study), "--no-browser",
                          "--reviewer", "cli"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:(\d+)/)\?token=(\S+)", line)
        assert m, line
        base, token = m.group(1), m.group(3)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base, timeout=10)
        assert e.value.code == 403
        assert urllib.request.urlopen(f"{base}?token={token}", timeout=10).status == 200
        req = urllib.request.Request(f"{base}api/events/0/decision", data=b'{"verdict": "confirm"}', method="POST",
                                     headers={"X-Token": token, "Content-Type": "application/json"})
        assert urllib.request.urlopen(req, timeout=10).status == 200
    finally:
        if to_a_thread:
            signal_other_thread(p.pid, sig)
        else:
            p.send_signal(sig)
        out, err = p.communicate(timeout=60)  # past 30 s of shutdown the command dumps its threads and ends
    assert p.returncode == 0, err
    d = read_decisions(study)
    assert d[0].verdict == "confirm" and d[0].reviewer == "cli"
    with h5py.File(study, "r") as f:
        assert len(f["review/decisions"]) == 1


@pytest.mark.cpu_choice
def test_a_study_from_run_opens_with_its_recording(tmp_path: Path, tiny_bundle: object) -> None:
    """A study written by the real `run` pipeline: the app pages its events, `--video` frames match the stored
    timestamps frame-exactly (stamped recording), and the report embeds its thumbnails."""
    from conftest import ENGINE, SOURCE, cli_cmd, cli_env

    from capsule_batch.review.report import build_report

    rec = synthesize(tmp_path / "rec.mp4", 80, size=64, stamp=True, findings_per_1000=40.0, vfr=True).path
    r = subprocess.run(cli_cmd("run", str(rec), "-m", str(tiny_bundle.path), "-o", str(tmp_path / "out"),
                               "--engine", ENGINE, "--source", SOURCE, "--device", "cpu", "--batch-size", "8"),
                       capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    study = tmp_path / "out" / "rec.h5"
    with Server(ReviewApp(study, rec)) as srv:
        view = srv.review.view
        assert view.n_frames == 80 and len(view.events) > 0
        tok = {"X-Token": srv.review.token}
        req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/api/events?sort=score", headers=tok)
        assert json.loads(urllib.request.urlopen(req, timeout=20).read())["total"] == len(view.events)
        for i in (view.events[0].peak_frame, 0, 79, 40):
            req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/frame/{i}", headers=tok)
            img = np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(req, timeout=20).read())).convert("RGB"))
            assert read_stamp(img) == i
    html = build_report(study)
    assert html.count('<article class="event') == len(view.events)
    assert html.count("data:image/jpeg") >= len(view.events)
