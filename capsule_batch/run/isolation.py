"""Run the recordings of one `run` command in a worker process, so a native crash ends one recording, not the batch.

decord, FFmpeg and DALI are native code: a segfault or abort in a decoder kills the whole process, which
no `try` can catch. Moving each batch's pixels across a process boundary would cost the fast path a copy
of every frame, and a process per recording would reload the engine (seconds for TensorRT) each time.
Instead the whole pipeline (decode, engine, writer) runs unchanged in one worker process that handles the
recordings in turn and reports, per recording, when it starts and how it ended. When the worker dies, the
supervisor marks the recording it was working on as failed (naming the signal) and starts a new worker
for the rest. The cost is one process start per crash, plus one at the beginning.

The worker is entered below the command line, through a job description (`WorkerJob`, a JSON file): which
recordings, the bundle, the output folder, the engine to build (`EngineSpec`), the run's options (`RunOptions`),
the batch's study names, the logging set-up, and the modules that registered sources or backends from outside the
package (imported first, so a plug-in source runs in the worker too). `python -m capsule_batch.run.isolation JOB`
runs it; whoever calls `run_recordings(isolate=True)` (the CLI, a script, a notebook) gets the same worker.

The worker runs in its own session, so the terminal's Ctrl-C reaches only the supervisor, which forwards
SIGINT/SIGTERM to it (the worker then flushes and stops as usual; a second Ctrl-C aborts it). The worker
dies with the supervisor (PR_SET_PDEATHSIG), so a SIGKILLed run leaves no orphan writing a study.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from capsule_batch.run.pipeline import StudyResult, study_path

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


@dataclass
class WorkerJob:
    """What a worker process runs: `recordings` (this shard's, in order) of `bundle` into `out_dir` with the engine
    `engine` (EngineSpec's fields) and `options` (RunOptions.to_json); `names` the whole batch's study names;
    `logging` the supervisor's set-up (capsule_batch.logs.logging_state); `plugins` modules to import first (they
    register sources or backends), found on `sys_path`."""

    recordings: list[str]
    bundle: str
    out_dir: str
    engine: dict[str, Any]
    options: dict[str, Any]
    names: dict[str, str]
    logging: dict[str, Any] = field(default_factory=dict)
    plugins: list[str] = field(default_factory=list)
    sys_path: list[str] = field(default_factory=list)

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self)), encoding="utf-8")
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> WorkerJob:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))

    def command(self, path: Path) -> list[str]:
        """The worker's command line: this interpreter, this module, the job file."""
        return [sys.executable, "-m", "capsule_batch.run.isolation", str(path)]


def plugin_modules() -> list[str]:
    """Modules outside capsule_batch whose import registered a source or backend (a worker imports them first)."""
    from capsule_batch.backends.base import BACKENDS
    from capsule_batch.sources import SOURCES

    mods = {cls.__module__ for reg in (SOURCES, BACKENDS) for _, cls in reg.items()}
    return sorted(m for m in mods if not m.startswith("capsule_batch.") and m != "__main__")


def worker_main(argv: list[str]) -> int:
    """`python -m capsule_batch.run.isolation JOB`: run the job's recordings, reporting each (worker_report);
    0 when they ran (failures are in the report), 130 interrupted, 1 when nothing could start (said on stderr)."""
    from capsule_batch.errors import CapsuleError
    from capsule_batch.logs import apply_logging_state
    from capsule_batch.run.pipeline import RunOptions
    from capsule_batch.run.runner import EngineSpec, StopOnSignals, run_recordings

    job = WorkerJob.read(argv[0])
    sys.path[:0] = [p for p in job.sys_path if p not in sys.path]
    if job.logging:
        apply_logging_state(job.logging)
    for module in job.plugins:
        importlib.import_module(module)
    stop = threading.Event()
    try:
        with StopOnSignals(stop):
            batch = run_recordings(job.recordings, job.bundle, job.out_dir, engine=EngineSpec(**job.engine),
                                   options=RunOptions.from_json(job.options), stop=stop, isolate=False,
                                   names=job.names)
    except CapsuleError as e:
        sys.stderr.write(f"Error: {e}\n")
        return 1
    return 130 if batch.interrupted else 0


class Supervisor:
    """Start workers for `recordings` until each one has a result; `run()` returns (results, exit code or None).

    `job` is what every worker runs (its recordings are these); the exit code is not None when a worker failed
    before any recording (a bad bundle, an unusable engine): it has printed the reason itself."""

    def __init__(self, recordings: list[str], job: WorkerJob, out_dir: str | os.PathLike,
                 names: dict[str, str] | None = None):
        self.recordings = recordings
        self.out_dir = out_dir
        self.names = names  # the batch's study names (pipeline.study_names), for the results of crashed workers
        self.job = job
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
            job_file = self.job.write(Path(tmp) / "job.json")
            while skip < len(self.recordings) and not self.signals:
                report = Path(tmp) / f"worker{skip}.jsonl"
                env = dict(os.environ, **{WORKER_ENV: str(report), SKIP_ENV: str(skip)})
                self.proc = subprocess.Popen(self.job.command(job_file), env=env, start_new_session=True,
                                             preexec_fn=_die_with_parent)
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


if __name__ == "__main__":
    from capsule_batch.exits import exit_process

    exit_process(worker_main(sys.argv[1:]))
