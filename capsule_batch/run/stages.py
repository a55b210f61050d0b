"""The stages of a run and what each hands the next; `capsule_batch.run.pipeline` sequences them for one recording.

    FrameSource --FrameBatch--> DecodeStage --FrameBatch--> layout() --Layout--> EngineStage --Rows--> WriterStage
                                (decode thread)                                  (calling thread)   (writer thread)
                                                                                                     --> StudyWriter

- `DecodeStage` is the one thread a recording is decoded in: it iterates the `FrameSource` (which decodes and
  preprocesses there) at most `depth` batches ahead, behind a bounded queue. `next()` hands the batches on in
  order; a decoder that raises raises there, one that yields nothing for `timeout` seconds is a SourceError.
- `layout()` makes a batch's rows without probabilities: frames that failed to decode become rows with status
  decode-failed (NaN probabilities later), in frame order, and the order is checked. A final failure (decoding
  stopped: a truncated or damaged recording) is no row: it ends the recording, with its reason as the tail.
- `EngineStage` runs in the calling thread. A batch's frames go to the engine in calls of at most
  `engine.max_batch` (`backends.base.chunks`), each watched by `EngineWatch`, each result copied to host memory
  without waiting; a batch's `Rows` (probabilities in) are handed on once `inflight` batches are queued behind
  it, so the device is never idle while Python hands rows on.
- `WriterStage` is the writer thread: it appends `Rows` to the `StudyWriter` in blocks of `block_frames`, each
  flushed (the most a crash can lose), behind a bounded queue; closing it flushes the rest.
A stage that dies is seen at the next call into it (within `POLL` seconds), so a run raises instead of hanging.
Each stage adds up the calling thread's time spent in or waiting for it (`seconds`): what bounds a run.
`thumbnails()` is the finishing pass: event frames decoded again through the source's `start=`.
"""

from __future__ import annotations

import collections
import io
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from capsule_batch.backends.base import chunks
from capsule_batch.errors import SourceError, StudyError
from capsule_batch.model.preprocess import Preprocess, to_rgb
from capsule_batch.sources.base import FrameBatch, FrameSource
from capsule_batch.sources.prefetch import END, Prefetcher, WorkerDied
from capsule_batch.study.schema import FRAME_DATASETS, STATUS_DECODE_FAILED, STATUS_OK
from capsule_batch.study.store import StudyWriter

_logger = logging.getLogger(__name__)

POLL = 0.1  # seconds between checks of the other stages while waiting on a queue


@dataclass
class Rows:
    """Study rows of consecutive frames: frame numbers, pts, probabilities (N, C) float32 (empty until the engine
    stage fills them in) and status (ok / decode-failed)."""

    index: np.ndarray
    pts: np.ndarray
    probs: np.ndarray
    status: np.ndarray

    def __len__(self) -> int:
        return int(self.index.shape[0])


@dataclass
class Layout:
    """A decoded batch's rows (decode failures included) and how its frames map onto them."""

    rows: Rows
    order: np.ndarray | None  # decoded frames then failures -> row order (None: no failures)
    tail: str | None  # decoding stopped after these rows: why (a final DecodeFailure)


# ------------------------------------------------------------------------------------------------------------
class DecodeStage:
    """The decode thread: iterates `source` at most `depth` batches ahead of the engine (see the module docstring)."""

    def __init__(self, source: FrameSource, depth: int, timeout: float | None):
        self.source = source
        self.timeout = timeout or None
        self.seconds = 0.0  # the calling thread's time waiting for decoded batches
        self.finished = False  # the source was exhausted
        self.hung = False
        self._position = source.start  # the next frame expected, for messages
        self._last = time.monotonic()
        self._thread = Prefetcher(lambda: iter(source), depth, name="capsule-decode")

    def next(self, stop: threading.Event) -> FrameBatch | None:
        """The next batch; None at the end of the recording, or when `stop` is set while waiting."""
        t = time.perf_counter()
        try:
            while not stop.is_set():
                try:
                    item = self._thread.get(timeout=POLL)
                except queue.Empty:
                    if self.timeout and time.monotonic() - self._last > self.timeout:
                        self.hung = True
                        where = f"after frame {self._position - 1}" if self._position else "from the start"
                        raise SourceError(f"{self.source.path}: the decoder produced no frames for {self.timeout:g} s "
                                          f"{where} (hung?); giving up on this recording (--decode-timeout)") from None
                    continue
                except WorkerDied:
                    raise StudyError(f"{self.source.path}: the decode thread ended without a result") from None
                self._last = time.monotonic()
                if item is END:
                    self.finished = True
                    return None
                ends = [int(item.index[-1]) + 1] if len(item) else []
                self._position = max([self._position, *ends, *(f.index + 1 for f in item.failures if f.index >= 0)])
                return item
            return None
        finally:
            self.seconds += time.perf_counter() - t

    def close(self) -> None:
        """Stop the thread; a hung decoder is left behind (a daemon thread)."""
        self._thread.close(timeout=0 if self.hung else 10)


def layout(batch: FrameBatch, expected: int, source: FrameSource) -> Layout:
    """The batch's rows without probabilities, from frame `expected` on (see the module docstring)."""
    n = len(batch)
    final = [f for f in batch.failures if f.final or f.index < 0]
    failed = sorted({f.index: f.reason for f in batch.failures if not (f.final or f.index < 0)}.items())
    order = None
    if failed:
        for i, reason in failed:
            _logger.warning("%s: frame %d could not be decoded: %s", source.path, i, reason)
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
        raise StudyError(f"{source.path}: source {source.name} broke the frame order: expected frames from "
                         f"{expected}, got {idx[:3].tolist()}...{idx[-1]} ({len(idx)} frames)")
    return Layout(Rows(idx, pts, np.empty((0, 0), np.float32), status), order, final[0].reason if final else None)


# ------------------------------------------------------------------------------------------------------------
class EngineWatch:
    """Calls `on_hang(seconds, first_frame)` from a watch thread when one engine call has run longer than
    `timeout` seconds.

    A call into TensorRT, CUDA or torch that hangs (a stuck GPU, driver or engine) cannot be interrupted from
    Python, and the engine that made it cannot be used again: the only way on is a new process. So the
    pipeline's `on_hang` reports the recording as failed and ends the process; with a worker process
    (capsule_batch.run.isolation) the supervisor then goes on with the next recording in a new worker, and the
    partial study resumes from its last flushed block on the next run. `timeout` None or 0: no watch."""

    def __init__(self, timeout: float | None, on_hang: Callable[[float, int], None]):
        self.timeout = timeout or None
        self.on_hang = on_hang
        self._since: float | None = None
        self._frame = 0
        self._thread: threading.Thread | None = None

    @contextmanager
    def call(self, first_frame: int) -> Iterator[None]:
        """Watch one engine call (or one wait for its result) on the batch from `first_frame`."""
        self._frame = first_frame
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
                self.on_hang(time.monotonic() - since, self._frame)
                return
            time.sleep(min(1.0, self.timeout / 4))


@dataclass
class _InFlight:
    """A batch whose engine calls are queued: its layout, and for each call the first decoded frame's position and
    the (host array, ready event) its probabilities arrive in."""

    layout: Layout
    outputs: list[tuple[int, Any, Any]]
    start: int  # first frame number, for messages
    batch: FrameBatch  # referenced until the results are in: the queued engine work reads its device memory


class EngineStage:
    """Batches in, `Rows` with probabilities out, `inflight` batches queued on the device (module docstring)."""

    def __init__(self, engine: Any, n_classes: int, inflight: int, watch: EngineWatch):
        self.engine, self.n_classes, self.watch = engine, n_classes, watch
        self.depth = max(1, int(inflight))
        self.seconds = 0.0  # the calling thread's time launching engine calls and waiting for their results
        self._pending: collections.deque[_InFlight] = collections.deque()
        self._start = 0

    def launch(self, batch: FrameBatch, lay: Layout) -> None:
        """Queue the batch's engine calls; their results are copied to the host without waiting."""
        if len(lay.rows):
            self._start = int(lay.rows.index[0])
        outputs = []
        t = time.perf_counter()
        if getattr(batch.pixels, "is_cuda", False):
            import torch

            # the batch may have been made on the decode thread's stream: tell the caching allocator it is read here
            batch.pixels.record_stream(torch.cuda.current_stream(batch.pixels.device))
        for lo, hi in chunks(len(batch), self.engine):
            with self.watch.call(self._start):  # launching can block too (a full device queue)
                outputs.append((lo, *_start_host_copy(self.engine.infer(batch.pixels[lo:hi]))))
        self.seconds += time.perf_counter() - t
        self._pending.append(_InFlight(lay, outputs, self._start, batch))

    def ready(self) -> Iterator[Rows]:
        """Rows of the oldest batches, as long as `inflight` batches are queued."""
        while len(self._pending) >= self.depth:
            yield self._collect(self._pending.popleft())

    def drain(self) -> Iterator[Rows]:
        """Rows of every batch still queued (a normal end, a stop, a decoder failure: the engine is fine)."""
        while self._pending:
            yield self._collect(self._pending.popleft())

    def _collect(self, flight: _InFlight) -> Rows:
        """Wait for a launched batch's probabilities; decode failures get NaN rows."""
        decoded = len(flight.batch)
        probs = np.empty((decoded, self.n_classes), np.float32)
        t = time.perf_counter()
        for lo, host, done in flight.outputs:
            with self.watch.call(flight.start):  # waiting for the device: a hang shows here
                out = _host_result(host, done)
            probs[lo:lo + len(out)] = out
        self.seconds += time.perf_counter() - t
        rows, order = flight.layout.rows, flight.layout.order
        if order is not None:
            nan = np.full((len(rows) - decoded, self.n_classes), np.nan, np.float32)
            probs = np.concatenate([probs, nan])[order]
        rows.probs = probs
        return rows

    def close(self) -> None:
        self._pending.clear()


def _start_host_copy(x: Any) -> tuple[Any, Any]:
    """(host array, event): a CUDA tensor is copied into pinned memory on the current stream without
    waiting (the event marks the end of the copy); anything else is converted now (event None)."""
    if getattr(x, "is_cuda", False):
        import torch

        host = torch.empty(x.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(x, non_blocking=True)
        # blocking: the collecting thread sleeps in the driver until the copy is done (a default event's synchronize
        # spins a CPU core, which on a GPU machine is a core taken from decoding)
        done = torch.cuda.Event(blocking=True)
        done.record(torch.cuda.current_stream(x.device))  # the stream the copy was queued on, on x's GPU
        return host, done
    return _to_numpy(x), None


def _host_result(host: Any, done: Any) -> np.ndarray:
    if done is not None:
        done.synchronize()
        return host.numpy()
    return host


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


# ------------------------------------------------------------------------------------------------------------
_END = object()


class WriterStage:
    """The writer thread: `Rows` in, blocks of `block_frames` rows appended to `writer`, each flushed."""

    def __init__(self, writer: StudyWriter, block_frames: int, depth: int):
        self.writer, self.block_frames = writer, block_frames
        self.seconds = 0.0  # the calling thread's time waiting for room in the queue
        self.error: BaseException | None = None  # why the writer thread died
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._thread = threading.Thread(target=self._run, name="capsule-writer", daemon=True)
        self._thread.start()

    def put(self, rows: Rows) -> bool:
        """Hand rows to the writer thread; False when it has died (its exception is in `error`)."""
        t = time.perf_counter()
        try:
            return self.error is None and _put(self._queue, rows, self._thread.is_alive)
        finally:
            self.seconds += time.perf_counter() - t

    def close(self) -> None:
        """Flush the rows not yet written and wait for the thread."""
        _put(self._queue, _END, self._thread.is_alive)
        self._thread.join()

    def _run(self) -> None:
        pending: list[Rows] = []
        n = 0
        try:
            while True:
                item = self._queue.get()
                if item is not _END:
                    pending.append(item)
                    n += len(item)
                if pending and (n >= self.block_frames or item is _END):
                    self.writer.append(*(np.concatenate([getattr(r, k) for r in pending])
                                         for k in FRAME_DATASETS))
                    _logger.debug("%s: flushed frames_done=%d", self.writer.partial, self.writer.frames_done)
                    pending, n = [], 0
                if item is _END:
                    return
        except BaseException as e:  # handed to the sequencer, which raises it
            self.error = e


def _put(q: queue.Queue, item: Any, alive: Callable[[], bool]) -> bool:
    """Put without hanging: False when the consumer died (`alive()` false) while the queue was full."""
    while True:
        try:
            q.put(item, timeout=POLL)
            return True
        except queue.Full:
            if not alive():
                return False


# ------------------------------------------------------------------------------------------------------------
def thumbnails(open_at: Callable[[int, int], FrameSource], wanted: dict[int, list[int]], pre: Preprocess,
               batch_size: int, quality: int) -> list[tuple[int, int, bytes]]:
    """(frame, event, JPEG) of the wanted frames (frame -> its events), decoded again frame-exactly through
    `open_at(start, batch_size)`; nearby frames share one pass, a gap of more than 4 batches opens the source again."""
    from PIL import Image

    frames = sorted(wanted)
    out: list[tuple[int, int, bytes]] = []
    i, reopen_gap = 0, 4 * batch_size
    while i < len(frames):
        before = i
        with open_at(frames[i], min(16, batch_size)) as src:
            for batch in src:
                for j, f in enumerate(np.asarray(batch.index).tolist()):
                    while i < len(frames) and frames[i] < f:
                        i += 1  # a wanted frame the source did not yield this time (decode failure)
                    if i < len(frames) and frames[i] == f:
                        buf = io.BytesIO()
                        Image.fromarray(to_rgb(batch.pixels[j], pre)).save(buf, "JPEG", quality=quality)
                        out.extend((f, ev, buf.getvalue()) for ev in wanted[f])
                        i += 1
                if i >= len(frames) or (len(batch) and frames[i] > int(batch.index[-1]) + reopen_gap):
                    break
        if i == before:
            i += 1
    return out
