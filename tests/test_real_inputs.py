"""Recordings as they come: containers written by FFmpeg's own libraries (through PyAV) and real capsule frames.

Checked against: frame numbers drawn into the pixels (`synth.draw_stamp`) and read back from what the run's source
yields and from what the review app serves (`/frame/N`); PyAV's sequential decode as the reference for real frames;
the real Kvasir-Capsule-SEG and WCEBleedGen files in ../shared/data/real (skipped where that folder is absent).
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import urllib.request
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw, ImageFont

from capsule_batch.cli import cli
from capsule_batch.model.preprocess import Preprocess, to_rgb
from capsule_batch.review.app import ReviewApp, Server
from capsule_batch.sources.base import open_source
from capsule_batch.sources.synthesize import draw_stamp, read_stamp
from capsule_batch.study.store import StudyReader

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
KVASIR = REAL / "kvasir_capsule_seg"
FRAMES = 40
SIZE = 96


def needs_real() -> None:
    if not KVASIR.is_dir():
        pytest.skip(f"the real capsule frames are not here ({REAL}: a checkout without ../shared/data)")


def write_video(path: Path, fmt: str, codec: str, *, bf: int = 0, offset: float = 0.0, vfr: bool = False,
                frames: int = FRAMES, images: list[np.ndarray] | None = None) -> Path:
    """A video written by FFmpeg's muxers and encoders (PyAV): frame i carries the number i in its pixels, or is
    `images[i]`. `offset`: the first timestamp in seconds; `vfr`: gaps of 1 and 2.5 frame periods."""
    tb = Fraction(1, 90000) if fmt == "mpegts" else Fraction(1, 1000)
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=30)
        s.width = s.height = SIZE if images is None else images[0].shape[1]
        if images is not None:
            s.height = images[0].shape[0]
        s.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec == "libx264":
            s.options = {"bf": str(bf), "g": "12", "preset": "veryfast", "crf": "12"}
        s.codec_context.time_base = tb
        t = offset
        for i in range(frames if images is None else len(images)):
            if images is None:
                img = np.full((SIZE, SIZE, 3), 110, np.uint8)
                draw_stamp(img, i)
            else:
                img = images[i]
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = int(round(t / tb)), tb
            for p in s.encode(f):
                c.mux(p)
            t += (2.5 if vfr and (i // 5) % 2 else 1.0) / 30
        for p in s.encode():
            c.mux(p)
    return path


#: name -> (file name, muxer, encoder, options): what recorders, converters and ffmpeg command lines write every day
CONTAINERS = {
    "mp4-bframes": ("a.mp4", "mp4", "libx264", {"bf": 3}),
    "mp4-start-10s": ("b.mp4", "mp4", "libx264", {"offset": 10.0}),
    "mkv-bframes-start-10s": ("c.mkv", "matroska", "libx264", {"bf": 2, "offset": 10.0}),
    "mpegts-start-1.4s": ("d.ts", "mpegts", "libx264", {"offset": 1.4}),
    "mpegts-bframes": ("e.ts", "mpegts", "libx264", {"bf": 2, "offset": 1.4}),
    "avi-mjpeg": ("f.avi", "avi", "mjpeg", {}),
    "mkv-vfr-bframes": ("g.mkv", "matroska", "libx264", {"bf": 2, "vfr": True}),
}


def seen_stamps(path: Path, source: str = "auto") -> tuple[list[int], list[int]]:
    """(frame numbers, numbers read from the pixels) of every frame a source yields, through the preprocessing."""
    pre = Preprocess(input_size=SIZE, resize=SIZE, crop="none", resize_mode="whole", mean=(0, 0, 0), std=(1, 1, 1))
    idx, got = [], []
    with open_source(path, pre, source=source, batch_size=16) as src:
        for b in src:
            assert not b.failures
            idx += [int(i) for i in b.index]
            got += [read_stamp(to_rgb(p, pre)) for p in b.pixels]
    return idx, got


def run_cli(*args: str) -> dict:
    """`capsule-batch run ... --json` in this process; the result of the one recording, with `log`: its stderr."""
    res = CliRunner().invoke(cli, ["run", *args, "--engine", "torch", "--precision", "fp32", "--json"])
    assert res.exit_code == 0, res.output
    (rec,) = json.loads(res.stdout.strip().splitlines()[-1])["recordings"]
    assert rec["status"] == "done", rec
    return {**rec, "log": res.stderr}


def fetch(srv: Server, path: str) -> bytes:
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}{path}", headers={"X-Token": srv.review.token})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


@pytest.mark.parametrize("name", list(CONTAINERS))
def test_every_frame_right_in_the_study_and_in_the_review(tmp_path: Path, tiny_bundle, name: str) -> None:
    """The run classifies frame N as frame N, and the review's `/frame/N` shows frame N, whatever the container,
    the stream's start time, B-frames or frame rate. Before: an MPEG-TS file with B-frames was read with 39 of 40
    frames wrong (decord), and the review showed frame 0 for every row of a clip starting at 10 s."""
    file, fmt, codec, opts = CONTAINERS[name]
    rec = write_video(tmp_path / file, fmt, codec, **opts)
    idx, got = seen_stamps(rec)
    assert idx == list(range(FRAMES)) and got == idx
    out = run_cli(str(rec), "-m", str(tiny_bundle.path), "-o", str(tmp_path / "out"))
    with StudyReader(out["output"]) as study:
        assert len(study) == FRAMES
        pts = study.pts()
        assert pts[0] == pytest.approx(0.0, abs=1e-6) and np.all(np.diff(pts) > 0)  # seconds from the first frame
        decoder = study.attrs.get("decoder", "")
    with Server(ReviewApp(out["output"], rec)) as srv:
        for n in [0, 1, 2, FRAMES // 2, 13, FRAMES - 1, 5, FRAMES - 2, 24]:  # forwards and backwards, across GOPs
            img = np.asarray(Image.open(io.BytesIO(fetch(srv, f"/frame/{n}"))).convert("RGB"))
            assert read_stamp(img) == n, f"{name}: /frame/{n} shows frame {read_stamp(img)}"
    assert decoder.startswith("pyav") == (fmt == "mpegts"), decoder


def test_the_pyav_source_reads_any_container_frame_exact_from_any_start(tmp_path: Path) -> None:
    rec = write_video(tmp_path / "k.ts", "mpegts", "libx264", bf=2, offset=1.4)
    pre = Preprocess(input_size=SIZE, resize=SIZE, crop="none", resize_mode="whole", mean=(0, 0, 0), std=(1, 1, 1))
    with open_source(rec, pre, source="pyav", batch_size=8, start=17) as src:
        assert src.info().extra["decoder"] == "pyav"
        idx = [int(i) for b in src for i in b.index]
    assert idx == list(range(17, FRAMES))
    assert seen_stamps(rec, "pyav")[1] == list(range(FRAMES))


def test_a_file_decord_stops_on_goes_on_with_pyav(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """decord failing part-way (here made to fail at its second batch) hands over to PyAV at that frame: every
    frame once, in order, and the switch named in one line and in the decoder attribute."""
    import decord

    rec = write_video(tmp_path / "a.mp4", "mp4", "libx264", bf=2)
    real = decord.VideoReader.get_batch
    calls = []

    def flaky(self, idx):  # noqa: ANN001
        calls.append(idx[0])
        if len(calls) == 2:
            raise decord.DECORDError("[x] Unable to handle EOF")
        return real(self, idx)

    monkeypatch.setattr(decord.VideoReader, "get_batch", flaky)
    pre = Preprocess(input_size=SIZE, resize=SIZE, crop="none", resize_mode="whole", mean=(0, 0, 0), std=(1, 1, 1))
    with open_source(rec, pre, source="decord", batch_size=16) as src:
        idx, got = [], []
        for b in src:
            assert not b.failures
            idx += [int(i) for i in b.index]
            got += [read_stamp(to_rgb(p, pre)) for p in b.pixels]
        assert src.info().extra["decoder"].startswith("decord to frame 15, then pyav: decord stopped at frame 16")
    assert idx == got == list(range(FRAMES))
    assert sum("decoding on from there with PyAV" in r.message for r in caplog.records) == 1


def test_a_file_neither_decoder_reads_fails_with_the_usual_error(tmp_path: Path, tiny_bundle) -> None:
    bad = tmp_path / "garbage.ts"
    bad.write_bytes(bytes(range(256)) * 64)
    res = CliRunner().invoke(cli, ["run", str(bad), "-m", str(tiny_bundle.path), "-o", str(tmp_path / "out"),
                                   "--engine", "torch", "--precision", "fp32", "--json"])
    assert res.exit_code == 1
    (rec,) = json.loads(res.stdout.strip().splitlines()[-1])["recordings"]
    assert rec["status"] == "failed" and "garbage.ts" in rec["error"]


# ---------------------------------------------------------------------------------------------------------------
# Real capsule frames (Kvasir-Capsule-SEG: 55 polyp frames of one Olympus video with their masks; WCEBleedGen)


def test_real_h264_remuxed_into_mpegts_shows_the_frames_the_model_saw(tmp_path: Path, tiny_bundle) -> None:
    """The real Kvasir clip's H.264 packets copied into MPEG-TS (the clock starting at 1.4 s, as ffmpeg writes TS):
    the review's frame N is the real frame N (PyAV's sequential decode of the original MP4 is the reference)."""
    needs_real()
    src = REAL / "derived" / "kvasir_capsule_131368cc17e44240_28955-28987_h264.mp4"
    ts = tmp_path / "kvasir.ts"
    with av.open(str(src)) as inp, av.open(str(ts), "w", format="mpegts") as out:
        s_in = inp.streams.video[0]
        s_out = out.add_stream_from_template(s_in)
        shift = int(round(1.4 / s_in.time_base))
        for pkt in inp.demux(s_in):
            if pkt.dts is None:
                continue
            pkt.pts, pkt.dts = pkt.pts + shift, pkt.dts + shift
            pkt.stream = s_out
            out.mux(pkt)
    with av.open(str(src)) as c:
        ref = [f.to_ndarray(format="rgb24").astype(np.float32) for f in c.decode(video=0)]
    out = run_cli(str(ts), "-m", str(tiny_bundle.path), "-o", str(tmp_path / "out"))
    assert out["frames"] == len(ref) == 33
    with Server(ReviewApp(out["output"], ts)) as srv:
        for n in [0, 32, 16, 1, 31, 8]:
            img = np.asarray(Image.open(io.BytesIO(fetch(srv, f"/frame/{n}"))).convert("RGB"), np.float32)
            errs = [float(np.abs(img - r).mean()) for r in ref]
            assert int(np.argmin(errs)) == n and errs[n] < 3.0, (n, errs[n], int(np.argmin(errs)))


def real_folder(tmp_path: Path, n: int = 55) -> Path:
    """The Kvasir frames as an export gives them: masks beside the images, a CSV, some frames as BMP."""
    folder = tmp_path / "export"
    folder.mkdir()
    names = sorted(p.name for p in (KVASIR / "images").iterdir())[:n]
    for k, name in enumerate(names):
        if k % 11 == 5:  # 5 of 55 frames as BMP
            Image.open(KVASIR / "images" / name).save(folder / name.replace(".jpg", ".bmp"))
        else:
            shutil.copy(KVASIR / "images" / name, folder / name)
        if k < 4:
            shutil.copy(KVASIR / "masks" / name, folder / name.replace(".jpg", "_mask.jpg"))
    (folder / "labels.csv").write_text("frame,label\n", encoding="utf-8")
    return folder


def test_a_real_frame_folder_every_frame_named_nothing_mixed_in(tmp_path: Path, tiny_bundle) -> None:
    """Before: BMP frames were skipped without a word (5 of 55), mask images were classified as frames, rows had no
    file names. Now: all 55 frames, in natural order, each row named; masks left out and the CSV skipped, each
    said in one line."""
    needs_real()
    folder = real_folder(tmp_path)
    out = run_cli(str(folder), "-m", str(tiny_bundle.path), "-o", str(tmp_path / "out"))
    assert out["frames"] == 55
    with StudyReader(out["output"]) as study:
        names = study.files()
        attrs = study.attrs
    want = sorted(p.name for p in folder.iterdir() if p.suffix in (".jpg", ".bmp") and "_mask" not in p.name)
    assert names == want and len([n for n in names if n.endswith(".bmp")]) == 5
    assert attrs["frames_excluded"] == 4 and attrs["files_skipped"] == 1 and attrs["codec"] == "bmp+jpg"
    msgs = out["log"].splitlines()
    assert sum("1 file(s) skipped" in m and "labels.csv" in m for m in msgs) == 1
    assert sum("4 file(s) left out as masks" in m for m in msgs) == 1
    res = CliRunner().invoke(cli, ["export", out["output"], "-o", str(tmp_path / "exp")])
    assert res.exit_code == 0, res.output
    with open(tmp_path / "exp" / "frames.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["file"] for r in rows] == want and all(r["pts"] == "" for r in rows)  # no frame rate: no times
    with open(tmp_path / "exp" / "events.csv", newline="", encoding="utf-8") as fh:
        events = list(csv.DictReader(fh))
    assert events and all(e["start_s"] == "" and e["peak_file"] in want for e in events)
    with Server(ReviewApp(out["output"], folder)) as srv:  # the review names and shows the frames by their files
        for n in [0, 5, 54]:
            img = np.asarray(Image.open(io.BytesIO(fetch(srv, f"/frame/{n}"))).convert("RGB"), np.float32)
            ref = np.asarray(Image.open(folder / want[n]).convert("RGB"), np.float32)
            assert np.abs(img - ref).mean() < 3.0
        detail = json.loads(fetch(srv, "/api/events/0"))
        assert detail["time"] is None and detail["peak_file"] in want
        assert detail["files"][str(detail["peak_frame"])] == detail["peak_file"]


def test_a_folder_frame_rate_gives_times_and_none_are_invented_without_it(tmp_path: Path, tiny_bundle) -> None:
    """Before: a folder study had fps 0 and NaN times, yet the report labelled events 0:00:01, 0:00:29 (frame / 1)."""
    needs_real()
    folder = tmp_path / "f"
    shutil.copytree(KVASIR / "images", folder)
    timed = run_cli(str(folder), "-m", str(tiny_bundle.path), "-o", str(tmp_path / "a"), "--fps", "2")
    with StudyReader(timed["output"]) as s:
        assert s.attrs["fps"] == 2.0 and np.allclose(s.pts(), np.arange(55) / 2)
    plain = run_cli(str(folder), "-m", str(tiny_bundle.path), "-o", str(tmp_path / "b"))
    html_path = tmp_path / "b.html"
    assert CliRunner().invoke(cli, ["report", plain["output"], "-o", str(html_path)]).exit_code == 0
    html = html_path.read_text(encoding="utf-8")
    # no recording time anywhere (the reading estimate is a time a reader needs, not a time in the recording)
    assert not re.findall(r"frames \d+–\d+ · \d:\d\d:\d\d", html) and "<th>Duration</th><td></td>" in html
    assert "<span>0:00" not in html  # the timeline's axis
    assert "peak file <code class=\"file\">131368cc17e44240_" in html  # the peak frames' file names instead
    timed_html = tmp_path / "a.html"
    assert CliRunner().invoke(cli, ["report", timed["output"], "-o", str(timed_html)]).exit_code == 0
    assert re.findall(r"frames \d+–\d+ · \d:\d\d:\d\d", timed_html.read_text(encoding="utf-8"))


def test_mixed_frame_sizes_are_recorded_and_warned_about(tmp_path: Path, tiny_bundle) -> None:
    needs_real()
    folder = tmp_path / "mixed"
    folder.mkdir()
    for k, p in enumerate(sorted((KVASIR / "images").iterdir())[:6]):
        shutil.copy(p, folder / f"f{k:02d}.jpg")
    for k, p in enumerate(sorted((REAL / "wcebleedgen" / "val").glob("*.png"))[:4], start=6):
        shutil.copy(p, folder / f"f{k:02d}.png")
    out = run_cli(str(folder), "-m", str(tiny_bundle.path), "-o", str(tmp_path / "out"))
    with StudyReader(out["output"]) as s:
        assert s.attrs["frame_sizes"] == [[0, 336, 336], [6, 224, 224]]
    assert out["log"].count("frames of different sizes") == 1


def test_train_predict_lists_frames_as_run_does(tmp_path: Path, tiny_bundle) -> None:
    """Before: `train predict` recursed into masks/ and wrote each name twice, which `train score` refused."""
    needs_real()
    from train.__main__ import main

    layout = tmp_path / "kvasir"
    shutil.copytree(KVASIR, layout)  # images/ and masks/ with the same file names, plus train.txt / val.txt
    out = tmp_path / "pred.xlsx"
    assert main(["predict", f"predict.bundle={tiny_bundle.path}", f"predict.images={layout}", f"predict.out={out}",
                 "run.device=cpu"]) == 0
    import openpyxl

    rows = list(openpyxl.load_workbook(out).active.iter_rows(values_only=True))[1:]
    assert sorted(r[0] for r in rows) == sorted(p.name for p in (KVASIR / "images").iterdir())


# ---------------------------------------------------------------------------------------------------------------
# The field of view


def pillcam_like(frame: Path, size: int = 576) -> np.ndarray:
    """A PillCam-style export made from a real frame: the lens image in a circle on a black canvas, with a clock,
    a date and the device's name burned in around it."""
    lens = size * 8 // 9
    src = Image.open(frame).convert("RGB").resize((lens, lens), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size))
    mask = Image.new("L", (lens, lens))
    ImageDraw.Draw(mask).ellipse((0, 0, lens - 1, lens - 1), fill=255)
    off = (size - lens) // 2
    canvas.paste(src, (off, off), mask)
    d = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=size // 32)
    d.text((8, 6), "03:12:45", fill=(255, 255, 255), font=font)
    d.text((size - size // 6, 6), "12/03/2026", fill=(255, 255, 255), font=font)
    d.text((8, size - size // 24), "PillCam COLON2", fill=(230, 230, 230), font=font)
    return np.asarray(canvas)


def test_field_of_view_crops_to_the_lens_in_inference_and_training(tmp_path: Path) -> None:
    import dataclasses

    import torch

    from capsule_batch.model.fov import crop_to_fov
    from capsule_batch.model.preprocess import preprocess_batch, reference_preprocess, seed_preprocess
    from train.transforms import TrainTransform

    needs_real()
    img = pillcam_like(KVASIR / "images" / "131368cc17e44240_28960.jpg")
    crop = crop_to_fov(img)
    lens = 576 * 8 // 9
    assert abs(crop.shape[0] - lens) <= 12 and abs(crop.shape[1] - lens) <= 12  # the lens, not the canvas
    corner = crop[: crop.shape[0] // 8, : crop.shape[1] // 8]
    assert corner.max() == 0  # outside the lens circle: black, the burned-in clock gone
    full, fov = seed_preprocess(), dataclasses.replace(seed_preprocess(), field_of_view="fov")
    sees_full, sees_fov = to_rgb(reference_preprocess(img, full), full), to_rgb(reference_preprocess(img, fov), fov)
    assert (sees_full[:12, :40].max(-1) > 200).any() and sees_fov[:12, :40].max() == 0  # text in full, not in fov
    assert (sees_fov.max(-1) < 10).mean() < (sees_full.max(-1) < 10).mean() - 0.1  # less of the input is border
    batch = preprocess_batch(torch.from_numpy(np.stack([img, img[::-1].copy()])), fov)
    assert torch.allclose(batch[0], torch.from_numpy(reference_preprocess(img, fov)), atol=0.02)  # one uint8 level
    # training starts from the same crop: with every augmentation off, the clock never reaches the model
    aug = {"hflip": 0, "vflip": 0, "rot90": 0, "blur_kernel": [0, 0], "blur_p": 0, "crop_scale": [1.0, 1.0],
           "grid_steps": 3, "grid_limit": 0.0, "grid_distortion_p": 0, "brightness": 0, "contrast": 0,
           "saturation": 0, "hue": 0, "color_jitter_p": 0}
    x = TrainTransform(fov, aug)(Image.fromarray(img))
    seen = to_rgb(x, fov)
    assert seen[:12, :40].max() == 0
    # a frame with no border (Kvasir's own 336x336 frames, black octagon corners) is the whole frame
    k = np.asarray(Image.open(KVASIR / "images" / "131368cc17e44240_28960.jpg").convert("RGB"))
    assert crop_to_fov(k).shape == k.shape


def test_a_bundle_states_its_field_of_view_and_old_bundles_read_as_full(tmp_path: Path) -> None:
    from capsule_batch.errors import BundleError

    assert Preprocess.from_dict({"input_size": 224, "resize": 224}).field_of_view == "full"
    p = Preprocess.from_dict({"input_size": 224, "resize": 224, "field_of_view": "fov"})
    assert p.field_of_view == "fov" and p.to_dict()["field_of_view"] == "fov"
    assert "field_of_view" not in Preprocess().to_dict()  # full is written as before the setting existed
    assert "field of view" in p.describe()
    with pytest.raises(BundleError, match="field_of_view"):
        Preprocess.from_dict({"field_of_view": "lens"})


def test_report_and_review_of_a_pillcam_like_export(tmp_path: Path, tiny_bundle) -> None:
    """Screenshots of the report and the review app for a PillCam-like frame folder: the frames keep their whole
    picture (border and overlay included: what a reader expects), unstretched, with their file names."""
    from review_browser import chromium, wait_images_loaded

    needs_real()
    folder = tmp_path / "pillcam"
    folder.mkdir()
    for k, p in enumerate(sorted((KVASIR / "images").iterdir())[:12]):
        Image.fromarray(pillcam_like(p, 288)).save(folder / f"PillCam_{k:04d}.jpg", quality=92)
    out = run_cli(str(folder), "-m", str(tiny_bundle.path), "-o", str(tmp_path / "out"), "--fps", "4")
    report = tmp_path / "r.html"
    assert CliRunner().invoke(cli, ["report", out["output"], "-o", str(report)]).exit_code == 0
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(report.as_uri())
        assert wait_images_loaded(page, "article.event .thumbs img") >= 1
        img = page.locator("article.event .thumbs img").first
        box = img.bounding_box()
        assert abs(box["width"] - box["height"]) <= 2  # square frames stay square
        assert "PillCam_" in page.text_content("article.event")
        page.screenshot(path=str(tmp_path / "report.png"))
        shot = np.asarray(Image.open(tmp_path / "report.png").convert("RGB"))
        assert shot.std() > 10  # something was drawn
        with Server(ReviewApp(out["output"], folder)) as srv:
            page.goto(f"http://127.0.0.1:{srv.port}/?token={srv.review.token}")
            page.click("li[data-id='0']")
            page.wait_for_selector("#event:not([hidden])", timeout=20000)
            assert wait_images_loaded(page, "#peak") == 1
            assert "PillCam_" in page.text_content("#peak-caption")
            nat = page.evaluate("() => [document.querySelector('#peak').naturalWidth, "
                                "document.querySelector('#peak').naturalHeight]")
            assert nat == [288, 288]  # the recording's own frame, full size
            page.screenshot(path=str(tmp_path / "review.png"))


def test_inputs_are_checked_before_the_model_loads(tmp_path: Path, tiny_bundle) -> None:
    """A missing file, a text file named .mp4 or an unwritable output folder: one line each, before the bundle and
    engine load (here the bundle folder is empty: loading it would be the error), nothing created; a folder of
    videos runs each video."""
    not_loaded = tmp_path / "not_a_bundle"
    not_loaded.mkdir()
    (tmp_path / "notes.mp4").write_text("a text file\n")
    for rec, why in ((tmp_path / "nosuch.mp4", "no such file or folder"),
                     (tmp_path / "notes.mp4", "not a readable video")):
        res = CliRunner().invoke(cli, ["run", str(rec), "-m", str(not_loaded), "-o", str(tmp_path / "out")])
        assert res.exit_code == 1, res.output
        lines = [ln for ln in res.stderr.splitlines() if why in ln]
        assert len(lines) == 1 and lines[0].count(rec.name) == 1, res.stderr  # the name once
        assert "bundle" not in res.stderr and not (tmp_path / "out").exists()
    res = CliRunner().invoke(cli, ["run", str(tmp_path / "notes.mp4"), "-m", str(not_loaded), "-o",
                                   str(tmp_path / "notes.mp4" / "out")])  # under a file: no folder can be made
    assert res.exit_code == 1 and "notes.mp4 is not a folder" in res.output and "bundle" not in res.output
    vids = tmp_path / "videos"
    vids.mkdir()
    for k in range(2):
        write_video(vids / f"v{k}.mp4", "mp4", "libx264", frames=8)
    out = CliRunner().invoke(cli, ["run", str(vids), "-m", str(tiny_bundle.path), "-o", str(tmp_path / "o2"),
                                   "--engine", "torch", "--precision", "fp32", "--json", "--no-isolate"])
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in (tmp_path / "o2").glob("*.h5")) == ["v0.h5", "v1.h5"]
