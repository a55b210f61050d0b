"""The one runner (`run_recordings`): a recording given as a FrameSource object, and how a recording that stops early
(a truncated file, through the real decord source and through a test double) and one that yields nothing end."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from conftest import TINY_SIZE
from PIL import Image

from capsule_batch.model.preprocess import to_rgb
from capsule_batch.run.pipeline import RunOptions
from capsule_batch.run.runner import EngineSpec, run_recordings
from capsule_batch.sources.base import DecodeFailure, FrameBatch, FrameSource, RecordingInfo, to_pixels
from capsule_batch.sources.decord_source import DecordSource
from capsule_batch.sources.synthesize import Scene, synthesize
from capsule_batch.study.schema import STATUS_OK
from capsule_batch.study.store import StudyReader, partial_path

CPU = EngineSpec("torch", "cpu", "fp32")


def opts(**kw: Any) -> RunOptions:
    d: dict[str, Any] = {"source": "decord", "batch_size": 16, "block_frames": 32, "probs_dtype": "float32",
                         "progress": False}
    d.update(kw)
    return RunOptions(**d)


class FramesInMemory(FrameSource):
    """Frames held in an array: a source that no registry knows, handed to the runner as an object."""

    name = "in-memory"

    def __init__(self, path: str | Path, preprocess: Any, *, frames: np.ndarray, **kw: Any):
        super().__init__(path, preprocess, **kw)
        self.frames = frames

    def info(self) -> RecordingInfo:
        n, h, w, _ = self.frames.shape
        return RecordingInfo(self.path, "video", n, 4.0, w, h, "memory")

    def __iter__(self) -> Iterator[FrameBatch]:
        for lo in range(self.start, len(self.frames), self.batch_size):
            idx = np.arange(lo, min(lo + self.batch_size, len(self.frames)), dtype=np.int64)
            yield FrameBatch(to_pixels(self.frames[idx], self.preprocess, self.device, self.dtype), idx, idx / 4.0)


def test_a_frame_source_object_runs_resumes_and_gets_thumbnails(tmp_path: Path, tiny_bundle: Any) -> None:
    scene = Scene(TINY_SIZE * 2, 100, 5, 4.0, 60.0)
    frames = np.stack([scene.render(i) for i in range(100)])
    pre = tiny_bundle.preprocess
    model = tiny_bundle.create_model()
    with torch.inference_mode():
        ref = torch.softmax(model(to_pixels(frames, pre, "cpu", None)), 1).numpy()
    src = FramesInMemory(tmp_path / "in-memory", pre, frames=frames, batch_size=16)

    stop = threading.Event()
    calls = {"n": 0}

    class StopAfter3:
        """The engine, setting `stop` after its third call (as SIGINT would)."""

        def __init__(self, inner: Any):
            self.inner = inner

        def __getattr__(self, k: str) -> Any:
            return getattr(self.inner, k)

        def infer(self, x: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 3:
                stop.set()
            return self.inner.infer(x)

    engine = CPU.build(tiny_bundle, 16)
    first = run_recordings([src], tiny_bundle, tmp_path / "out", engine=StopAfter3(engine), options=opts(),
                           stop=stop).results[0]
    assert first.status == "interrupted" and 0 < first.frames < 100
    again = FramesInMemory(tmp_path / "in-memory", pre, frames=frames, batch_size=16)
    res = run_recordings([again], tiny_bundle, tmp_path / "out", engine=engine, options=opts()).results[0]
    assert res.status == "done", res.error
    assert res.resumed_from == first.frames and res.frames == 100  # the object was reopened at the first new frame
    assert Path(res.output).name == "in-memory.h5"
    with StudyReader(res.output) as rd:
        assert rd.index().tolist() == list(range(100)) and (rd.status() == STATUS_OK).all()
        np.testing.assert_allclose(rd.probs(), ref, atol=1e-5, rtol=0)
        assert rd.attrs["source"] == "in-memory" and rd.attrs["codec"] == "memory" and rd.attrs["resumed"] == 1
        thumbs = rd.thumbs()
    assert thumbs  # decoded again through reopen(start=frame)
    shown = to_pixels(frames, pre, "cpu", None)
    for t in thumbs:
        img = np.asarray(Image.open(BytesIO(t.jpeg)), np.float32)
        dist = [np.abs(img - to_rgb(shown[f], pre)).mean() for f in range(100)]
        assert int(np.argmin(dist)) == t.frame


# ---------------------------------------------------------------------------------------------------------------
# A recording whose decoding stops early: the frames before the stop are the study, the reason is kept

def faststart(src: Path, dst: Path) -> None:
    """Remux with the index at the front, as a recorder streaming to disk writes it (a cut file keeps its index)."""
    with av.open(str(src)) as i, av.open(str(dst), "w", options={"movflags": "faststart"}) as o:
        s = i.streams.video[0]
        out = o.add_stream_from_template(s)
        for p in i.demux(s):
            if p.dts is not None:
                p.stream = out
                o.mux(p)


def mdat_offset(path: Path) -> int:
    """Byte offset of the first frame data: the payload of the top-level `mdat` box."""
    data, at = path.read_bytes(), 0
    while at < len(data):
        size, kind = int.from_bytes(data[at:at + 4], "big"), data[at + 4:at + 8]
        if kind == b"mdat":
            return at + 8
        at += size
    raise AssertionError(f"{path}: no mdat box")


def decodable_frames(path: Path) -> int:
    """Frames PyAV decodes from a damaged file before it gives up: the truth the study must hold."""
    n = 0
    try:
        with av.open(str(path)) as c:
            for _ in c.decode(video=0):
                n += 1
    except av.FFmpegError:
        pass
    return n


@pytest.fixture(scope="module")
def h264_240(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cut")
    rec = synthesize(d / "raw.mp4", 240, size=TINY_SIZE * 2, seed=4, findings_per_1000=30.0).path
    faststart(rec, d / "full.mp4")
    return d / "full.mp4"


def cut(full: Path, size: int, out: Path) -> Path:
    out.write_bytes(full.read_bytes()[:size])
    return out


def test_a_truncated_h264_file_through_decord_keeps_the_frames_before_the_cut(
        tmp_path: Path, h264_240: Path, tiny_bundle: Any, caplog: pytest.LogCaptureFixture) -> None:
    rec = cut(h264_240, int(h264_240.stat().st_size * 0.45), tmp_path / "cut.mp4")
    want = decodable_frames(rec)
    assert 0 < want < 240
    with caplog.at_level(logging.INFO):
        res = run_recordings([rec], tiny_bundle, tmp_path / "out", engine=CPU, options=opts()).results[0]
    assert res.status == "done", res.error
    assert res.frames == want and res.decode_failures == 0
    with StudyReader(res.output) as rd:
        assert len(rd) == want and rd.index().tolist() == list(range(want))
        assert (rd.status() == STATUS_OK).all() and np.isfinite(rd.probs()).all()  # no spurious failed row
        a = rd.attrs
    assert "decoding stopped" in a["decode_tail_failure"] and a["decode_failures"] == 0
    assert a["container_frame_count"] == 240
    text = caplog.text
    assert f"decoding stopped after frame {want - 1}: {a['decode_tail_failure']}" in text
    assert f"the container claims 240 frames, {want} were decoded" in text
    assert "could not be decoded" not in text


class StopsAt(DecordSource):
    """The real decord source, made to stop after frame `at` - 1 with `DecodeFailure(at, ..., final=True)`: alone in
    an empty batch (as the contract has it) or riding with the last frames."""

    def __init__(self, path: str | Path, preprocess: Any, *, at: int, alone: bool, **kw: Any):
        super().__init__(path, preprocess, **kw)
        self.at, self.alone = at, alone

    def __iter__(self) -> Iterator[FrameBatch]:
        final = DecodeFailure(self.at, "the disk returned an I/O error", final=True)
        for b in super().__iter__():
            keep = b.index < self.at
            if keep.all():
                yield b
                continue
            last = FrameBatch(b.pixels[torch.from_numpy(keep)], b.index[keep], b.pts[keep], b.failures)
            if self.alone:
                if len(last):
                    yield last
                yield FrameBatch(b.pixels[:0], b.index[:0], b.pts[:0], (final,))
            else:
                yield FrameBatch(last.pixels, last.index, last.pts, last.failures + (final,))
            return


@pytest.mark.parametrize("alone", [True, False], ids=["failure-alone", "failure-with-frames"])
def test_a_final_decode_failure_ends_the_study_there(tmp_path: Path, h264_240: Path, tiny_bundle: Any, alone: bool,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    src = StopsAt(h264_240, tiny_bundle.preprocess, at=112, alone=alone, batch_size=16)
    with caplog.at_level(logging.INFO):
        res = run_recordings([src], tiny_bundle, tmp_path / "out", engine=CPU, options=opts()).results[0]
    assert res.status == "done", res.error
    assert res.frames == 112 and res.decode_failures == 0
    with StudyReader(res.output) as rd:
        assert len(rd) == 112 and (rd.status() == STATUS_OK).all() and np.isfinite(rd.probs()).all()
        assert rd.attrs["decode_tail_failure"] == "the disk returned an I/O error"
    assert "decoding stopped after frame 111: the disk returned an I/O error" in caplog.text
    assert "the container claims 240 frames, 112 were decoded" in caplog.text


def test_a_recording_that_fails_at_frame_0_is_refused_with_its_reason(tmp_path: Path, h264_240: Path,
                                                                      tiny_bundle: Any) -> None:
    double = StopsAt(h264_240, tiny_bundle.preprocess, at=0, alone=True, batch_size=16)
    rec = cut(h264_240, mdat_offset(h264_240) + 64, tmp_path / "header-only.mp4")  # the index, no whole frame
    assert decodable_frames(rec) == 0
    batch = run_recordings([double, rec], tiny_bundle, tmp_path / "out", engine=CPU, options=opts())
    results = {Path(r.recording).name: r for r in batch.results}
    for name, res in results.items():
        assert res.status == "failed" and res.frames == 0
        assert f"{name}: no frames could be decoded (" in res.error, res.error
        assert not Path(res.output).exists() and not partial_path(Path(res.output)).exists()
    assert results["full.mp4"].error.endswith("no frames could be decoded (the disk returned an I/O error)")
    assert "decoding stopped" in results["header-only.mp4"].error
    assert batch.exit_code == 1
