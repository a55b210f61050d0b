"""Reviewer decisions: journal first, folded into the study by copy-on-write; crashes never corrupt the file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import pytest
from review_studies import make_study

import capsule_batch.study.decisions as decisions_mod
import capsule_batch.study.store as store_mod
from capsule_batch.errors import StudyError
from capsule_batch.study.decisions import DecisionLog, journal_path, read_decisions, read_log
from capsule_batch.study.store import StudyReader


@pytest.fixture
def study(tmp_path: Path) -> Path:
    return make_study(tmp_path / "s.h5", n=200, runs=[(20, 30, 1, 0.9), (80, 90, 8, 0.8), (150, 160, 7, 0.7)])


def test_journal_then_fold(study: Path) -> None:
    log = DecisionLog(study, 3, 10)
    log.record(0, "confirm", None, "ok", "a")
    log.record(1, "reject", 4, "no <b>", "b")
    log.record(0, "reject", None, "changed my mind", "a")
    # durable before any fold: in the journal, visible to readers, not yet in the HDF5
    assert journal_path(study).exists()
    assert {i: d.verdict for i, d in read_decisions(study).items()} == {0: "reject", 1: "reject"}
    with h5py.File(study, "r") as f:
        assert len(f["review"]) == 0
    assert log.fold()
    assert not log.fold()  # nothing new
    assert not journal_path(study).exists()
    with h5py.File(study, "r") as f:
        g = f["review"]
        assert [int(r["event"]) for r in g["log"][:]] == [0, 1, 0]
        assert [(int(r["event"]), int(r["verdict"]), int(r["class"])) for r in g["decisions"][:]] == [(0, 2, -1),
                                                                                                    (1, 2, 4)]
    d = read_decisions(study)
    assert d[1].cls == 4 and d[1].comment == "no <b>" and d[1].reviewer == "b"
    # the rest of the study is untouched and it still opens as a study
    with StudyReader(study) as r:
        assert len(r) == 200 and len(r.events()) == 3 and r.thumbs()
    # reopening continues the sequence
    log2 = DecisionLog(study, 3, 10)
    assert log2.record(2, "confirm", None, "", "").seq == 4
    assert [d.seq for d in read_log(study)] == [1, 2, 3, 4]


def test_a_line_cut_short_by_a_crash_is_ignored(study: Path) -> None:
    log = DecisionLog(study, 3, 10)
    log.record(0, "confirm", None, "", "")
    with open(journal_path(study), "a", encoding="utf-8") as fh:
        fh.write('{"event": 1, "verdict": "rej')  # the process died mid-write
    assert {i: d.verdict for i, d in read_decisions(study).items()} == {0: "confirm"}
    log2 = DecisionLog(study, 3, 10)
    assert log2.fold()
    assert list(read_decisions(study)) == [0]


def test_a_crash_while_folding_leaves_the_old_file_whole(study: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = study.read_bytes()
    log = DecisionLog(study, 3, 10)
    log.record(2, "confirm", None, "", "")

    def dies(*a: object, **k: object) -> None:
        raise KeyboardInterrupt  # killed between writing the copy and renaming it

    monkeypatch.setattr(decisions_mod.os, "replace", dies)
    with pytest.raises(KeyboardInterrupt):
        log.fold()
    monkeypatch.undo()
    assert study.read_bytes() == before  # never modified in place
    assert [p.name for p in study.parent.iterdir() if p.name.endswith(".tmp")] == []
    assert list(read_decisions(study)) == [2]  # still in the journal
    assert DecisionLog(study, 3, 10).fold()
    with h5py.File(study, "r") as f:
        assert [int(r["event"]) for r in f["review/decisions"][:]] == [2]


def test_an_interrupted_copy_never_reaches_the_study(study: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash half-way through copying leaves a truncated temporary file that is removed; the study is intact."""
    before = study.read_bytes()
    log = DecisionLog(study, 3, 10)
    log.record(0, "confirm", None, "", "")

    def half_copy(src: os.PathLike, dst: os.PathLike) -> None:
        Path(dst).write_bytes(Path(src).read_bytes()[:1000])
        raise OSError("disk full")

    monkeypatch.setattr(store_mod.shutil, "copyfile", half_copy)
    with pytest.raises(OSError, match="disk full"):
        log.fold()
    assert study.read_bytes() == before
    assert sorted(p.name for p in study.parent.iterdir()) == sorted([study.name, journal_path(study).name])


@pytest.mark.parametrize("args, msg", [((5, "confirm", None), "no event 5"), ((0, "maybe", None), "verdict"),
                                       ((0, "confirm", 10), "class index")])
def test_bad_decisions_are_refused(study: Path, args: tuple, msg: str) -> None:
    with pytest.raises(StudyError, match=msg):
        DecisionLog(study, 3, 10).record(*args, "", "")
    assert not journal_path(study).exists()


def test_read_only_copy_of_a_study_reads_its_decisions(study: Path, tmp_path: Path) -> None:
    log = DecisionLog(study, 3, 10)
    log.record(1, "reject", None, "é ü 中", "r")
    log.fold()
    copy = tmp_path / "copy.h5"
    shutil.copy(study, copy)
    assert read_decisions(copy)[1].comment == "é ü 中"


def test_decisions_recorded_while_folding_are_all_kept(study: Path) -> None:
    import threading

    log = DecisionLog(study, 3, 10)
    stop = threading.Event()

    def folder() -> None:
        while not stop.is_set():
            log.fold()

    t = threading.Thread(target=folder)
    t.start()
    try:
        for k in range(150):
            log.record(k % 3, ("confirm", "reject")[k % 2], None, f"c{k}", "")
    finally:
        stop.set()
        t.join()
    log.fold()
    assert [d.seq for d in read_log(study)] == list(range(1, 151))
    assert not journal_path(study).exists()
    assert read_decisions(study)[2].comment == "c149"
