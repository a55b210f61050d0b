"""The pipeline in-process: parity with a reference decode, decode failures, dead stages, stop + resume, thumbnails."""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ENGINE, SOURCE, TINY_SIZE, make_recording

from capsule_batch.backends.select import create_engine
from capsule_batch.model.preprocess import reference_preprocess
from capsule_batch.run.pipeline import Pipeline, RunOptions
from capsule_batch.run.runner import resolve_shard, select_shard
from capsule_batch.sources.base import SOURCES, DecodeFailure, FrameBatch
from capsule_batch.study.schema import STATUS_DECODE_FAILED
from capsule_batch.study.store import StudyReader, StudyWriter, partial_path


@pytest.fixture(scope="module")
def engine(tiny_bundle: Any) -> Any:
    return create_engine(tiny_bundle, backend=ENGINE, device=torch.device("cpu"), precision="fp32", max_batch=8)


def opts(**kw: Any) -> RunOptions:
    d: dict[str, Any] = {"source": SOURCE, "batch_size": 16, "block_frames": 32, "probs_dtype": "float32"}
    d.update(kw)
    return RunOptions(**d)


def reference(recording: Path, bundle: Any) -> tuple[np.ndarray, np.ndarray]:
    """PyAV decode of every frame + PIL preprocessing + the model applied directly in fp32."""
    import av

    model = bundle.create_model()
    xs, pts = [], []
    with av.open(str(recording)) as c:
        for fr in c.decode(video=0):
            xs.append(torch.from_numpy(reference_preprocess(fr.to_image(), bundle.preprocess)))
            pts.append(float(fr.time))
    with torch.inference_mode():
        probs = [torch.softmax(model(torch.stack(xs[i:i + 40])), dim=1).numpy() for i in range(0, len(xs), 40)]
    return np.concatenate(probs), np.asarray(pts)


def reference_images(recording: Path, bundle: Any) -> np.ndarray:
    """Every frame as the model sees it, back in uint8 RGB (what a thumbnail shows)."""
    import av

    pre = bundle.preprocess
    out = []
    with av.open(str(recording)) as c:
        for fr in c.decode(video=0):
            x = reference_preprocess(fr.to_image(), pre).transpose(1, 2, 0)
            out.append(np.clip((x * np.asarray(pre.std) + np.asarray(pre.mean)) * 255 + 0.5, 0, 255))
    return np.stack(out).astype(np.float32)


def run_in_thread(fn: Any, timeout: float = 60) -> Any:
    """Call fn in a thread and fail (instead of hanging the suite) when it does not return in time."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"still running after {timeout}s: a stage hung"
    return out[0]


def test_rows_match_reference_decode_and_model(tmp_path: Path, recording: Path, tiny_bundle: Any,
                                               engine: Any) -> None:
    res = Pipeline(tiny_bundle, engine, opts()).run(recording, tmp_path)
    assert res.status == "done", res.error
    ref_p, ref_pts = reference(recording, tiny_bundle)
    with StudyReader(res.output) as rd:
        assert len(rd) == res.frames == len(ref_p) == 120
        assert rd.index().tolist() == list(range(120))
        assert (rd.status() == 0).all()
        np.testing.assert_allclose(rd.pts(), ref_pts)
        np.testing.assert_allclose(rd.probs(), ref_p, atol=1e-5, rtol=0)
        assert len(set(np.round(rd.probs()[:, 0], 4).tolist())) > 10  # frames really differ
        a = rd.attrs
        assert a["bundle_sha256"] == tiny_bundle.sha256 and a["backend"] == ENGINE and a["source"] == SOURCE
        assert a["triage"]["merge_gap"] == 2 and a["event_count"] == len(rd.events()) == res.events
    # default storage is float16: within its precision of the fp32 result
    res16 = Pipeline(tiny_bundle, engine, opts(probs_dtype="float16")).run(recording, tmp_path / "f16")
    with StudyReader(res16.output) as rd:
        np.testing.assert_allclose(rd.probs(), ref_p, atol=1e-3, rtol=0)


def test_thumbnails_are_the_event_frames(tmp_path: Path, tiny_bundle: Any, engine: Any) -> None:
    from PIL import Image

    from capsule_batch.sources.synthesize import synthesize

    rec = synthesize(tmp_path / "thumbs.mp4", 60, size=TINY_SIZE * 2, findings_per_1000=50).path
    res = Pipeline(tiny_bundle, engine, opts(thumbs_per_event=3, max_thumbs=6)).run(rec, tmp_path)
    assert res.status == "done", res.error
    with StudyReader(res.output) as rd:
        thumbs, events = rd.thumbs(), rd.events()
    assert 0 < len(thumbs) <= 6 * 2
    assert {t.frame for t in thumbs} >= {events[t.event].peak_frame for t in thumbs}
    ref = reference_images(rec, tiny_bundle)
    for t in thumbs:
        img = Image.open(io.BytesIO(t.jpeg))
        assert img.size == (TINY_SIZE, TINY_SIZE)
        assert events[t.event].start <= t.frame <= events[t.event].end
        dist = np.abs(ref - np.asarray(img, np.float32)).mean(axis=(1, 2, 3))
        assert int(dist.argmin()) == t.frame, (t.frame, np.sort(dist)[:3])  # frame-exact re-decode


class GappySource(SOURCES.get(SOURCE)):  # type: ignore[misc]
    """Reports frames 5 and 6 as undecodable (and drops them from the batch), as the contract allows."""

    def __iter__(self) -> Iterator[FrameBatch]:
        for b in super().__iter__():
            keep = ~np.isin(b.index, [5, 6])
            fails = tuple(DecodeFailure(int(i), "corrupt slice") for i in b.index[~keep])
            yield FrameBatch(b.pixels[torch.from_numpy(keep)], b.index[keep], b.pts[keep], fails)


class ShuffledSource(SOURCES.get(SOURCE)):  # type: ignore[misc]
    def __iter__(self) -> Iterator[FrameBatch]:
        for b in super().__iter__():
            yield FrameBatch(b.pixels, b.index[::-1].copy(), b.pts, b.failures)


SOURCES.register("test-gappy")(GappySource)
SOURCES.register("test-shuffled")(ShuffledSource)


def test_decode_failures_become_rows(tmp_path: Path, recording: Path, tiny_bundle: Any, engine: Any) -> None:
    res = Pipeline(tiny_bundle, engine, opts(source="test-gappy")).run(recording, tmp_path)
    assert res.status == "done" and res.decode_failures == 2
    with StudyReader(res.output) as rd:
        assert rd.index().tolist() == list(range(120))
        assert np.flatnonzero(rd.status() == STATUS_DECODE_FAILED).tolist() == [5, 6]
        assert np.isnan(rd.probs()[5:7]).all() and np.isfinite(rd.probs()[7:]).all()


def test_source_breaking_frame_order_fails(tmp_path: Path, recording: Path, tiny_bundle: Any, engine: Any) -> None:
    res = Pipeline(tiny_bundle, engine, opts(source="test-shuffled")).run(recording, tmp_path)
    assert res.status == "failed" and "broke the frame order" in res.error


def test_dead_source_raises_not_hangs(tmp_path: Path, recording: Path, tiny_bundle: Any, engine: Any) -> None:
    res = run_in_thread(lambda: Pipeline(tiny_bundle, engine, opts(source="test-raise")).run(recording, tmp_path))
    assert res.status == "failed" and "decoder exploded" in res.error
    assert partial_path(Path(res.output)).exists()  # flushed blocks stay resumable


def test_dead_writer_raises_not_hangs(tmp_path: Path, recording: Path, tiny_bundle: Any, engine: Any,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real = StudyWriter.append

    def append(self: StudyWriter, *a: Any) -> None:
        if self.frames_done >= 32:
            raise OSError(28, "No space left on device")
        real(self, *a)

    monkeypatch.setattr(StudyWriter, "append", append)
    t0 = time.perf_counter()
    res = run_in_thread(lambda: Pipeline(tiny_bundle, engine, opts(prefetch=1)).run(recording, tmp_path))
    assert res.status == "failed" and "No space left" in res.error and time.perf_counter() - t0 < 30


def test_stop_flushes_then_resume_matches(tmp_path: Path, recording: Path, tiny_bundle: Any, engine: Any) -> None:
    stop = threading.Event()

    class Stopping:
        """The engine, setting `stop` after its third call (as SIGINT would)."""

        def __init__(self, inner: Any):
            self.inner, self.calls = inner, 0

        def __getattr__(self, k: str) -> Any:
            return getattr(self.inner, k)

        def infer(self, x: Any) -> Any:
            self.calls += 1
            if self.calls == 3:
                stop.set()
            return self.inner.infer(x)

    res = Pipeline(tiny_bundle, Stopping(engine), opts(), stop).run(recording, tmp_path / "a")
    assert res.status == "interrupted" and "resumes" in res.error
    with StudyReader(res.output, allow_partial=True) as rd:
        assert 0 < len(rd) < 120 and rd.index().tolist() == list(range(len(rd)))
        done = len(rd)
    res2 = Pipeline(tiny_bundle, engine, opts()).run(recording, tmp_path / "a")
    assert res2.status == "done" and res2.resumed_from == done and res2.frames == 120
    full = Pipeline(tiny_bundle, engine, opts()).run(recording, tmp_path / "b")
    with StudyReader(res2.output) as r2, StudyReader(full.output) as rf:
        np.testing.assert_allclose(r2.probs(), rf.probs(), atol=1e-6, rtol=0)
        assert r2.events() == rf.events() and r2.attrs["resumed"] == 1
    again = Pipeline(tiny_bundle, engine, opts()).run(recording, tmp_path / "a")
    assert again.status == "skipped" and again.frames == 120



class Counting:
    """The engine, counting its calls; sets `stop` (as SIGINT would) after call `stop_after`."""

    def __init__(self, inner: Any, stop: threading.Event | None = None, stop_after: int = 0):
        self.inner, self.calls, self.stop, self.stop_after = inner, 0, stop, stop_after

    def __getattr__(self, k: str) -> Any:
        return getattr(self.inner, k)

    def infer(self, x: Any) -> Any:
        self.calls += 1
        if self.stop is not None and self.calls == self.stop_after:
            self.stop.set()
        return self.inner.infer(x)


def test_batches_in_flight_are_launched_ahead_and_all_handed_on(tmp_path: Path, recording: Path, tiny_bundle: Any,
                                                                engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """--inflight N: batch k reaches the writer only after batch k+N-1 was launched; rows equal a one-at-a-time
    run; a stop hands on every launched batch; the calling thread's time is accounted for."""
    real = StudyWriter.append
    seen: list[tuple[int, int]] = []  # (first frame of the appended block, engine calls made by then)
    counting = Counting(engine)

    def append(self: StudyWriter, index: Any, *a: Any) -> None:
        seen.append((int(index[0]), counting.calls))
        real(self, index, *a)

    monkeypatch.setattr(StudyWriter, "append", append)
    probs = {}
    for n in (1, 3):
        seen.clear()
        counting.calls = 0
        o = opts(inflight=n, block_frames=16)  # batches of 16 frames = 2 engine calls of 8; one block each
        res = Pipeline(tiny_bundle, counting, o).run(recording, tmp_path / f"in{n}")
        assert res.status == "done" and counting.calls == 15  # 7 batches of 16, then one of 8
        batches = 8
        for first, calls in seen:
            k = first // 16
            if k + n - 1 < batches - 1:
                assert calls >= 2 * (k + n), (n, seen)
        assert set(res.stage_seconds) == {"engine", "decode_wait", "write_wait"}
        assert all(v >= 0 for v in res.stage_seconds.values()) and sum(res.stage_seconds.values()) <= res.seconds
        assert res.stage_seconds["engine"] > 0
        assert re.fullmatch(r"engine \d+%, waiting for decode \d+%, waiting for the writer \d+%", res.time_split())
        with StudyReader(res.output) as rd:
            probs[n] = rd.probs()
    np.testing.assert_array_equal(probs[1], probs[3])
    stop = threading.Event()
    res = Pipeline(tiny_bundle, Counting(engine, stop, 3), opts(inflight=3), stop).run(recording, tmp_path / "s")
    assert res.status == "interrupted"
    with StudyReader(res.output, allow_partial=True) as rd:
        assert len(rd) == 32  # batches 0 and 1 were launched (calls 1-4) before the stop: both kept
        np.testing.assert_array_equal(rd.probs(), probs[1][:32])

def test_many_recordings_one_bad(tmp_path: Path, recording: Path, tiny_bundle: Any, engine: Any) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00garbage" * 1000)
    res = Pipeline(tiny_bundle, engine, opts()).run_many([bad, recording, tmp_path / "missing.mp4"], tmp_path / "o")
    assert [r.status for r in res] == ["failed", "done", "failed"]
    assert "broken.mp4" in res[0].error and "no such file" in res[2].error


def test_sharding() -> None:
    recs = [f"r{i}.mp4" for i in (3, 1, 0, 2, 4)]
    parts = [select_shard(recs, i, 2) for i in range(2)]
    assert parts == [["r0.mp4", "r2.mp4", "r4.mp4"], ["r1.mp4", "r3.mp4"]]
    assert resolve_shard("1/3", {"RANK": "0", "WORLD_SIZE": "2"}) == (1, 3)
    assert resolve_shard(None, {"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert resolve_shard(None, {}) == (0, 1)


def test_second_recording_gets_its_own_file(tmp_path: Path, tiny_bundle: Any, engine: Any) -> None:
    r2 = make_recording(tmp_path / "other.mp4", 20, seed=3)
    res = Pipeline(tiny_bundle, engine, opts()).run(r2, tmp_path / "o")
    assert res.status == "done" and Path(res.output).name == "other.h5" and res.frames == 20


def test_resume_refuses_another_bundle(tmp_path: Path, recording: Path, tiny_bundle: Any, engine: Any) -> None:
    from capsule_batch.model.bundle import save_bundle

    first = Pipeline(tiny_bundle, engine, opts(source="test-raise")).run(recording, tmp_path)
    assert first.status == "failed" and partial_path(Path(first.output)).exists()  # the blocks before the crash
    sd = {k: v + 0.01 for k, v in tiny_bundle.create_model().state_dict().items()}
    other = save_bundle(tmp_path / "other", sd, arch=tiny_bundle.arch, class_names=tiny_bundle.class_names,
                        preprocess=tiny_bundle.preprocess, model_args=tiny_bundle.model_args)
    eng2 = create_engine(other, backend=ENGINE, device=torch.device("cpu"), precision="fp32", max_batch=8)
    res = Pipeline(other, eng2, opts()).run(recording, tmp_path)
    assert res.status == "failed" and "another bundle weights" in res.error and "--overwrite" in res.error
    res = Pipeline(other, eng2, opts(overwrite=True)).run(recording, tmp_path)
    assert res.status == "done" and res.resumed_from == 0 and res.frames == 120


def test_crash_while_finishing_resumes_to_the_same_study(tmp_path: Path, recording: Path, tiny_bundle: Any,
                                                         engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import capsule_batch.study.store as store

    def no_rename(*a: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store.os, "replace", no_rename)
    res = Pipeline(tiny_bundle, engine, opts()).run(recording, tmp_path)
    assert res.status == "failed" and "Input/output error" in res.error
    monkeypatch.undo()
    res = Pipeline(tiny_bundle, engine, opts()).run(recording, tmp_path)
    assert res.status == "done" and res.resumed_from == 120 and res.frames == 120
    with StudyReader(res.output) as rd:
        assert len(rd) == 120 and rd.events() and rd.thumbs()
