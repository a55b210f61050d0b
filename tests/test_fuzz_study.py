"""Fuzz the readers of our own files: study files opened for review/report/export (hypothesis-mutated HDF5:
attributes, datasets, bytes) and the class-mapping CSV of training's `merged` datasets. Whatever the damage,
the result is a clear StudyError / DataError (one line naming the file), never another exception or a hang."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from review_studies import make_study

from capsule_batch.errors import StudyError
from capsule_batch.review.report import build_report
from capsule_batch.review.view import StudyView
from capsule_batch.study.export import export_study
from capsule_batch.study.store import StudyReader

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
ATTRS = ["schema", "complete", "frames_done", "class_names", "normal_class", "triage", "thresholds", "fps",
         "flagged_frames", "event_count", "source_path", "probs_dtype", "argv", "engine"]
DATASETS = ["frames/index", "frames/pts", "frames/probs", "frames/status", "events", "thumbs/frame", "thumbs/event",
            "thumbs/jpeg", "frames", "thumbs", "review"]

values = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True), st.text(max_size=30),
    st.binary(min_size=1, max_size=30), st.lists(st.integers(-5, 5), max_size=4),
    st.sampled_from(["[]", "{}", "null", "[1, 2]", '["a", "a"]', '{"class_names": 3}', "[\"Normal\"]", "{", "1e999"]),
)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_study(tmp_path_factory.mktemp("fuzz") / "good.h5", n=120,
                      runs=[(10, 20, 1, 0.9), (60, 64, 3, 0.8)], thumb_size=32, per_event=2)


def use(path: Path) -> None:
    """Everything review, report and export read; a StudyError is the only allowed failure."""
    try:
        with StudyReader(path) as rd:
            len(rd), rd.attrs, rd.class_names, rd.triage, rd.events(), rd.thumbs(), rd.summary()
            for lo, hi in rd.blocks(50):
                rd.index(lo, hi), rd.pts(lo, hi), rd.probs(lo, hi), rd.status(lo, hi)
        view = StudyView(path)
        try:
            view.timeline()
            for i in range(min(3, len(view.events))):
                view.event_detail(i)
            view.provenance()
        finally:
            view.close()
        build_report(path, per_event=1)
        with tempfile.TemporaryDirectory() as d:
            export_study(path, d)
    except StudyError as e:
        msg = str(e)
        assert "\n" not in msg.strip() and str(path) in msg, msg


def mutated(good: Path, tmp: Path) -> Path:
    p = tmp / "study.h5"
    shutil.copyfile(good, p)
    return p


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(ATTRS), values), min_size=1, max_size=3))
def test_study_with_mutated_attributes(good: Path, changes: list) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = mutated(good, Path(d))
        with h5py.File(p, "r+") as f:
            for name, v in changes:
                if v is None:
                    f.attrs.pop(name, None)
                else:
                    f.attrs[name] = np.void(v) if isinstance(v, bytes) else v
        use(p)


@FUZZ
@given(name=st.sampled_from(DATASETS),
       action=st.sampled_from(["delete", "strings", "2d", "shorter", "empty", "huge-values", "float"]))
def test_study_with_mutated_datasets(good: Path, name: str, action: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = mutated(good, Path(d))
        with h5py.File(p, "r+") as f:
            if name not in f:
                return
            old = f[name]
            n = old.shape[0] if isinstance(old, h5py.Dataset) and old.shape else 3
            del f[name]
            if action == "delete":
                pass
            elif action == "strings":
                f[name] = np.array([b"x"] * n)
            elif action == "2d":
                f[name] = np.zeros((n, 3), np.int32)
            elif action == "shorter":
                f[name] = np.zeros(max(0, n // 2), np.int64)
            elif action == "empty":
                f[name] = np.zeros(0, np.float32)
            elif action == "huge-values":
                f[name] = np.full(n, 2**31 - 1, np.int64)
            else:
                f[name] = np.full(n, np.nan)
        use(p)


@FUZZ
@given(cut=st.floats(0.0, 1.0), flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=8))
def test_study_with_damaged_bytes(good: Path, cut: float, flips: list) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = mutated(good, Path(d))
        data = bytearray(p.read_bytes())
        for where, b in flips:
            data[min(len(data) - 1, int(where * len(data)))] = b
        if cut < 0.5:  # half the examples truncated
            data = data[: int(cut * 2 * len(data))]
        p.write_bytes(bytes(data))
        use(p)


# --------------------------------------------------------------------------------------------------
csv_text = st.one_of(
    st.text(max_size=200),
    st.lists(st.lists(st.sampled_from(["source", "label", "ce24", "seed", "a", "b", "", "-", "Normal", "x,y",
                                       '"', ";", "\t", "Ä"]), min_size=1, max_size=4),
             min_size=0, max_size=6).map(lambda rows: "\n".join(",".join(r) for r in rows)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(text=csv_text, raw=st.binary(max_size=40))
def test_class_mapping_files(tmp_path_factory: pytest.TempPathFactory, text: str, raw: bytes) -> None:
    from train.data import DataError, read_spec

    d = tmp_path_factory.mktemp("map")
    (d / "imgs" / "Normal").mkdir(parents=True)
    (d / "imgs" / "Normal" / "a.jpg").write_bytes(b"\xff\xd8")
    for name, content in (("m.csv", text.encode()), ("raw.csv", raw)):
        (d / name).write_bytes(content)
        spec = {"kind": "merged", "mapping": str(d / name), "granularity": "ce24",
                "sources": [{"name": "a", "kind": "folder", "root": str(d / "imgs")}]}
        try:
            samples = read_spec(spec, "fuzz")
        except DataError as e:
            assert str(d / name) in str(e) or "fuzz" in str(e), str(e)
            continue
        assert all(s.label and s.label.lower() not in ("-", "exclude") for s in samples)
