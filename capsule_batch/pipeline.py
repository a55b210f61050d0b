"""Run whole recordings: source -> engine -> writer, stages overlapped, to one study file each.

Three stages talk through bounded queues (the hand-off is a `FrameBatch`, then a `_Rows` block):
- a decode thread iterates the `FrameSource` (decode + preprocessing) `prefetch` batches ahead;
- the calling thread runs the `Engine` and turns each batch into rows (frame number, pts, probs,
  status), decode failures included as rows with status decode-failed and NaN probabilities. It keeps
  `inflight` batches queued on the device: batch k+1 is launched before batch k's probabilities (copied
  to pinned host memory asynchronously) are waited for, so the GPU never idles while Python hands rows on;
- a writer thread appends rows to the `StudyWriter` in blocks of `block_frames`, each flushed.
A stage that dies puts its exception where the caller sees it within a queue timeout, so a dead
stage raises instead of hanging. The calling thread accounts for its time (`StudyResult.stage_seconds`:
in the engine, waiting for decode, waiting for the writer), which says which stage bounds a run.
Setting `stop` (the CLI does on SIGINT/SIGTERM) ends the run after the rows computed so far (those
in flight included) are flushed; the partial file then resumes from there.

After the last frame: events from the whole probability table (streamed), thumbnails of event
frames re-decoded through the source's `start=` (frame-exact), then the file is finished and renamed.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from capsule_batch.errors import CapsuleError, SourceError, StudyError
from capsule_batch.locks import check_not_in_review, run_lock
from capsule_batch.progress import Progress
from capsule_batch.sources.base import FrameBatch, FrameSource, open_source
from capsule_batch.store import (
    STATUS_DECODE_FAILED,
    STATUS_OK,
    StudyReader,
    StudyWriter,
    exit_now,
    partial_path,
    recording_identity,
)
from capsule_batch.triage import TriageConfig, compute_event_table, thumbnail_frames

_logger = logging.getLogger(__name__)

_POLL = 0.1  # seconds between checks of the other stages while waiting on a queue


@dataclass
class RunOptions:
    """Knobs of a run; the engine and bundle are given separately (built once for many recordings)."""

    source: str = "auto"
    batch_size: int = 64
    resume: bool = True
    overwrite: bool = False
    probs_dtype: str = "float16"
    block_frames: int = 4096
    prefetch: int = 4
    triage: TriageConfig | None = None
    thumbs_per_event: int = 3
    max_thumbs: int = 200
    thumb_quality: int = 85
    progress: bool | None = None
    argv: list[str] = field(default_factory=list)
    shard: str | None = None
    decode_timeout: float | None = 300.0
    engine_timeout: float | None = 300.0
    inflight: int = 2


@dataclass
class StudyResult:
    """What happened to one recording; `status` is done, skipped, failed or interrupted."""

    recording: str
    status: str
    output: str | None = None
    frames: int = 0
    flagged_frames: int = 0
    events: int = 0
    decode_failures: int = 0
    resumed_from: int = 0
    fps: float = 0.0
    seconds: float = 0.0
    error: str | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def time_split(self) -> str:
        """Where the calling thread spent the run (see `time_split`)."""
        return time_split(self.stage_seconds, self.seconds)


class _End:
    pass


_END = _End()


@dataclass
class _Failed:
    error: BaseException


@dataclass
class _Rows:
    index: np.ndarray
    pts: np.ndarray
    probs: np.ndarray
    status: np.ndarray


@dataclass
class _InFlight:
    """A batch whose engine calls are queued: `rows` without probabilities yet, and for each engine call
    its first decoded frame's position and the (host array, ready event) its probabilities arrive in."""

    rows: _Rows
    order: np.ndarray | None  # decoded frames then failures -> row order (None: no failures)
    outputs: list[tuple[int, Any, Any]]
    start: int  # first frame number, for messages
    batch: FrameBatch  # referenced until the results are in: the queued engine work reads its device memory


#: StudyResult.stage_seconds keys (where the calling thread spent a run) and how a person reads them
STAGES = {"engine": "engine", "decode_wait": "waiting for decode", "write_wait": "waiting for the writer"}


def time_split(stage_seconds: dict[str, float], seconds: float) -> str:
    """`stage_seconds` in % of a run's wall time ('' when not measured): a run mostly waiting for decode is
    decode-bound, one mostly in the engine is engine-bound."""
    if not stage_seconds or seconds <= 0:
        return ""
    return ", ".join(f"{STAGES.get(k, k)} {100 * v / seconds:.0f}%" for k, v in stage_seconds.items())


class RunInterrupted(Exception):
    """`stop` was set: rows so far are flushed and the partial file resumes from `frames_done`."""

    def __init__(self, partial: Path, frames_done: int):
        super().__init__(f"{partial}: interrupted after {frames_done} frames")
        self.partial, self.frames_done = partial, frames_done


def study_path(recording: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """OUTDIR/<stem>.h5 (a frame folder: its name; a source spec: the spec, made file-safe)."""
    p = Path(recording)
    if ":" in str(recording) and not p.exists():  # a source spec such as synthetic:frames=...: a safe file name
        return Path(out_dir) / (re.sub(r"[^A-Za-z0-9._-]+", "_", str(recording)).strip("_") + ".h5")
    stem = p.name if p.is_dir() or not p.suffix else p.stem
    return Path(out_dir) / f"{stem}.h5"


def check_writable(out_dir: str | os.PathLike) -> None:
    """Create `out_dir` and prove a file can be written there, before any work (a real write: os.access says
    yes to root on a read-only mount)."""
    import tempfile

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".capsule-write-probe-") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise StudyError(f"{out}: cannot write study files here ({e.strerror or e}); choose another -o folder") \
            from None


def select_shard(recordings: Iterable[str | os.PathLike], rank: int, world_size: int) -> list[str]:
    """Recordings sorted, then every `world_size`-th from `rank`: each goes to exactly one process."""
    if not 0 <= rank < world_size:
        raise CapsuleError(f"shard {rank}/{world_size}: need 0 <= I < N")
    return [str(r) for i, r in enumerate(sorted(str(r) for r in recordings)) if i % world_size == rank]


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


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _start_host_copy(x: Any) -> tuple[Any, Any]:
    """(host array, event): a CUDA tensor is copied into pinned memory on the current stream without
    waiting (the event marks the end of the copy); anything else is converted now (event None)."""
    if getattr(x, "is_cuda", False):
        import torch

        host = torch.empty(x.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(x, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done
    return _to_numpy(x), None


def _host_result(host: Any, done: Any) -> np.ndarray:
    if done is not None:
        done.synchronize()
        return host.numpy()
    return host


def _put(q: queue.Queue, item: Any, alive: Any) -> None:
    """Put without hanging: give up with an error when the consumer died (`alive()` false)."""
    while True:
        try:
            q.put(item, timeout=_POLL)
            return
        except queue.Full:
            if not alive():
                raise _StageDied from None


class _StageDied(Exception):
    pass


class EngineWatch:
    """Calls `on_hang(seconds)` from a watch thread when one engine call has run longer than `timeout` seconds.

    A call into TensorRT, CUDA or torch that hangs (a stuck GPU, driver or engine) cannot be interrupted from
    Python, and the engine that made it cannot be used again: the only way on is a new process. So the
    pipeline's `on_hang` reports the recording as failed and ends the process; with a worker process
    (capsule_batch.isolation) the supervisor then goes on with the next recording in a new worker, and the
    partial study resumes from its last flushed block on the next run. `timeout` None or 0: no watch."""

    def __init__(self, timeout: float | None, on_hang: Callable[[float], None]):
        self.timeout = timeout or None
        self.on_hang = on_hang
        self._since: float | None = None
        self._thread: threading.Thread | None = None

    @contextmanager
    def call(self) -> Iterator[None]:
        if self.timeout is None:
            yield
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="capsule-engine-watch", daemon=True)
            self._thread.start()
        self._since = time.monotonic()
        try:
            yield
        finally:
            self._since = None

    def _watch(self) -> None:
        assert self.timeout is not None
        while True:
            since = self._since
            if since is not None and time.monotonic() - since > self.timeout:
                self.on_hang(time.monotonic() - since)
                return
            time.sleep(min(1.0, self.timeout / 4))


class Pipeline:
    """One bundle + engine, many recordings. `stop` (a threading.Event) ends a run cleanly at the next batch."""

    def __init__(self, bundle: Any, engine: Any, options: RunOptions | None = None,
                 stop: threading.Event | None = None):
        self.bundle, self.engine = bundle, engine
        self.options = options or RunOptions()
        self.stop = stop or threading.Event()
        self.triage = self.options.triage or TriageConfig.from_bundle(bundle)
        self._watch = EngineWatch(self.options.engine_timeout, self._engine_hung)
        self._report: Callable[[str, StudyResult | None], None] | None = None
        self._active: StudyResult | None = None  # the recording being run, for _engine_hung
        self._batch_start = 0

    def _engine_hung(self, seconds: float) -> None:
        """EngineWatch's verdict: report the recording as failed, then end the process (see EngineWatch)."""
        res = self._active
        what = res.recording if res is not None else "(no recording)"
        msg = (f"{what}: the engine returned no result for {seconds:.0f} s on the batch from frame "
               f"{self._batch_start} (a hung GPU, driver or engine?); ending this process (--engine-timeout). "
               "The partial study resumes from its last flushed block when the command is run again.")
        _logger.error("%s", msg)
        if res is not None:
            res.status, res.error = "failed", msg
            if self._report is not None:
                self._report(res.recording, res)
        exit_now(1)

    # ------------------------------------------------------------------------------------------
    def run_many(self, recordings: list[str | os.PathLike], out_dir: str | os.PathLike,
                 report: Any = None) -> list[StudyResult]:
        """Each recording to its own study; a failing one is reported and the rest go on.

        `report(recording, None)` is called before and `report(recording, result)` after each one (the
        worker of capsule_batch.isolation tells its supervisor where it is)."""
        outs: dict[Path, str] = {}
        for r in recordings:
            o = study_path(r, out_dir)
            if o in outs:
                raise StudyError(f"{r} and {outs[o]} would both write {o}: rename one of them")
            outs[o] = str(r)
        results = []
        self._report = report
        try:
            for r in recordings:
                if self.stop.is_set():
                    results.append(StudyResult(str(r), "interrupted", error="not started: interrupted"))
                    continue
                if report is not None:
                    report(str(r), None)
                results.append(self.run(r, out_dir))
                if report is not None:
                    report(str(r), results[-1])
        finally:
            self._report = None
        return results

    def run(self, recording: str | os.PathLike, out_dir: str | os.PathLike) -> StudyResult:
        """One recording; errors become a failed result (with the reason), never an exception."""
        t0 = time.perf_counter()
        final = study_path(recording, out_dir)
        res = StudyResult(str(recording), "failed", output=str(final))
        self._active = res
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            with run_lock(final):
                if final.exists() and not self.options.overwrite:
                    with StudyReader(final) as rd:
                        s = rd.summary()
                    res.status, res.frames = "skipped", s["frames"]
                    res.flagged_frames, res.events = int(s["flagged_frames"] or 0), int(s["events"] or 0)
                    _logger.info("%s: already done (%s); --overwrite to redo it", recording, final)
                    return res
                self._run(Path(recording), final, res)
            res.status = "done"
        except RunInterrupted as e:
            res.status, res.output = "interrupted", str(e.partial)
            res.error = (f"interrupted after {e.frames_done} frames; the partial file {e.partial} resumes "
                         "when the same command is run again")
        except CapsuleError as e:
            res.error = str(e)
            _logger.error("%s: %s", recording, e)
        except Exception as e:  # a decoder or engine crash on one recording must not stop the others
            res.error = f"{type(e).__name__}: {e}"
            _logger.error("%s: failed: %s", recording, res.error, exc_info=_logger.isEnabledFor(logging.DEBUG))
        finally:
            self._active = None
        res.seconds = round(time.perf_counter() - t0, 3)
        if res.status != "skipped" and res.seconds > 0:
            res.fps = round((res.frames - res.resumed_from) / res.seconds, 2)
        return res

    # ------------------------------------------------------------------------------------------
    def _open_source(self, path: Path, start: int, batch_size: int | None = None) -> FrameSource:
        return open_source(path, self.bundle.preprocess, source=self.options.source,
                           batch_size=batch_size or self.options.batch_size, device=self.engine.device,
                           dtype=self.engine.dtype, start=start)

    def _identity(self, path: Path) -> dict[str, Any]:
        d = recording_identity(path)
        d.update(bundle_name=self.bundle.name, bundle_path=str(Path(self.bundle.path).resolve()),
                 bundle_sha256=self.bundle.sha256, arch=self.bundle.arch, class_names=list(self.bundle.class_names),
                 normal_class=self.bundle.normal_class, probs_dtype=self.options.probs_dtype,
                 engine=self.engine.describe(), backend=self.engine.describe().get("backend", self.engine.name),
                 precision=self.engine.describe().get("precision", ""), argv=list(self.options.argv),
                 shard=self.options.shard or "")
        return d

    def _run(self, path: Path, final: Path, res: StudyResult) -> None:
        opts = self.options
        if not path.exists() and ":" not in str(path):
            raise CapsuleError(f"{path}: no such file or folder")
        if opts.overwrite:
            check_not_in_review(final)
            for p in (final, partial_path(final)):
                p.unlink(missing_ok=True)
        writer = StudyWriter.open(final, self._identity(path), resume=opts.resume and not opts.overwrite)
        res.resumed_from = res.frames = writer.frames_done
        try:
            src = self._open_source(path, writer.frames_done)
            try:
                info = src.info()
                extra = {"source": src.name, "fps": info.fps or 0.0, "container_frame_count": info.frame_count or -1,
                         "codec": info.codec or "", "width": info.width or 0, "height": info.height or 0}
                tail = self._stream(src, writer, res, info.frame_count)
            finally:
                src.close()
            if writer.frames_done == 0:
                raise CapsuleError(f"{path}: no frames could be decoded{f' ({tail})' if tail else ''}")
            if tail:
                _logger.warning("%s: decoding stopped after frame %d: %s", path, writer.frames_done - 1, tail)
                extra["decode_tail_failure"] = tail
            if info.frame_count and info.frame_count != writer.frames_done:
                _logger.info("%s: the container claims %d frames, %d were decoded", path, info.frame_count,
                             writer.frames_done)
            events, n_flagged = compute_event_table(writer.probs_blocks(), self.triage)
            thumbs = self._thumbnails(path, thumbnail_frames(events, opts.thumbs_per_event, opts.max_thumbs))
            with_status = writer._f["frames"]["status"]
            res.decode_failures = int(sum(int((with_status[lo:lo + 65536] != STATUS_OK).sum())
                                          for lo in range(0, writer.frames_done, 65536)))
            extra["decode_failures"] = res.decode_failures
            writer.finish(events, n_flagged, self.triage, thumbs, extra)
            res.flagged_frames, res.events = n_flagged, len(events)
        finally:
            writer.close()
            if writer.frames_done == 0 and writer.partial.exists():
                writer.partial.unlink()  # nothing worth resuming (e.g. a recording that does not open)

    def _stream(self, src: FrameSource, writer: StudyWriter, res: StudyResult, total: int | None) -> str | None:
        """Decode thread -> inference here -> writer thread. Returns a tail failure reason (or None)."""
        opts = self.options
        decode_q: queue.Queue = queue.Queue(maxsize=max(1, opts.prefetch))
        write_q: queue.Queue = queue.Queue(maxsize=max(1, opts.prefetch))
        quit_decode = threading.Event()
        writer_error: list[BaseException] = []

        def decode() -> None:
            wanted = lambda: not quit_decode.is_set()  # noqa: E731
            try:
                try:
                    for batch in src:
                        if not wanted():
                            return
                        _put(decode_q, batch, wanted)
                    item: Any = _END
                except _StageDied:
                    return
                except BaseException as e:  # handed to the caller, which re-raises it
                    item = _Failed(e)
                _put(decode_q, item, wanted)
            except _StageDied:  # the consumer stopped first: nobody waits for the end marker
                pass

        def write() -> None:
            pending: list[_Rows] = []
            n = 0
            try:
                while True:
                    item = write_q.get()
                    if item is not _END:
                        pending.append(item)
                        n += len(item.index)
                    if pending and (n >= opts.block_frames or item is _END):
                        writer.append(*(np.concatenate([getattr(r, k) for r in pending])
                                        for k in ("index", "pts", "probs", "status")))
                        _logger.debug("%s: flushed frames_done=%d", writer.partial, writer.frames_done)
                        pending, n = [], 0
                    if item is _END:
                        return
            except BaseException as e:
                writer_error.append(e)

        dt = threading.Thread(target=decode, name="capsule-decode", daemon=True)
        wt = threading.Thread(target=write, name="capsule-writer", daemon=True)
        bar = Progress(total, Path(src.path).name, enabled=opts.progress)
        bar.set(writer.frames_done)
        expected = writer.frames_done
        tail: str | None = None
        last_batch = time.monotonic()
        hung = False
        interrupted = False
        pending: collections.deque[_InFlight] = collections.deque()
        clock = dict.fromkeys(STAGES, 0.0)
        depth = max(1, int(opts.inflight))

        def deliver(flight: _InFlight) -> bool:
            """Wait for a launched batch's probabilities and hand its rows to the writer (False: writer gone)."""
            rows = self._collect(flight, clock)
            if len(rows.index):
                t = time.perf_counter()
                try:
                    _put(write_q, rows, wt.is_alive)
                except _StageDied:
                    return False
                finally:
                    clock["write_wait"] += time.perf_counter() - t
                res.frames = int(rows.index[-1]) + 1
                bar.set(res.frames)
            return True

        writer_alive = True

        def drain() -> None:
            """Hand on every batch still in flight (the engine is fine: a stop, an end, a decoder failure)."""
            nonlocal writer_alive
            while pending and writer_alive and not writer_error:
                writer_alive = deliver(pending.popleft())

        dt.start()
        wt.start()
        try:
            while True:
                if self.stop.is_set():
                    interrupted = True
                    break
                if writer_error:
                    break
                t = time.perf_counter()
                try:
                    item = decode_q.get(timeout=_POLL)
                except queue.Empty:
                    clock["decode_wait"] += time.perf_counter() - t
                    if not dt.is_alive() and decode_q.empty():
                        drain()
                        raise StudyError(f"{src.path}: the decode thread ended without a result") from None
                    if opts.decode_timeout and time.monotonic() - last_batch > opts.decode_timeout:
                        hung = True
                        drain()
                        where = f"after frame {expected - 1}" if expected else "from the start"
                        raise SourceError(f"{src.path}: the decoder produced no frames for {opts.decode_timeout:g} s "
                                          f"{where} (hung?); giving up on this recording (--decode-timeout)") from None
                    continue
                clock["decode_wait"] += time.perf_counter() - t
                last_batch = time.monotonic()
                if item is _END:
                    break
                if isinstance(item, _Failed):
                    drain()
                    raise item.error
                try:
                    rows, order, tail_reason = self._layout(item, expected, src)
                except StudyError:
                    drain()
                    raise
                flight = self._launch(item, rows, order, clock)
                tail = tail or tail_reason
                if len(flight.rows.index):
                    expected = int(flight.rows.index[-1]) + 1
                pending.append(flight)
                while len(pending) >= depth and writer_alive:
                    writer_alive = deliver(pending.popleft())
                if tail or not writer_alive:
                    break
            drain()  # a normal end, a stop or a tail failure: what is already on the device is kept
        finally:
            pending.clear()
            quit_decode.set()
            try:
                _put(write_q, _END, wt.is_alive)
            except _StageDied:
                pass
            wt.join()
            dt.join(timeout=0 if hung else 10)  # a hung decoder is left behind (a daemon thread)
            bar.close()
            res.stage_seconds = {k: round(v, 3) for k, v in clock.items()}
        if writer_error:
            raise writer_error[0]
        res.frames = writer.frames_done
        if interrupted:
            raise RunInterrupted(writer.partial, writer.frames_done)
        return tail

    def _layout(self, batch: FrameBatch, expected: int, src: FrameSource) -> tuple[_Rows, np.ndarray | None,
                                                                                   str | None]:
        """The batch's rows without probabilities (decode failures merged in, frame order checked), the
        order that puts decoded frames then failures into row order (None without failures), and a tail
        failure reason (or None)."""
        n = len(batch)
        failed = sorted({f.index: f.reason for f in batch.failures if f.index >= 0}.items())
        tail = next((f.reason for f in batch.failures if f.index < 0), None)
        order = None
        if failed:
            for i, reason in failed:
                _logger.warning("%s: frame %d could not be decoded: %s", src.path, i, reason)
            idx = np.concatenate([np.asarray(batch.index, np.int64), np.array([i for i, _ in failed], np.int64)])
            order = np.argsort(idx, kind="stable")
            idx = idx[order]
            pts = np.concatenate([np.asarray(batch.pts, np.float64), np.full(len(failed), np.nan)])[order]
            status = np.concatenate([np.full(n, STATUS_OK, np.uint8), np.full(len(failed), STATUS_DECODE_FAILED,
                                                                             np.uint8)])[order]
        else:
            idx, pts = np.asarray(batch.index, np.int64), np.asarray(batch.pts, np.float64)
            status = np.full(n, STATUS_OK, np.uint8)
        if len(idx) and not np.array_equal(idx, np.arange(expected, expected + len(idx))):
            raise StudyError(f"{src.path}: source {src.name} broke the frame order: expected frames from {expected}, "
                             f"got {idx[:3].tolist()}...{idx[-1]} ({len(idx)} frames)")
        return _Rows(idx, pts, np.empty((0, 0), np.float32), status), order, tail

    def _launch(self, batch: FrameBatch, rows: _Rows, order: np.ndarray | None,
                clock: dict[str, float]) -> _InFlight:
        """Queue the batch's engine calls; their results are copied to the host without waiting."""
        n, mb = len(batch), max(1, int(self.engine.max_batch))
        start = int(rows.index[0]) if len(rows.index) else self._batch_start
        outputs = []
        t = time.perf_counter()
        self._batch_start = start
        for lo in range(0, n, mb):
            with self._watch.call():  # launching can block too (a full device queue)
                outputs.append((lo, *_start_host_copy(self.engine.infer(batch.pixels[lo:lo + mb]))))
        clock["engine"] += time.perf_counter() - t
        return _InFlight(rows, order, outputs, start, batch)

    def _collect(self, flight: _InFlight, clock: dict[str, float]) -> _Rows:
        """Wait for a launched batch's probabilities; decode failures get NaN rows."""
        c = len(self.bundle.class_names)
        decoded = len(flight.batch)
        probs = np.empty((decoded, c), np.float32)
        t = time.perf_counter()
        self._batch_start = flight.start
        for lo, host, done in flight.outputs:
            with self._watch.call():  # waiting for the device: a hang shows here
                out = _host_result(host, done)
            probs[lo:lo + len(out)] = out
        clock["engine"] += time.perf_counter() - t
        if flight.order is not None:
            nan = np.full((len(flight.rows.index) - decoded, c), np.nan, np.float32)
            probs = np.concatenate([probs, nan])[flight.order]
        flight.rows.probs = probs
        return flight.rows

    # ------------------------------------------------------------------------------------------
    def _thumbnails(self, path: Path, wanted: dict[int, list[int]]) -> list[tuple[int, int, bytes]]:
        """JPEGs of the wanted frames, re-decoded frame-exactly via `start=`; nearby frames share one pass."""
        frames = sorted(wanted)
        out: list[tuple[int, int, bytes]] = []
        i, reopen_gap = 0, 4 * self.options.batch_size
        while i < len(frames):
            before = i
            with self._open_source(path, frames[i], batch_size=min(16, self.options.batch_size)) as src:
                for batch in src:
                    for j, f in enumerate(np.asarray(batch.index).tolist()):
                        while i < len(frames) and frames[i] < f:
                            i += 1  # a wanted frame the source did not yield this time (decode failure)
                        if i < len(frames) and frames[i] == f:
                            jpeg = self._jpeg(batch.pixels[j])
                            out.extend((f, ev, jpeg) for ev in wanted[f])
                            i += 1
                    if i >= len(frames) or (len(batch) and frames[i] > int(batch.index[-1]) + reopen_gap):
                        break
            if i == before:
                i += 1
        return out

    def _jpeg(self, pixels: Any) -> bytes:
        """A preprocessed (3, S, S) frame back to RGB with the bundle's mean/std: what the model saw."""
        import io

        from PIL import Image

        pre = self.bundle.preprocess
        x = _to_numpy(pixels).transpose(1, 2, 0)
        x = (x * np.asarray(pre.std, np.float32) + np.asarray(pre.mean, np.float32)) * 255.0
        buf = io.BytesIO()
        Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=self.options.thumb_quality)
        return buf.getvalue()

