"""`capsule-batch run` and `export` as a user runs them: subprocesses, signals, corrupt inputs, torchrun."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from conftest import ENGINE, SLOW_ENGINE, SOURCE, cli_cmd, cli_env, make_recording

from capsule_batch.study.store import StudyReader, partial_path


@pytest.fixture(scope="module")
def long_recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_recording(tmp_path_factory.mktemp("long") / "long_study.mp4", 240, seed=1)


def run_args(bundle: Any, out: Path, *recs: Path, extra: tuple[str, ...] = (), engine: str = ENGINE) -> list[str]:
    return cli_cmd("run", *map(str, recs), "-m", str(bundle.path), "-o", str(out), "--engine", engine,
                   "--source", SOURCE, "--device", "cpu", "--batch-size", "8", "--block-frames", "16",
                   "--probs-dtype", "float32", "--json", *extra)


def run(args: list[str], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=cli_env(), timeout=300, **kw)


def start_and_wait_for_flush(args: list[str], min_frames: int = 32) -> tuple[subprocess.Popen, int]:
    """Start a slowed-down run and return once a block of at least `min_frames` is flushed."""
    env = cli_env()
    env["CAPSULE_TEST_ENGINE_DELAY"] = "0.05"
    proc = subprocess.Popen([args[0], args[1], "-vv", *args[2:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"flushed frames_done=(\d+)", line)
        if m and int(m.group(1)) >= min_frames:
            return proc, int(m.group(1))
    proc.kill()
    raise AssertionError(f"run ended before flushing {min_frames} frames: rc {proc.wait()}")


def summary(cp: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in cp.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, (cp.stdout, cp.stderr[-2000:])
    return json.loads(lines[0])


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path: Path, long_recording: Path,
                                                          tiny_bundle: Any) -> None:
    out = tmp_path / "killed"
    proc, _ = start_and_wait_for_flush(run_args(tiny_bundle, out, long_recording, engine=SLOW_ENGINE))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    part = partial_path(out / "long_study.h5")
    assert part.exists() and not (out / "long_study.h5").exists()
    with h5py.File(part, "r") as f:  # the file a killed writer left opens, and holds a consistent prefix
        done = int(f.attrs["frames_done"])
        assert 32 <= done < 240 and f["frames/index"][:done].tolist() == list(range(done))
    resumed = run(run_args(tiny_bundle, out, long_recording, engine=SLOW_ENGINE))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (rec,) = summary(resumed)["recordings"]
    assert rec["status"] == "done" and rec["resumed_from"] == done and rec["frames"] == 240
    full = run(run_args(tiny_bundle, tmp_path / "full", long_recording, engine=SLOW_ENGINE))
    assert full.returncode == 0, full.stderr[-2000:]
    with StudyReader(out / "long_study.h5") as a, StudyReader(tmp_path / "full" / "long_study.h5") as b:
        assert a.index().tolist() == list(range(240))
        np.testing.assert_allclose(a.probs(), b.probs(), atol=1e-6, rtol=0)
        assert a.events() == b.events()


def test_ctrl_c_leaves_a_resumable_partial_and_exits_130(tmp_path: Path, long_recording: Path,
                                                         tiny_bundle: Any) -> None:
    out = tmp_path / "int"
    proc, flushed = start_and_wait_for_flush(run_args(tiny_bundle, out, long_recording, engine=SLOW_ENGINE))
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "resume" in stderr
    (rec,) = json.loads(stdout.strip().splitlines()[-1])["recordings"]
    assert rec["status"] == "interrupted" and "resumes" in rec["error"]
    part = partial_path(out / "long_study.h5")
    with StudyReader(part, allow_partial=True) as rd:
        assert flushed <= len(rd) < 240
        done = len(rd)
    resumed = run(run_args(tiny_bundle, out, long_recording, engine=SLOW_ENGINE))
    assert resumed.returncode == 0
    (rec,) = summary(resumed)["recordings"]
    assert rec["resumed_from"] == done and rec["frames"] == 240 and not part.exists()


@pytest.mark.cpu_choice
def test_corrupt_recording_fails_alone(tmp_path: Path, recording: Path, tiny_bundle: Any) -> None:
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(recording.read_bytes()[:300] + os.urandom(3000))
    out = tmp_path / "out"
    cp = run(run_args(tiny_bundle, out, bad, recording))
    assert cp.returncode == 1, cp.stderr[-2000:]
    s = summary(cp)
    by = {Path(r["recording"]).name: r for r in s["recordings"]}
    assert s["failed"] == 1 and by["corrupt.mp4"]["status"] == "failed" and "corrupt.mp4" in by["corrupt.mp4"]["error"]
    good = by[recording.name]
    assert good["status"] == "done" and good["frames"] == 120 and Path(good["output"]).is_file()
    assert good["fps"] > 0 and good["events"] >= 1
    assert not partial_path(out / "corrupt.h5").exists() and not (out / "corrupt.h5").exists()

    if shutil.which("h5ls") or os.environ.get("CI"):  # the CLI's own output, read by the HDF5 tools (CI has them)
        ls = subprocess.run(["h5ls", "-r", good["output"]], capture_output=True, text=True, check=True).stdout
        assert "{120/Inf, 10}" in ls
        d = subprocess.run(["h5dump", "-a", "/complete", "-a", "/frame_count", good["output"]], capture_output=True,
                           text=True, check=True).stdout
        assert "TRUE" in d and "(0): 120" in d

    again = run(run_args(tiny_bundle, out, recording))  # a finished study is skipped
    assert again.returncode == 0 and summary(again)["recordings"][0]["status"] == "skipped"

    exp = run(cli_cmd("export", good["output"], "-o", str(tmp_path / "exp"), "--json"))
    assert exp.returncode == 0, exp.stderr
    e = json.loads(exp.stdout)
    with open(e["events_csv"]) as fh:
        events = list(csv.DictReader(fh))
    with open(e["frames_csv"]) as fh:
        frames = list(csv.DictReader(fh))
    assert len(events) == good["events"] and len(frames) == 120
    assert sum(int(r["flagged"]) for r in frames) == good["flagged_frames"]
    jpgs = sorted((tmp_path / "exp" / "thumbs").glob("*.jpg"))
    assert len(jpgs) == e["thumbnails"] > 0 and jpgs[0].read_bytes()[:2] == b"\xff\xd8"


@pytest.mark.cpu_choice
def test_torchrun_processes_each_recording_once(tmp_path: Path, tiny_bundle: Any) -> None:
    recs = [make_recording(tmp_path / f"rec{i}.mp4", 12, seed=i) for i in range(4)]
    args = run_args(tiny_bundle, tmp_path / "out", *recs)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", args[1]]
    cp = run(torchrun + args[2:])
    assert cp.returncode == 0, cp.stderr[-3000:]
    sums = [json.loads(ln) for ln in cp.stdout.splitlines() if ln.startswith("{")]
    assert sorted(s["rank"] for s in sums) == [0, 1] and all(s["world_size"] == 2 for s in sums)
    done = [Path(r["recording"]).name for s in sums for r in s["recordings"] if r["status"] == "done"]
    assert sorted(done) == [f"rec{i}.mp4" for i in range(4)]  # every recording once, none twice
    for s in sums:
        for r in s["recordings"]:
            with StudyReader(r["output"]) as rd:
                assert rd.attrs["shard"] == f"{s['rank']}/2" and len(rd) == 12


@pytest.mark.cpu_choice
def test_shard_option_and_usage_errors(tmp_path: Path, tiny_bundle: Any) -> None:
    recs = [make_recording(tmp_path / f"s{i}.mp4", 8, seed=i) for i in range(3)]
    cp = run(run_args(tiny_bundle, tmp_path / "o", *recs, extra=("--shard", "1/2")))
    assert cp.returncode == 0, cp.stderr[-2000:]
    assert [Path(r["recording"]).name for r in summary(cp)["recordings"]] == ["s1.mp4"]
    for spec in ("2/2", "a/b", "0/0"):
        bad = run(run_args(tiny_bundle, tmp_path / "o", *recs, extra=("--shard", spec)))
        assert bad.returncode == 2 and "--shard" in bad.stderr and spec in bad.stderr, bad.stderr
