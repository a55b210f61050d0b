"""Run the recordings of one `run` command in a worker process, so a native crash ends one recording, not the batch.

decord, FFmpeg and DALI are native code: a segfault or abort in a decoder kills the whole process, which
no `try` can catch. Moving each batch's pixels across a process boundary would cost the fast path a copy
of every frame, and a process per recording would reload the engine (seconds for TensorRT) each time.
Instead the whole pipeline (decode, engine, writer) runs unchanged in one worker process that handles the
recordings in turn and reports, per recording, when it starts and how it ended. When the worker dies, the
supervisor marks the recording it was working on as failed (naming the signal) and starts a new worker
for the rest. The cost is one process start per crash, plus one at the beginning.

The worker runs in its own session, so the terminal's Ctrl-C reaches only the supervisor, which forwards
SIGINT/SIGTERM to it (the worker then flushes and stops as usual; a second Ctrl-C aborts it). The worker
dies with the supervisor (PR_SET_PDEATHSIG), so a SIGKILLed run leaves no orphan writing a study.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capsule_batch.pipeline import StudyResult, study_path

_logger = logging.getLogger(__name__)

#: set in the worker's environment: the file it appends JSON lines to, and how many recordings it skips
WORKER_ENV = "CAPSULE_RUN_WORKER"
SKIP_ENV = "CAPSULE_RUN_SKIP"


def worker_report() -> tuple[Callable[[str, StudyResult | None], None], int] | None:
    """In a worker: (report(recording, result-or-None-at-start), recordings to skip); None in a normal run."""
    path = os.environ.get(WORKER_ENV)
    if not path:
        return None

    def report(recording: str, result: StudyResult | None) -> None:
        line = {"start": recording} if result is None else {"result": result.to_json()}
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())

    return report, int(os.environ.get(SKIP_ENV, "0"))


def _die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGKILL to the worker when the supervisor dies."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _read_report(path: Path) -> tuple[list[str], dict[str, StudyResult]]:
    started: list[str] = []
    results: dict[str, StudyResult] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the crash
            if "start" in d:
                started.append(d["start"])
            elif "result" in d:
                r = StudyResult(**d["result"])
                results[r.recording] = r
    return started, results


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


class Supervisor:
    """Start workers for `recordings` until each one has a result; `run()` returns (results, exit code or None).

    `argv` is the worker's command line (the same `run` command); the exit code is not None when a worker
    failed before any recording (a bad bundle, an unusable engine): it has printed the reason itself."""

    def __init__(self, recordings: list[str], argv: list[str], out_dir: str | os.PathLike,
                 names: dict[str, str] | None = None):
        self.recordings = recordings
        self.out_dir = out_dir
        self.names = names  # the batch's study names (pipeline.study_names), for the results of crashed workers
        self.argv = argv
        self.proc: subprocess.Popen | None = None
        self.signals: list[int] = []

    def _forward(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def run(self) -> tuple[list[StudyResult], int | None]:
        old = {s: signal.signal(s, self._forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._loop()
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _loop(self) -> tuple[list[StudyResult], int | None]:
        results: dict[str, StudyResult] = {}
        skip = 0
        with tempfile.TemporaryDirectory(prefix="capsule-run-") as tmp:
            while skip < len(self.recordings) and not self.signals:
                report = Path(tmp) / f"worker{skip}.jsonl"
                env = dict(os.environ, **{WORKER_ENV: str(report), SKIP_ENV: str(skip)})
                self.proc = subprocess.Popen(self.argv, env=env, start_new_session=True, preexec_fn=_die_with_parent)
                while True:
                    try:  # a timed wait: a signal the kernel hands to another thread of this process
                        rc = self.proc.wait(timeout=0.5)  # runs its Python handler only when this thread wakes
                        break
                    except subprocess.TimeoutExpired:
                        continue
                started, done = _read_report(report)
                results.update(done)
                if not started and rc != 0:
                    return list(results.values()), rc
                crashed = [r for r in started if r not in done]
                if crashed and not self.signals:
                    rec = crashed[0]
                    why = (f"killed by {_signal_name(rc)}" if rc < 0 else f"exited with code {rc}")
                    out = study_path(rec, self.out_dir, self.names)
                    results[rec] = StudyResult(rec, "failed", output=str(out), error=(
                        f"{rec}: the worker process died while processing it ({why}: a crash in native decoder "
                        "or engine code); the other recordings go on, and a partial study resumes on the next run"))
                    _logger.error("%s", results[rec].error)
                skip = self.recordings.index(started[-1]) + 1 if started else len(self.recordings)
                if any(r.status == "interrupted" for r in done.values()):
                    break
        out = []
        for r in self.recordings:
            out.append(results.get(r) or StudyResult(r, "interrupted", error="not started: interrupted"))
        return out, None


def worker_argv() -> list[str]:
    """This process's own command line, to start a worker running the same command."""
    return [sys.executable, *sys.orig_argv[1:]]
