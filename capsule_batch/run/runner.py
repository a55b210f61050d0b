"""One way through: recordings -> study files. `capsule-batch run`, the demo, `bench` and the benchmark scripts
all run recordings with `run_recordings`.

Layers, as nnU-Net's entry points (files -> sources -> a stream of batches):
- `run_recordings(recordings, bundle, out_dir, engine=..., options=...)` does what every batch of recordings
  needs once: this process's shard of them (`select_shard`), the output folder's writability probe, a worker
  process when asked (capsule_batch.run.isolation: a native crash then fails one recording, not the batch), the
  bundle loaded and the engine built (`EngineSpec`, or an engine the caller built), then `Pipeline.run_many`;
- `Pipeline.run` (capsule_batch.run.pipeline) runs one recording into one study file, sequencing the stages of
  capsule_batch.run.stages (decode thread -> engine -> writer thread).
A recording is a path (video file, frame folder, `synthetic:` spec), opened with `open_source`, or a
`FrameSource` object used as it is, so that a test or a script can feed frames without registering a source.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsule_batch.errors import CapsuleError, StudyError
from capsule_batch.files import unwritable
from capsule_batch.run.pipeline import Pipeline, Recording, RunOptions, StudyResult, recording_path, study_names
from capsule_batch.sources.base import FrameSource

_logger = logging.getLogger(__name__)


@dataclass
class EngineSpec:
    """How to build a run's engine (`create_engine`'s arguments); built only where recordings are run, never in a
    supervisor process. `device` `auto` under torchrun is the GPU of LOCAL_RANK; `max_batch` None: the run's
    batch size; `options` go to the backend (compile, cuda_graphs, threads, store, rebuild)."""

    backend: str = "auto"
    device: Any = "auto"
    precision: str = "auto"
    max_batch: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, bundle: Any, batch_size: int = 64) -> Any:
        from capsule_batch.backends.select import create_engine

        return create_engine(bundle, backend=self.backend, device=run_device(self.device), precision=self.precision,
                             max_batch=self.max_batch or batch_size, **self.options)


@dataclass
class Batch:
    """What `run_recordings` did: one result per recording of this shard."""

    results: list[StudyResult]
    rank: int = 0
    world_size: int = 1
    #: this process is a worker of capsule_batch.run.isolation (its supervisor reports the results)
    worker: bool = False
    #: a worker process ended before its first recording with this exit code (it said why on stderr)
    worker_exit: int | None = None

    @property
    def failed(self) -> list[StudyResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def interrupted(self) -> list[StudyResult]:
        return [r for r in self.results if r.status == "interrupted"]

    @property
    def exit_code(self) -> int:
        """The command's exit code: 130 interrupted, 1 a recording failed (a worker: 0, its supervisor says), 0."""
        if self.worker_exit is not None:
            return self.worker_exit
        if self.interrupted:
            return 130
        return 1 if self.failed and not self.worker else 0


def run_recordings(recordings: Sequence[Recording], bundle: Any, out_dir: str | os.PathLike, *,
                   engine: Any = None, options: RunOptions | None = None, stop: threading.Event | None = None,
                   shard: tuple[int, int] = (0, 1), isolate: bool | None = False,
                   names: dict[str, str] | None = None) -> Batch:
    """Run this shard of `recordings` into OUT_DIR/<name>.h5 each (`pipeline.study_names` of all of them).

    `bundle`: a ModelBundle or its folder. `engine`: an `EngineSpec` (default: all `auto`), built here and closed
    at the end, or an engine object the caller keeps. `stop` ends the run cleanly (the CLI sets it on SIGINT).
    `isolate`: run in worker processes (capsule_batch.run.isolation: each gets a job description, not this
    process's command line); None: when the shard has more than one recording. `names`: the study names of a
    larger batch these recordings belong to (default: `pipeline.study_names` of these). Raises CapsuleError for what
    stops the whole batch (an unwritable folder, a bundle or engine that cannot load); a recording that fails
    is a failed result and the others go on."""
    from capsule_batch.run.isolation import Supervisor, worker_report

    options = options or RunOptions()
    names = names or study_names(recordings)
    stop = stop or threading.Event()
    rank, world = shard
    mine = select_shard(recordings, rank, world)
    check_writable(out_dir)
    worker = worker_report()
    if worker is None and (isolate if isolate is not None else len(mine) > 1):
        if any(isinstance(r, FrameSource) for r in mine):
            raise CapsuleError("a FrameSource object cannot go to a worker process: pass its path, or isolate=False")
        if stop.is_set():
            return Batch([StudyResult(str(r), "interrupted", error="not started: interrupted") for r in mine],
                         rank, world)
        job = worker_job([str(r) for r in mine], bundle, out_dir, engine, options, names)
        results, rc = Supervisor([str(r) for r in mine], job, out_dir, names).run()
        return Batch(results, rank, world, worker_exit=rc)
    from capsule_batch.model.bundle import ModelBundle

    if not isinstance(bundle, ModelBundle):
        bundle = ModelBundle.load(bundle)
    own = engine is None or isinstance(engine, EngineSpec)
    eng = (engine or EngineSpec()).build(bundle, options.batch_size) if own else engine
    try:
        _logger.info("rank %d/%d: %d of %d recordings", rank, world, len(mine), len(recordings))
        report, skip = worker if worker is not None else (None, 0)
        results = Pipeline(bundle, eng, options, stop, names=names).run_many(
            mine[skip:], out_dir, report=report)
    finally:
        if own:
            eng.close()
    return Batch(results, rank, world, worker=worker is not None)


def worker_job(recordings: list[str], bundle: Any, out_dir: str | os.PathLike, engine: Any, options: RunOptions,
               names: dict[str, str]) -> Any:
    """The job description a worker process runs (capsule_batch.run.isolation.WorkerJob)."""
    import json

    from capsule_batch.logs import logging_state
    from capsule_batch.run.isolation import WorkerJob, plugin_modules

    if engine is not None and not isinstance(engine, EngineSpec):
        raise CapsuleError("an engine object cannot go to a worker process: pass an EngineSpec, or isolate=False")
    spec = engine or EngineSpec()
    spec_dict = {"backend": spec.backend, "device": str(spec.device), "precision": spec.precision,
                 "max_batch": spec.max_batch, "options": spec.options}
    try:
        json.dumps(spec_dict)
    except TypeError as e:
        raise CapsuleError(f"engine options cannot go to a worker process ({e}): isolate=False") from None
    bundle_path = getattr(bundle, "path", bundle)
    return WorkerJob(recordings, str(bundle_path), str(out_dir), spec_dict, options.to_json(), names,
                     logging=logging_state(), plugins=plugin_modules(), sys_path=list(sys.path))


@contextlib.contextmanager
def open_pipeline(bundle: Any, out_dir: str | os.PathLike, *, engine: EngineSpec | None = None,
                  options: RunOptions | None = None, stop: threading.Event | None = None) -> Iterator[Pipeline]:
    """A Pipeline for recordings that are not known up front (`capsule-batch watch`): the output folder checked,
    the bundle loaded and the engine built once, closed at the end."""
    from capsule_batch.model.bundle import ModelBundle

    options = options or RunOptions()
    check_writable(out_dir)
    if not isinstance(bundle, ModelBundle):
        bundle = ModelBundle.load(bundle)
    eng = (engine or EngineSpec()).build(bundle, options.batch_size)
    try:
        yield Pipeline(bundle, eng, options, stop or threading.Event())
    finally:
        eng.close()


def output_problem(out_dir: str | os.PathLike) -> str | None:
    """Why study files cannot be written into `out_dir`, checked without creating anything (the folder, or the
    nearest folder above it that exists, must take a file); None when they can."""
    folder = Path(out_dir).absolute()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    why = unwritable(folder)
    return None if why is None else f"cannot write study files here ({why}); choose another -o folder"


def preflight(recordings: Sequence[str | os.PathLike]) -> tuple[list[str], list[StudyResult]]:
    """What can be run, found in a moment, before the bundle and engine load: (usable recordings, a failed result
    for each one that cannot be: missing, unreadable, not a video, a folder without frames), each said in the log.
    A folder that holds video files and no frames stands for those videos."""
    from capsule_batch.errors import SourceError
    from capsule_batch.sources.base import is_synthetic_spec
    from capsule_batch.sources.listing import scan_frames
    from capsule_batch.sources.video import VIDEO_SUFFIXES, probe_video

    usable: list[str] = []
    failed: list[StudyResult] = []
    for rec in map(str, recordings):
        p = Path(rec)
        try:
            if is_synthetic_spec(rec):
                usable.append(rec)
                continue
            if not p.exists():
                raise SourceError(f"{rec}: no such file or folder")
            if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
                raise SourceError(f"{rec}: not readable (permission denied)")
            if p.is_dir():
                try:
                    scan_frames(p)
                except SourceError:
                    videos = sorted(str(v) for v in p.iterdir() if v.suffix.lower() in VIDEO_SUFFIXES)
                    if not videos:
                        raise
                    _logger.info("%s: a folder of %d video file(s), no frames: running each", rec, len(videos))
                    usable += videos
                    continue
            else:
                probe_video(p)
            usable.append(rec)
        except SourceError as e:
            _logger.error("%s", e)
            failed.append(StudyResult(rec, "failed", error=str(e)))
    return usable, failed


def run_device(spec: Any) -> Any:
    """A device spec for `create_engine`; under torchrun `auto` is the GPU of this process's LOCAL_RANK."""
    from capsule_batch.devices import cuda_available, resolve_device

    if spec == "auto" and "LOCAL_RANK" in os.environ and cuda_available():
        return resolve_device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
    return resolve_device(spec if spec is None or isinstance(spec, str) else str(spec))


def check_writable(out_dir: str | os.PathLike) -> None:
    """Create `out_dir` and prove a file can be written there, before any work (capsule_batch.files.unwritable)."""
    why = unwritable(out_dir, create=True)
    if why:
        raise StudyError(f"{out_dir}: cannot write study files here ({why}); choose another -o folder")


def select_shard(recordings: Iterable[Recording], rank: int, world_size: int) -> list[Any]:
    """Recordings sorted (by path), then every `world_size`-th from `rank`: each goes to exactly one process.
    Paths come back as strings, FrameSource objects as themselves."""
    if not 0 <= rank < world_size:
        raise CapsuleError(f"shard {rank}/{world_size}: need 0 <= I < N")
    ordered = sorted(recordings, key=lambda r: str(recording_path(r)))
    return [r if isinstance(r, FrameSource) else str(r) for i, r in enumerate(ordered) if i % world_size == rank]


def parse_shard(spec: str) -> tuple[int, int]:
    """`I/N` -> (I, N); ValueError with the reason when it is not a valid shard."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError("expected I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError("need N >= 1 and 0 <= I < N")
    return i, n


def resolve_shard(spec: str | None, env: dict[str, str] | None = None) -> tuple[int, int]:
    """`--shard I/N` wins; else torchrun's RANK/WORLD_SIZE; else (0, 1)."""
    env = os.environ if env is None else env
    if spec:
        try:
            return parse_shard(spec)
        except ValueError as e:
            raise CapsuleError(f"--shard {spec!r}: {e}") from None
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", "0")), int(env["WORLD_SIZE"])
    return 0, 1


class StopOnSignals:
    """First SIGINT/SIGTERM: set `stop` (the run flushes and ends); a second SIGINT aborts at once."""

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop.set()
        sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after the current block is flushed "
                         "(Ctrl-C again to abort)\n")

    def __enter__(self) -> StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
