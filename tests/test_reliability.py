"""Faults as a user meets them: signals at random points, a full disk, a read-only output folder, a decoder
that crashes or hangs, two writers on one study, paths with spaces and non-ASCII characters."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ENGINE, SLOW_ENGINE, cli_cmd, cli_env, make_recording

from capsule_batch.backends.select import create_engine
from capsule_batch.errors import CapsuleError, StudyError
from capsule_batch.review.app import _lock_study, _unlock_study
from capsule_batch.run.pipeline import Pipeline, RunOptions
from capsule_batch.run.runner import check_writable
from capsule_batch.study.locks import run_lock
from capsule_batch.study.store import StudyReader, StudyWriter, partial_path

FRAMES = 96


@pytest.fixture(scope="module")
def recs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("recs")
    return [make_recording(d / f"rel_{k}.mp4", FRAMES, seed=10 + k) for k in range(2)]


def args(bundle: Any, out: Path, *recordings: Path, extra: tuple[str, ...] = (), source: str = "decord") -> list[str]:
    return cli_cmd("run", *map(str, recordings), "-m", str(bundle.path), "-o", str(out), "--engine", SLOW_ENGINE,
                   "--source", source, "--device", "cpu", "--batch-size", "8", "--block-frames", "16",
                   "--probs-dtype", "float32", "--json", *extra)


def env(delay: float = 0.0) -> dict[str, str]:
    e = cli_env()
    e["CAPSULE_TEST_ENGINE_DELAY"] = str(delay)
    return e


def run(a: list[str], delay: float = 0.0, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(a, capture_output=True, text=True, env=env(delay), timeout=300, **kw)


def summary(cp: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in cp.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, (cp.returncode, cp.stdout, cp.stderr[-3000:])
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, recs: list[Path], tiny_bundle: Any) -> Path:
    out = tmp_path_factory.mktemp("reference")
    cp = run(args(tiny_bundle, out, *recs))
    assert cp.returncode == 0, cp.stderr[-3000:]
    return out


def assert_same_studies(out: Path, ref: Path, names: list[str]) -> None:
    for name in names:
        with StudyReader(out / name) as a, StudyReader(ref / name) as b:
            assert a.index().tolist() == list(range(FRAMES))
            np.testing.assert_allclose(a.probs(), b.probs(), atol=1e-6, rtol=0)
            assert a.events() == b.events()
            assert [t.frame for t in a.thumbs()] == [t.frame for t in b.thumbs()]


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sig", "seed"), [(signal.SIGINT, 1), (signal.SIGTERM, 2), (signal.SIGKILL, 3)])
def test_signal_at_a_random_point_then_resume_equals_uninterrupted(tmp_path: Path, recs: list[Path], tiny_bundle: Any,
                                                                  reference: Path, sig: int, seed: int) -> None:
    """Two recordings (so the run goes through its worker process); the signal reaches the command at a seeded
    random moment, from start-up to the end; rerunning the command then gives the uninterrupted result."""
    out = tmp_path / "out"
    a = args(tiny_bundle, out, *recs)
    proc = subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(0.04))
    time.sleep(random.Random(seed).uniform(1.0, 7.0))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        # 0: it had finished; 130: stopped after a flush; 1 or -sig: the signal came during start-up
        assert proc.returncode in (0, 1, 130, -sig), err[-3000:]
    # the killed command's worker died with it (else the lock would refuse the next run)
    resumed = run(a)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    s = summary(resumed)
    assert {r["status"] for r in s["recordings"]} <= {"done", "skipped"}
    assert_same_studies(out, reference, [f"rel_{k}.h5" for k in range(2)])
    assert not list(out.glob("*.partial")) and not list(out.glob("*.lock"))


# --------------------------------------------------------------------------------------------------
def _file_size_limit(limit: int) -> Any:
    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def test_disk_full_gives_a_clear_error_and_resumes_once_space_is_back(tmp_path: Path, recs: list[Path],
                                                                     tiny_bundle: Any, reference: Path) -> None:
    """A file size limit (RLIMIT_FSIZE: works as root, unlike a read-only folder) leaves room for a few blocks:
    the writer stops before a block that may not fit (HDF5 itself crashed the process when a write hit the limit),
    says so, and the partial file resumes without the limit."""
    probe = StudyWriter.open(tmp_path / "probe.h5", {"class_names": list(tiny_bundle.class_names),
                                                     "probs_dtype": "float32"}, resume=False)
    headroom = probe.headroom()
    probe.close()
    out = tmp_path / "out"
    a = args(tiny_bundle, out, recs[0], extra=("--max-thumbs", "0"))
    cp = subprocess.run(a, capture_output=True, text=True, env=env(), timeout=300,
                        preexec_fn=_file_size_limit(headroom + 21000))  # the partial file: 8 KB + ~0.6 KB a block
    assert cp.returncode == 1, cp.stderr[-3000:]
    (r,) = summary(cp)["recordings"]
    assert r["status"] == "failed" and "cannot write the study file (file size limit" in r["error"]
    assert "resume" in r["error"] and "Traceback" not in cp.stderr
    with StudyReader(partial_path(out / "rel_0.h5"), allow_partial=True) as rd:
        kept = len(rd)
        assert 0 < kept < FRAMES and rd.index().tolist() == list(range(kept))
    again = run(a)
    assert again.returncode == 0, again.stderr[-3000:]
    (r,) = summary(again)["recordings"]
    assert r["status"] == "done" and r["resumed_from"] == kept
    with StudyReader(out / "rel_0.h5") as x, StudyReader(reference / "rel_0.h5") as y:
        np.testing.assert_allclose(x.probs(), y.probs(), atol=1e-6, rtol=0)
        assert x.events() == y.events()


@pytest.fixture()
def read_only_dir(tmp_path: Path) -> Any:
    """A folder that even root cannot write: a read-only tmpfs mount (or, not as root, mode 0555)."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("running as root but not allowed to mount a read-only tmpfs here")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


def test_read_only_output_is_refused_before_any_work(read_only_dir: Path, recs: list[Path], tiny_bundle: Any) -> None:
    for out in (read_only_dir, read_only_dir / "sub"):
        t0 = time.perf_counter()
        cp = run(args(tiny_bundle, out, recs[0]))
        assert cp.returncode == 1
        assert cp.stderr.strip().splitlines() == [
            f"Error: {out}: cannot write study files here "
            f"({'Read-only file system' if os.geteuid() == 0 else 'Permission denied'}); choose another -o folder"]
        assert time.perf_counter() - t0 < 60
    with pytest.raises(StudyError, match="cannot write study files here"):
        check_writable(read_only_dir)


# --------------------------------------------------------------------------------------------------
def test_a_decoder_crash_fails_one_recording_and_the_others_complete(tmp_path: Path, tiny_bundle: Any) -> None:
    """A real segfault in the decode thread (like a native decoder on a hostile file) of the middle recording."""
    d = tmp_path / "in"
    d.mkdir()
    names = ["a.mp4", "b_crash.mp4", "c.mp4"]
    rs = [make_recording(d / n, 24, seed=k) for k, n in enumerate(names)]
    cp = run(args(tiny_bundle, tmp_path / "out", *rs, source="test-crash"))
    assert cp.returncode == 1, cp.stderr[-3000:]
    by = {Path(r["recording"]).name: r for r in summary(cp)["recordings"]}
    assert by["a.mp4"]["status"] == by["c.mp4"]["status"] == "done" and by["c.mp4"]["frames"] == 24
    assert by["b_crash.mp4"]["status"] == "failed" and "SIGSEGV" in by["b_crash.mp4"]["error"]
    assert by["b_crash.mp4"]["error"].startswith(str(rs[1]))
    assert (tmp_path / "out" / "c.h5").is_file() and not (tmp_path / "out" / "b_crash.h5").exists()


@pytest.fixture(scope="module")
def engine(tiny_bundle: Any) -> Any:
    return create_engine(tiny_bundle, backend=ENGINE, device=torch.device("cpu"), precision="fp32", max_batch=8)


def test_a_decoder_hang_times_out_and_the_next_recording_runs(tmp_path: Path, tiny_bundle: Any, engine: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPSULE_TEST_HANG", "20")
    hang = make_recording(tmp_path / "hang.mp4", 24, seed=1)
    ok = make_recording(tmp_path / "ok.mp4", 24, seed=2)
    opts = RunOptions(source="test-hang", batch_size=8, block_frames=8, probs_dtype="float32", decode_timeout=1.0)
    t0 = time.perf_counter()
    res = Pipeline(tiny_bundle, engine, opts).run_many([hang, ok], tmp_path / "out")
    assert time.perf_counter() - t0 < 15
    assert res[0].status == "failed" and "produced no frames for 1 s after frame 7" in res[0].error
    assert res[0].error.startswith(str(hang)) and res[1].status == "done" and res[1].frames == 24
    with StudyReader(partial_path(tmp_path / "out" / "hang.h5"), allow_partial=True) as rd:
        assert len(rd) == 8  # the frames before the hang are kept


def test_an_engine_hang_fails_its_recording_and_the_next_ones_run_in_a_new_worker(tmp_path: Path,
                                                                                    tiny_bundle: Any) -> None:
    """The engine's 5th call never returns (a stuck GPU): a.mp4 took 3 calls, so b.mp4 hangs after its first batch.
    Its recording fails naming the timeout, c.mp4 runs in a new worker, and a rerun resumes b.mp4 from frame 8.
    (--inflight 1: with batches in flight, those launched but not yet handed on are redone by the rerun.)"""
    d = tmp_path / "in"
    d.mkdir()
    rs = [make_recording(d / n, 24, seed=k) for k, n in enumerate(["a.mp4", "b.mp4", "c.mp4"])]
    countdown = tmp_path / "hang-after"
    countdown.write_text("4")
    e = env()
    e["CAPSULE_TEST_ENGINE_HANG"] = str(countdown)
    a = args(tiny_bundle, tmp_path / "out", *rs,
             extra=("--block-frames", "8", "--engine-timeout", "2", "--inflight", "1"))
    t0 = time.perf_counter()
    cp = subprocess.run(a, capture_output=True, text=True, env=e, timeout=300)
    assert time.perf_counter() - t0 < 100  # the hung call sleeps 120 s: the watch ended it
    assert cp.returncode == 1, cp.stderr[-3000:]
    by = {Path(r["recording"]).name: r for r in summary(cp)["recordings"]}
    assert by["a.mp4"]["status"] == by["c.mp4"]["status"] == "done" and by["c.mp4"]["frames"] == 24
    err = by["b.mp4"]["error"]
    assert by["b.mp4"]["status"] == "failed" and err.startswith(str(rs[1]))
    assert "the engine returned no result for 2 s on the batch from frame 8" in err and "--engine-timeout" in err
    assert not countdown.exists()
    with StudyReader(partial_path(tmp_path / "out" / "b.h5"), allow_partial=True) as rd:
        assert len(rd) == 8  # the block before the hang is kept
    again = run(a)
    assert again.returncode == 0, again.stderr[-3000:]
    by = {Path(r["recording"]).name: r for r in summary(again)["recordings"]}
    assert by["b.mp4"]["status"] == "done" and by["b.mp4"]["resumed_from"] == 8 and by["b.mp4"]["frames"] == 24
    assert by["a.mp4"]["status"] == by["c.mp4"]["status"] == "skipped"


def test_an_engine_crash_fails_its_recording_and_the_next_ones_run(tmp_path: Path, tiny_bundle: Any) -> None:
    """A segfault inside the engine's 2nd call (engine code, not the decoder): the worker dies, that recording
    fails naming the signal, the next one runs in a new worker with a new engine."""
    d = tmp_path / "in"
    d.mkdir()
    rs = [make_recording(d / n, 24, seed=k) for k, n in enumerate(["a.mp4", "b.mp4"])]
    countdown = tmp_path / "crash-after"
    countdown.write_text("1")
    e = env()
    e["CAPSULE_TEST_ENGINE_CRASH"] = str(countdown)
    cp = subprocess.run(args(tiny_bundle, tmp_path / "out", *rs), capture_output=True, text=True, env=e, timeout=300)
    assert cp.returncode == 1, cp.stderr[-3000:]
    by = {Path(r["recording"]).name: r for r in summary(cp)["recordings"]}
    assert by["a.mp4"]["status"] == "failed" and "killed by SIGSEGV" in by["a.mp4"]["error"]
    assert by["b.mp4"]["status"] == "done" and by["b.mp4"]["frames"] == 24


def test_an_engine_hang_without_a_worker_ends_the_process_with_the_reason(tmp_path: Path, tiny_bundle: Any) -> None:
    rec = make_recording(tmp_path / "one.mp4", 24, seed=3)
    countdown = tmp_path / "hang-after"
    countdown.write_text("0")
    e = env()
    e["CAPSULE_TEST_ENGINE_HANG"] = str(countdown)
    cp = subprocess.run(args(tiny_bundle, tmp_path / "out", rec, extra=("--engine-timeout", "1")),
                        capture_output=True, text=True, env=e, timeout=100)
    assert cp.returncode == 1
    assert f"{rec}: the engine returned no result for 1 s on the batch from frame 0" in cp.stderr


# --------------------------------------------------------------------------------------------------
def test_a_second_run_on_the_same_study_is_refused(tmp_path: Path, recs: list[Path], tiny_bundle: Any) -> None:
    """Two `run` processes on one output: the second is refused naming the file and the first process; the lock
    does not outlive a SIGKILLed holder."""
    out = tmp_path / "out"
    a = args(tiny_bundle, out, recs[0])
    first = subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(1.0))
    lock = out / "rel_0.h5.lock"
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    second = run(a)
    assert second.returncode == 1
    (r,) = summary(second)["recordings"]
    assert r["error"] == (f"{out / 'rel_0.h5'}: another capsule-batch run is writing this study "
                          f"(process {first.pid} holds the lock rel_0.h5.lock)")
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    third = run(a)
    assert third.returncode == 0 and summary(third)["recordings"][0]["status"] == "done", third.stderr[-3000:]


def test_run_and_review_on_one_study(tmp_path: Path, recs: list[Path], tiny_bundle: Any, engine: Any) -> None:
    """With a review app holding the study: a rerun only reads it (skip), --overwrite is refused; the file is
    unchanged. A run holding a study's lock makes an in-process run of the same study fail, not interleave."""
    out = tmp_path / "out"
    opts = RunOptions(source="decord", batch_size=16, block_frames=32, probs_dtype="float32")
    assert Pipeline(tiny_bundle, engine, opts).run(recs[0], out).status == "done"
    study = out / "rel_0.h5"
    before = study.read_bytes()
    fd = _lock_study(study)  # what `capsule-batch review` holds while open
    try:
        assert Pipeline(tiny_bundle, engine, opts).run(recs[0], out).status == "skipped"
        over = RunOptions(source="decord", batch_size=16, block_frames=32, probs_dtype="float32", overwrite=True)
        res = Pipeline(tiny_bundle, engine, over).run(recs[0], out)
        assert res.status == "failed" and "open in a review app" in res.error and "--overwrite" in res.error
        assert study.read_bytes() == before
    finally:
        _unlock_study(study, fd)
    with run_lock(study):
        res = Pipeline(tiny_bundle, engine, over).run(recs[0], out)
    assert res.status == "failed" and f"process {os.getpid()} holds the lock" in res.error
    assert study.read_bytes() == before


# --------------------------------------------------------------------------------------------------
@pytest.mark.cpu_choice
def test_paths_with_spaces_and_non_ascii(tmp_path: Path, tiny_bundle: Any) -> None:
    d = tmp_path / "Studie Ä 1"
    rec = d / "rec ñ 東.mp4"
    d.mkdir()
    cp = run(cli_cmd("synth", "-o", str(rec), "--frames", "40", "--size", "56", "--stamp"))
    assert cp.returncode == 0, cp.stderr
    bundle = tmp_path / "Modell ö"
    shutil.copytree(tiny_bundle.path, bundle)
    out = tmp_path / "Ergebnisse é"
    cp = run(cli_cmd("run", str(rec), "-m", str(bundle), "-o", str(out), "--engine", ENGINE, "--source", "decord",
                     "--device", "cpu", "--batch-size", "8", "--json"))
    assert cp.returncode == 0, cp.stderr[-3000:]
    (r,) = summary(cp)["recordings"]
    study = out / "rec ñ 東.h5"
    assert r["status"] == "done" and r["output"] == str(study) and r["frames"] == 40
    with StudyReader(study) as rd:
        assert rd.attrs["source_path"] == str(rec.resolve()) and rd.attrs["bundle_path"] == str(bundle.resolve())
    rep = run(cli_cmd("report", str(study), "-o", str(out / "Bericht ü.html")))
    assert rep.returncode == 0, rep.stderr
    assert "rec ñ 東" in (out / "Bericht ü.html").read_text(encoding="utf-8")
    exp = run(cli_cmd("export", str(study), "-o", str(out / "Export ß"), "--json"))
    assert exp.returncode == 0, exp.stderr
    assert (out / "Export ß" / "frames.csv").read_text().count("\n") == 41


def test_full_tmpfs_stops_before_hdf5_runs_out(tmp_path: Path) -> None:
    """A real full file system (a 2 MiB tmpfs, filled up): the writer stops with `disk full` and the rows kept read."""
    d = tmp_path / "small"
    d.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)],
                                           capture_output=True).returncode:
        pytest.skip("needs root and permission to mount a tmpfs")
    try:
        classes = [f"c{k}" for k in range(10)]
        w = StudyWriter.open(d / "s.h5", {"class_names": classes, "probs_dtype": "float32"}, resume=False)
        st = os.statvfs(d)
        (d / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - w.headroom() - (24 << 10)))
        rng = np.random.default_rng(0)
        with pytest.raises(StudyError, match=r"s\.h5\.partial: cannot write the study file \(disk full: "):
            for _ in range(100):
                i = np.arange(w.frames_done, w.frames_done + 16)
                w.append(i, i / 4.0, rng.dirichlet(np.ones(10), 16).astype(np.float32), np.zeros(16, np.uint8))
        kept = w.frames_done
        w.close()
        assert kept > 0
        with StudyReader(partial_path(d / "s.h5"), allow_partial=True) as rd:
            assert rd.index().tolist() == list(range(kept))
    finally:
        subprocess.run(["umount", str(d)], check=False)


def test_isolation_is_entered_below_the_cli(tmp_path: Path, tiny_bundle: Any) -> None:
    """`run_recordings(isolate=True)` from Python (no command line to re-execute): the worker runs a job description,
    imports the module that registered the plug-in source (tests/capsule_doubles.py), and a native crash in it
    fails one recording while the others complete."""
    from capsule_batch.run.isolation import WorkerJob
    from capsule_batch.run.runner import EngineSpec, run_recordings, worker_job

    d = tmp_path / "in"
    d.mkdir()
    rs = [make_recording(d / n, 16, seed=k) for k, n in enumerate(["a.mp4", "b_crash.mp4"])]
    opts = RunOptions(source="test-crash", batch_size=8, progress=False)
    job = worker_job([str(r) for r in rs], tiny_bundle, tmp_path / "out", EngineSpec("torch", "cpu", "fp32"), opts,
                     {str(r): r.stem for r in rs})
    assert "capsule_doubles" in job.plugins and job.options["source"] == "test-crash"
    assert WorkerJob.read(job.write(tmp_path / "job.json")) == job
    batch = run_recordings(rs, tiny_bundle, tmp_path / "out", engine=EngineSpec("torch", "cpu", "fp32"), options=opts,
                           isolate=True)
    by = {Path(r.recording).name: r for r in batch.results}
    assert by["a.mp4"].status == "done" and by["a.mp4"].frames == 16
    assert by["b_crash.mp4"].status == "failed" and "SIGSEGV" in by["b_crash.mp4"].error
    with pytest.raises(CapsuleError, match="engine object cannot go to a worker"):
        run_recordings(rs, tiny_bundle, tmp_path / "out2", engine=object(), options=opts, isolate=True)
