"""StudyWriter/StudyReader: layout, block flushing, resume bookkeeping, refusals, and a real HDF5 tool."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from capsule_batch.errors import StudyError
from capsule_batch.study.schema import SCHEMA
from capsule_batch.study.store import StudyReader, StudyWriter, partial_path, recording_identity
from capsule_batch.study.triage import Event, TriageConfig

NAMES = ["A", "B", "Normal"]


def attrs(**kw: object) -> dict:
    d = {"source_path": "/x/rec.mp4", "source_size": 10, "source_hash": "sha256-ends:aa", "bundle_sha256": "b" * 64,
         "class_names": NAMES, "probs_dtype": "float16", "backend": "test"}
    d.update(kw)
    return d


def rows(lo: int, hi: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed + lo)
    idx = np.arange(lo, hi)
    return idx, idx / 4.0, rng.dirichlet([1, 1, 1], hi - lo).astype(np.float32), np.zeros(hi - lo, np.uint8)


def finished_study(tmp_path: Path, n: int = 50) -> Path:
    w = StudyWriter.open(tmp_path / "s.h5", attrs())
    for lo in range(0, n, 20):
        w.append(*rows(lo, min(n, lo + 20)))
    ev = [Event(3, 9, 0, 5, 0.9, 6)]
    out = w.finish(ev, 6, TriageConfig(tuple(NAMES), "Normal"), [(5, 0, b"\xff\xd8fakejpeg")], {"fps": 4.0})
    w.close()
    return out


def test_round_trip(tmp_path: Path) -> None:
    out = finished_study(tmp_path)
    assert out == tmp_path / "s.h5" and not partial_path(out).exists()
    with StudyReader(out) as rd:
        assert rd.complete and len(rd) == 50 and rd.class_names == NAMES
        assert rd.index().tolist() == list(range(50))
        np.testing.assert_allclose(rd.probs(20, 40), rows(20, 40)[2], atol=1e-3)  # float16 storage
        assert rd.events() == [Event(3, 9, 0, 5, pytest.approx(0.9), 6)]
        assert [(t.frame, t.event, t.jpeg) for t in rd.thumbs()] == [(5, 0, b"\xff\xd8fakejpeg")]
        a = rd.attrs
        assert a["schema"] == SCHEMA and a["fps"] == 4.0 and a["frames_done"] == 50 and a["class_names"] == NAMES
        assert rd.triage == TriageConfig(tuple(NAMES), "Normal")
    with h5py.File(out) as f:
        assert f["frames/probs"].dtype == np.float16
        for name in ("index", "pts", "probs", "status"):
            assert f["frames"][name].compression == "gzip" and f["frames"][name].chunks


def test_appends_must_continue_the_frame_sequence(tmp_path: Path) -> None:
    w = StudyWriter.open(tmp_path / "s.h5", attrs())
    w.append(*rows(0, 10))
    with pytest.raises(StudyError, match="expected frame 10"):
        w.append(*rows(11, 20))
    w.close()


def test_resume_truncates_to_the_last_flushed_block(tmp_path: Path) -> None:
    w = StudyWriter.open(tmp_path / "s.h5", attrs())
    w.append(*rows(0, 20))
    w.append(*rows(20, 40))
    w.close()
    with h5py.File(partial_path(tmp_path / "s.h5"), "r+") as f:  # a block written but not yet recorded as done
        f.attrs["frames_done"] = 30
        for ds in f["frames"].values():
            ds.resize(45, axis=0)
    w = StudyWriter.open(tmp_path / "s.h5", attrs())
    assert w.resumed and w.frames_done == 30
    w.append(*rows(30, 40))
    w.close()
    with StudyReader(partial_path(tmp_path / "s.h5"), allow_partial=True) as rd:
        assert len(rd) == 40 and rd.index().tolist() == list(range(40))
    with pytest.raises(StudyError, match="incomplete"):
        StudyReader(partial_path(tmp_path / "s.h5"))


@pytest.mark.parametrize(("key", "value", "what"), [("source_hash", "sha256-ends:bb", "recording content hash"),
                                                     ("bundle_sha256", "c" * 64, "bundle weights"),
                                                     ("probs_dtype", "float32", "probabilities dtype")])
def test_resume_refuses_another_recording_or_bundle(tmp_path: Path, key: str, value: str, what: str) -> None:
    w = StudyWriter.open(tmp_path / "s.h5", attrs())
    w.append(*rows(0, 10))
    w.close()
    with pytest.raises(StudyError, match=f"another {what}.*--overwrite"):
        StudyWriter.open(tmp_path / "s.h5", attrs(**{key: value}))
    w = StudyWriter.open(tmp_path / "s.h5", attrs(**{key: value}), resume=False)
    assert w.frames_done == 0
    w.close()


def test_unreadable_partial_starts_over_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    partial_path(tmp_path / "s.h5").write_bytes(b"not hdf5 at all" * 100)
    with caplog.at_level(logging.WARNING):
        w = StudyWriter.open(tmp_path / "s.h5", attrs())
    assert w.frames_done == 0 and "starting over" in caplog.text
    w.close()


def test_recording_identity(tmp_path: Path) -> None:
    f = tmp_path / "r.bin"
    f.write_bytes(b"a" * 3_000_000)
    a = recording_identity(f)
    assert a["source_size"] == 3_000_000 and recording_identity(f) == a
    f.write_bytes(b"a" * 2_999_999 + b"b")  # same size, last byte differs
    assert recording_identity(f)["source_hash"] != a["source_hash"]
    d = tmp_path / "frames"
    d.mkdir()
    (d / "frame_1.png").write_bytes(b"x")
    (d / "frame_2.png").write_bytes(b"y")
    b = recording_identity(d)
    (d / "frame_3.png").write_bytes(b"z")
    assert recording_identity(d)["source_hash"] != b["source_hash"]


def test_reader_refuses_other_files(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.attrs["schema"] = "other"
    with pytest.raises(StudyError, match="schema"):
        StudyReader(tmp_path / "x.h5")
    with pytest.raises(StudyError, match="no such study"):
        StudyReader(tmp_path / "missing.h5")


@pytest.mark.skipif(shutil.which("h5dump") is None and not os.environ.get("CI"),
                    reason="needs h5dump/h5ls (Debian package hdf5-tools; .ci/run installs it)")
def test_hdf5_tools_read_the_study(tmp_path: Path) -> None:
    out = finished_study(tmp_path)
    ls = subprocess.run(["h5ls", "-r", str(out)], capture_output=True, text=True, check=True).stdout
    assert "/frames/probs" in ls and "{50/Inf, 3}" in ls and "/events" in ls and "/thumbs/jpeg" in ls
    dump = subprocess.run(["h5dump", "-d", "/frames/index", "-p", str(out)], capture_output=True, text=True,
                          check=True).stdout
    assert "COMPRESSION DEFLATE" in dump and "PREPROCESSING SHUFFLE" in dump
    values = dump.split("DATA {", 1)[1]
    assert "(0): 0, 1, 2" in values and "49" in values
    hdr = subprocess.run(["h5dump", "-a", "/schema", "-a", "/frames_done", str(out)], capture_output=True, text=True,
                         check=True).stdout
    assert f'(0): "{SCHEMA}"' in hdr and "(0): 50" in hdr
    ev = subprocess.run(["h5dump", "-d", "/events", str(out)], capture_output=True, text=True, check=True).stdout
    assert '"peak_frame"' in ev and "5" in ev.split("DATA {", 1)[1]
