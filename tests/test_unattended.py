"""Runs nobody watches: study names that cannot collide, a finished study reused only when it answers the same
question, progress where stderr is a file, a watched inbox (real processes: a slow writer, SIGKILL, SIGTERM),
settings from the environment, and readers' decisions out to training."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from click.testing import CliRunner
from conftest import SLOW_ENGINE, TINY_SIZE, cli_cmd, cli_env, make_recording

from capsule_batch.cli import cli
from capsule_batch.run.pipeline import study_names
from capsule_batch.sources.synthesize import synthesize
from capsule_batch.study.store import StudyReader, partial_path

PIN = ("--engine", "torch", "--precision", "fp32", "--device", "cpu")


def run_cli(*args: str, code: int = 0) -> dict:
    res = CliRunner().invoke(cli, ["run", *args, *PIN, "--json"])
    assert res.exit_code == code, res.output
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "log": res.stderr}


def folder(path: Path, frames: int = 12, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return synthesize(path, frames, codec="jpg", size=TINY_SIZE, seed=seed, findings_per_1000=80.0).path


def ts_recording(path: Path, frames: int, seed: int = 0) -> Path:
    """An MPEG-TS recording (its container has no index: a file cut short still decodes up to the cut)."""
    import av

    mp4 = make_recording(path.with_suffix(".mp4"), frames, seed=seed)
    with av.open(str(mp4)) as inp, av.open(str(path), "w", format="mpegts") as out:
        s_out = out.add_stream_from_template(inp.streams.video[0])
        for pkt in inp.demux(inp.streams.video[0]):
            if pkt.dts is not None:
                pkt.stream = s_out
                out.mux(pkt)
    mp4.unlink()
    return path


# ---------------------------------------------------------------------------------------------------------------
# names


def test_study_names_cannot_collide(tmp_path: Path) -> None:
    for d in ("a/images", "b/images", "d1", "d2"):
        (tmp_path / d).mkdir(parents=True)
    a, b = tmp_path / "a/images", tmp_path / "b/images"
    v1, v2 = tmp_path / "d1/study.mp4", tmp_path / "d2/study.mp4"
    for v in (v1, v2):
        v.write_bytes(b"x")
    names = study_names([a, b, v1, v2])
    assert names == {str(a): "a_images", str(b): "b_images", str(v1): "d1__study", str(v2): "d2__study"}
    assert study_names([v1]) == {str(v1): "study"}  # a name of its own is kept


def test_two_folders_named_images_get_two_studies(tmp_path: Path, tiny_bundle: Any) -> None:
    """Before: a/images and b/images both wrote out/images.h5; the second was skipped with rc 0 and its study was
    the first one's."""
    a = folder(tmp_path / "a" / "images", seed=1)
    b = folder(tmp_path / "b" / "images", seed=2)
    out = run_cli(str(a), str(b), "-m", str(tiny_bundle.path), "-o", str(tmp_path / "out"), "--no-isolate")
    outputs = {Path(r["output"]).name: r["status"] for r in out["recordings"]}
    assert outputs == {"a_images.h5": "done", "b_images.h5": "done"}
    for name, src in (("a_images.h5", a), ("b_images.h5", b)):
        with StudyReader(tmp_path / "out" / name) as s:
            assert s.attrs["source_path"] == str(src.resolve())
    # a recording run later whose name is taken by another recording's study: refused, the study untouched
    other = folder(tmp_path / "x" / "a" / "images", seed=3)
    again = run_cli(str(other), "-m", str(tiny_bundle.path), "-o", str(tmp_path / "out"), code=1)
    (rec,) = again["recordings"]
    assert rec["status"] == "failed" and "holds the study of another recording" in rec["error"]
    with StudyReader(tmp_path / "out" / "a_images.h5") as s:
        assert s.attrs["source_path"] == str(a.resolve())


# ---------------------------------------------------------------------------------------------------------------
# reuse


def test_a_finished_study_is_reused_only_when_it_answers_the_same_question(tmp_path: Path, tiny_bundle: Any) -> None:
    (tmp_path / "new").mkdir()
    rec = make_recording(tmp_path / "r.mp4", 24, seed=4)
    out = tmp_path / "out"
    base = [str(rec), "-m", str(tiny_bundle.path), "-o", str(out)]
    assert run_cli(*base)["recordings"][0]["status"] == "done"
    same = run_cli(*base)
    assert same["recordings"][0]["status"] == "skipped" and "already done" in same["log"]
    # the triage settings changed: redone, the old study kept beside it and named in one line
    changed = run_cli(*base, "--merge-gap", "5")
    assert changed["recordings"][0]["status"] == "done"
    assert "triage settings changed (merge_gap 2 -> 5)" in changed["log"]
    kept = sorted(p.name for p in out.glob("r.*.h5"))
    assert len(kept) == 1 and kept[0] in changed["log"]
    # the recording replaced by another: redone
    os.replace(make_recording(tmp_path / "new" / "r.mp4", 30, seed=5), rec)
    replaced = run_cli(*base, "--merge-gap", "5")
    assert "the recording changed" in replaced["log"] and replaced["recordings"][0]["frames"] == 30
    # --reuse any: the old behaviour; --reuse never: always redone; --overwrite: nothing kept
    os.replace(make_recording(tmp_path / "new" / "r2.mp4", 24, seed=4), rec)
    assert run_cli(*base, "--merge-gap", "5", "--reuse", "any")["recordings"][0]["status"] == "skipped"
    assert run_cli(*base, "--merge-gap", "5", "--reuse", "never")["recordings"][0]["status"] == "done"
    n_kept = len(list(out.glob("r.*.h5")))
    assert run_cli(*base, "--merge-gap", "5", "--overwrite")["recordings"][0]["status"] == "done"
    assert len(list(out.glob("r.*.h5"))) == n_kept


def test_a_changed_bundle_redoes_the_study(tmp_path: Path, tiny_bundle: Any) -> None:
    from capsule_batch.model.bundle import ModelBundle, save_bundle

    rec = make_recording(tmp_path / "r.mp4", 16, seed=6)
    out = tmp_path / "out"
    assert run_cli(str(rec), "-m", str(tiny_bundle.path), "-o", str(out))["recordings"][0]["status"] == "done"
    b = ModelBundle.load(tiny_bundle.path)
    sd = b.create_model().state_dict()
    sd["head.bias"] = sd["head.bias"] + 1.0
    retrained = save_bundle(tmp_path / "retrained", sd, arch=b.arch, class_names=b.class_names,
                            preprocess=b.preprocess, model_args=b.model_args)
    again = run_cli(str(rec), "-m", str(retrained.path), "-o", str(out))
    assert again["recordings"][0]["status"] == "done" and "the bundle's weights changed" in again["log"]
    with StudyReader(out / "r.h5") as s:
        assert s.attrs["bundle_sha256"] == retrained.sha256


def test_a_truncated_recording_is_redone_when_the_file_has_grown(tmp_path: Path, tiny_bundle: Any) -> None:
    """Half a recording (an upload caught mid-copy) gives a short study; the complete file is redone."""
    full = ts_recording(tmp_path / "full.ts", 60, seed=7).read_bytes()
    rec = tmp_path / "in" / "r.ts"
    rec.parent.mkdir()
    rec.write_bytes(full[: len(full) // 2 // 188 * 188])
    out = tmp_path / "out"
    short = run_cli(str(rec), "-m", str(tiny_bundle.path), "-o", str(out))["recordings"][0]
    assert short["status"] == "done" and 0 < short["frames"] < 60
    rec.write_bytes(full)
    grown = run_cli(str(rec), "-m", str(tiny_bundle.path), "-o", str(out))
    assert grown["recordings"][0]["frames"] == 60 and "the recording changed" in grown["log"]


# ---------------------------------------------------------------------------------------------------------------
# logs


def test_progress_lines_where_stderr_is_a_file_and_a_json_log(tmp_path: Path, tiny_bundle: Any) -> None:
    """`run` with stderr to a file (as under cron or SLURM): plain progress lines, no bar, no terminal codes; the log
    file as JSON lines with the numbers as fields."""
    rec = make_recording(tmp_path / "r.mp4", 64, seed=8)
    log = tmp_path / "logs" / "run.jsonl"
    env = {**cli_env(), "CAPSULE_TEST_ENGINE_DELAY": "0.15"}
    with open(tmp_path / "stderr.txt", "w") as err:
        cp = subprocess.run(cli_cmd("run", str(rec), "-m", str(tiny_bundle.path), "-o", str(tmp_path / "out"),
                                    "--engine", SLOW_ENGINE, "--batch-size", "8", "--progress-every", "0.3",
                                    "--log-file", str(log), "--log-format", "json"),
                            stdout=subprocess.PIPE, stderr=err, env=env, timeout=300, text=True)
    assert cp.returncode == 0
    text = (tmp_path / "stderr.txt").read_text()
    assert "\r" not in text and "\x1b" not in text
    progress = [ln for ln in text.splitlines() if "capsule_batch.run.progress" in ln]
    assert len(progress) >= 2, text
    assert all("/64 frames (" in ln and "frames/s, ETA" in ln and "flagged" in ln for ln in progress)
    lines = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(d) for d in lines)
    prog = [d["progress"] for d in lines if "progress" in d]
    assert prog and all(p["total"] == 64 and 0 < p["done"] <= 64 for p in prog)
    (result,) = [d["result"] for d in lines if "result" in d]
    assert result["status"] == "done" and result["frames"] == 64


def test_settings_from_the_environment(tmp_path: Path, tiny_bundle: Any) -> None:
    rec = make_recording(tmp_path / "r.mp4", 16, seed=9)
    env = {"CAPSULE_BATCH_MODEL": str(tiny_bundle.path), "CAPSULE_BATCH_OUTPUT": str(tmp_path / "out"),
           "CAPSULE_BATCH_DEVICE": "cpu", "CAPSULE_BATCH_ENGINE": "torch", "CAPSULE_BATCH_PRECISION": "fp32"}
    res = CliRunner().invoke(cli, ["run", str(rec), "--json"], env=env)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "r.h5").is_file()
    helptext = CliRunner().invoke(cli, ["watch", "--help"]).output
    for var in ("CAPSULE_BATCH_MODEL", "CAPSULE_BATCH_OUTPUT", "CAPSULE_BATCH_DEVICE", "CAPSULE_BATCH_SETTLE"):
        assert var in helptext


# ---------------------------------------------------------------------------------------------------------------
# watch


def watcher(inbox: Path, out: Path, bundle: Any, *extra: str, delay: float = 0.0) -> subprocess.Popen:
    env = {**cli_env(), "CAPSULE_TEST_ENGINE_DELAY": str(delay)}
    cmd = cli_cmd("watch", str(inbox), "-m", str(bundle.path), "-o", str(out), "--engine", SLOW_ENGINE,
                  "--batch-size", "8", "--block-frames", "16", "--poll", "0.2", "--settle", "3", *extra)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(cond: Any, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def done_lines(err: str, name: str) -> list[str]:
    return [ln for ln in err.splitlines() if f"{name}: done ->" in ln]


def test_watch_waits_for_a_slowly_written_file_then_runs_it_once_and_goes_on_past_garbage(
        tmp_path: Path, tiny_bundle: Any) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    ts_recording(tmp_path / "src.ts", 48, seed=11)
    proc = watcher(inbox, out, tiny_bundle)
    try:
        (inbox / "garbage.mp4").write_bytes(os.urandom(4096))
        writer = subprocess.Popen([sys.executable, "-c", (
            "import sys, time\n"
            "data = open(sys.argv[1], 'rb').read(); step = len(data) // 8 // 188 * 188\n"
            "with open(sys.argv[2], 'wb') as f:\n"
            "    for k in range(0, len(data), step):\n"
            "        f.write(data[k:k + step]); f.flush(); time.sleep(0.5)\n"),
            str(tmp_path / "src.ts"), str(inbox / "slow.ts")])
        while writer.poll() is None:
            assert not (out / "slow.h5").exists(), "run before the file was complete"
            time.sleep(0.1)
        t_written = time.monotonic()
        wait_for(lambda: (out / "slow.h5").exists(), what="the study of slow.ts")
        assert time.monotonic() - t_written < 60
        time.sleep(1.0)  # more polls: nothing is run again
    finally:
        rc, err = stop(proc)
    assert rc == 0, err[-3000:]
    with StudyReader(out / "slow.h5") as s:
        assert len(s) == 48
    assert len(done_lines(err, "slow.ts")) == 1
    assert sum("garbage.mp4: failed" in ln for ln in err.splitlines()) == 1  # reported once, not every poll


def test_watch_killed_mid_recording_resumes_and_repeats_nothing(tmp_path: Path, tiny_bundle: Any) -> None:
    """SIGKILL while a recording is half done; files arrive while the watcher is down; the restarted watcher resumes
    the partial study, runs the new file and does not redo the finished one."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    shutil.copy(ts_recording(tmp_path / "a.ts", 24, seed=12), inbox / "first.ts")
    proc = watcher(inbox, out, tiny_bundle, delay=0.0)
    wait_for(lambda: (out / "first.h5").exists(), what="first.h5")
    rc, _ = stop(proc)
    assert rc == 0
    first_mtime = (out / "first.h5").stat().st_mtime_ns
    shutil.copy(ts_recording(tmp_path / "b.ts", 96, seed=13), inbox / "long.ts")
    proc = watcher(inbox, out, tiny_bundle, delay=0.25)
    part = partial_path(out / "long.h5")
    wait_for(part.exists, what="the partial study")
    time.sleep(2.0)  # a few blocks of 16 frames flushed
    proc.kill()
    proc.wait(timeout=30)
    assert part.exists() and not (out / "long.h5").exists()
    shutil.copy(ts_recording(tmp_path / "c.ts", 16, seed=14), inbox / "while_down.ts")
    proc = watcher(inbox, out, tiny_bundle)
    try:
        wait_for(lambda: (out / "long.h5").exists() and (out / "while_down.h5").exists(), what="both studies")
    finally:
        rc, err = stop(proc)
    assert rc == 0, err[-3000:]
    assert "resuming after frame" in err
    with StudyReader(out / "long.h5") as s:
        assert len(s) == 96 and s.index().tolist() == list(range(96)) and s.attrs.get("resumed", 0) >= 1
    assert (out / "first.h5").stat().st_mtime_ns == first_mtime and not list(out.glob("first.*.h5"))
    assert not done_lines(err, "first.ts")


def test_watch_sigterm_checkpoints_and_exits_cleanly(tmp_path: Path, tiny_bundle: Any) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    shutil.copy(ts_recording(tmp_path / "a.ts", 96, seed=15), inbox / "a.ts")
    proc = watcher(inbox, out, tiny_bundle, delay=0.25)
    wait_for(partial_path(out / "a.h5").exists, what="the partial study")
    time.sleep(1.0)
    rc, err = stop(proc, signal.SIGTERM)
    assert rc == 0, err[-3000:]
    assert "watch stopped" in err and partial_path(out / "a.h5").exists()


def test_watch_once_for_cron(tmp_path: Path, tiny_bundle: Any) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    folder(inbox / "ep1", seed=16)
    (inbox / "broken.mp4").write_bytes(b"\0" * 1000)
    res = CliRunner().invoke(cli, ["watch", str(inbox), "-m", str(tiny_bundle.path), "-o", str(out), *PIN,
                                   "--settle", "0.5", "--once"])
    assert res.exit_code == 1, res.output  # one recording failed
    assert (out / "ep1.h5").is_file()
    res = CliRunner().invoke(cli, ["watch", str(inbox / "nope"), "-m", str(tiny_bundle.path), "-o", str(out)])
    assert res.exit_code == 2 and "no such folder" in res.output


# ---------------------------------------------------------------------------------------------------------------
# decisions out, labels into training


def test_decisions_from_the_review_app_to_training(tmp_path: Path, tiny_bundle: Any) -> None:
    """The round trip: decisions made through the review app's API -> export --decisions / --labels ->
    `python -m train` reads the labels as frames inside the recording, and a short fine-tune on them runs."""
    import csv

    from capsule_batch.review.app import ReviewApp, Server
    from train.__main__ import main as train_main

    recs = [folder(tmp_path / f"ep{k}", frames=20, seed=17 + k) for k in range(3)]
    out = run_cli(*map(str, recs), "-m", str(tiny_bundle.path), "-o", str(tmp_path / "out"), "--no-isolate")
    studies = [Path(r["output"]) for r in out["recordings"]]
    events, names = [], []
    for study in studies:
        with StudyReader(study) as s:
            events.append(s.events()[0])
            names = s.class_names

    def decide(study: Path, rec: Path, body: dict) -> None:
        with Server(ReviewApp(study, rec)) as srv:
            req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/api/events/0/decision", method="POST",
                                         data=json.dumps(body).encode(),
                                         headers={"X-Token": srv.review.token, "Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                assert r.status == 200

    decide(studies[0], recs[0], {"verdict": "confirm", "reviewer": "dr a", "comment": "clear"})
    decide(studies[1], recs[1], {"verdict": "reject", "reviewer": "dr a"})
    decide(studies[2], recs[2], {"verdict": "reject", "cls": names.index("Ulcer"), "reviewer": "dr b",
                                 "comment": "an ulcer, not that"})
    exp = tmp_path / "exp"
    res = CliRunner().invoke(cli, ["export", str(studies[0].parent), "-o", str(exp), "--decisions", "--labels"])
    assert res.exit_code == 0, res.output
    with open(exp / "decisions.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["study"], r["decision"], r["reviewer"]) for r in rows] == [
        (str(studies[0]), "confirm", "dr a"), (str(studies[1]), "reject", "dr a"), (str(studies[2]), "reject", "dr b")]
    assert rows[2]["class"] == "Ulcer" and rows[1]["class"] == names[events[1].cls] and rows[2]["note"]
    assert [r["recording"] for r in rows] == [str(r.resolve()) for r in recs]
    assert all(r["peak_file"].endswith(".jpg") and r["start_s"] == "" for r in rows)
    want_labels = [names[events[0].cls], "Normal", "Ulcer"]  # confirmed; rejected: normal; rejected as an ulcer
    specs = [json.loads(ln[2:]) for ln in (exp / "datasets.yaml").read_text().splitlines() if ln.startswith("- ")]
    assert len(specs) == 3
    from train import data as D

    for study, e, label, spec, rec in zip(studies, events, want_labels, specs, recs, strict=True):
        with open(exp / f"{study.stem}.labels.csv", newline="", encoding="utf-8") as fh:
            labels = {int(r["frame"]): r["label"] for r in csv.DictReader(fh)}
        assert labels == {f: label for f in range(e.start, e.end + 1)}
        samples = D.read_spec(spec, "export")
        assert len(samples) == len(labels) and {s.label for s in samples} == {label}
        assert all(Path(s.ref).parent == rec.resolve() for s in samples)
    spec_text = ", ".join(json.dumps(sp) for sp in specs)
    run_dir = tmp_path / "ft"
    rc = train_main(["finetune", "model.arch=eva02_tiny_patch14_224",
                     f"model.model_args={{depth: 2, img_size: {TINY_SIZE}}}", "model.init=" + str(tiny_bundle.path),
                     f"data.input_size={TINY_SIZE}", f"data.resize={TINY_SIZE}", "run.workers=0", "run.device=cpu",
                     f"data.train=[{spec_text}]", f"data.val=[{spec_text}]", "data.check_images=false",
                     "data.overlap=keep", "train.epochs=1", "train.batch_size=8", f"run.dir={run_dir}"])
    assert rc == 0
    assert (run_dir / "bundle" / "model.json").is_file()
    assert np.isfinite(json.loads((run_dir / "history.jsonl").read_text().splitlines()[-1]).get("loss", 0.0))


def test_watch_takes_a_recording_when_its_marker_appears(tmp_path: Path) -> None:
    """With --marker, completeness is the uploader's word: nothing is taken before the marker, however quiet the
    file; in-progress names and the markers themselves are never recordings."""
    from capsule_batch.run.watch import Watcher, WatchOptions

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.mp4").write_bytes(b"x" * 100)
    (inbox / "b.mp4.part").write_bytes(b"x")
    (inbox / ".hidden.mp4").write_bytes(b"x")
    (inbox / "ep1").mkdir()
    w = Watcher(inbox, tmp_path / "out", pipeline=None, options=WatchOptions(settle=0.0, marker=".done"))
    assert [p.name for p in w.recordings()] == ["a.mp4", "ep1"]
    t = time.monotonic()
    assert not w.ready(inbox / "a.mp4", t + 100) and not w.ready(inbox / "ep1", t + 100)
    (inbox / "a.mp4.done").touch()
    (inbox / "ep1" / ".done").touch()
    assert [p.name for p in w.recordings()] == ["a.mp4", "ep1"]  # the marker file is not a recording
    assert w.ready(inbox / "a.mp4", t + 101) and w.ready(inbox / "ep1", t + 101)
    settle = Watcher(inbox, tmp_path / "out", pipeline=None, options=WatchOptions(settle=5.0))
    assert not settle.ready(inbox / "a.mp4", t) and not settle.ready(inbox / "a.mp4", t + 4.9)
    assert settle.ready(inbox / "a.mp4", t + 5.0)
    (inbox / "a.mp4").write_bytes(b"x" * 200)  # it changed: the settle time starts again
    assert not settle.ready(inbox / "a.mp4", t + 6.0) and settle.ready(inbox / "a.mp4", t + 11.0)
