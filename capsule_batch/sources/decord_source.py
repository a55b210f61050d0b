"""`decord`: CPU video decode (any FFmpeg codec) with batched sequential reads.

decord indexes the whole file when it opens it, so its frame numbers and timestamps are the real
ones (variable frame rate included) and `start` is frame-exact. A damaged file that decord refuses
to index (typically a truncated recording) is decoded sequentially with PyAV instead, so the frames
before the damage are still yielded and the cut is reported (see base.py).

No resize happens in the decoder: decord's scaler is not the bundle's resize (see capsule_batch/preprocess.py),
so frames are decoded at full size and preprocessed with `preprocess_batch`. Batches are decoded in the
thread that iterates the source (in a run: the pipeline's decode thread, capsule_batch.stages).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from capsule_batch.errors import MissingPackageError, SourceError
from capsule_batch.preprocess import Preprocess
from capsule_batch.sources.base import (
    SOURCES,
    DecodeFailure,
    FrameBatch,
    FrameSource,
    RecordingInfo,
    empty_pixels,
    to_pixels,
)
from capsule_batch.sources.video import check_video_path, probe_video, pyav_frames

_logger = logging.getLogger(__name__)


@SOURCES.register("decord")
class DecordSource(FrameSource):
    """CPU video source; `num_threads` is decord's decoder threads (0 = FFmpeg's choice)."""

    requires = ("decord", "pip install decord")

    def __init__(self, path: str | Path, preprocess: Preprocess, *, num_threads: int = 0, **kw: Any):
        super().__init__(path, preprocess, **kw)
        try:
            import decord
        except ImportError:
            raise MissingPackageError("decord", "decord", "the decord source") from None
        self._info = probe_video(self.path)  # raises SourceError for files that are no video at all
        try:
            self._reader = decord.VideoReader(str(self.path), ctx=decord.cpu(0), num_threads=num_threads)
        except decord.DECORDError as e:
            _logger.warning("%s: decord cannot index this file (%s); decoding sequentially with PyAV",
                            self.path, str(e).strip().splitlines()[-1][:200])
            self._reader = None
        self._salvage = self._reader is None
        self._info.extra["salvage"] = self._salvage

    @classmethod
    def accepts(cls, path: Path) -> tuple[bool, str]:
        return check_video_path(path)

    def info(self) -> RecordingInfo:
        return self._info

    def _decord_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, tuple[DecodeFailure, ...]]]:
        import decord

        vr = self._reader
        n = len(vr)
        for i in range(self.start, n, self.batch_size):
            idx = list(range(i, min(i + self.batch_size, n)))
            try:
                frames = vr.get_batch(idx).asnumpy()
                pts = vr.get_frame_timestamp(idx)[:, 0].astype(np.float64)
            except decord.DECORDError as e:
                reason = f"decoding stopped: {str(e).strip().splitlines()[-1][:200]}"
                yield np.empty((0,), np.uint8), np.empty((0,), np.int64), np.empty((0,)), (
                    DecodeFailure(i, reason, final=True),)
                return
            yield frames, np.asarray(idx, np.int64), pts, ()

    def _salvage_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, tuple[DecodeFailure, ...]]]:
        buf: list[np.ndarray] = []
        idx: list[int] = []
        pts: list[float] = []
        for img, i, t in pyav_frames(self.path, self.start, self._info.frame_count):
            if img is None:
                fail = (DecodeFailure(i, str(t), final=True),)
                if buf:
                    yield np.stack(buf), np.asarray(idx, np.int64), np.asarray(pts), ()
                yield np.empty((0,), np.uint8), np.empty((0,), np.int64), np.empty((0,)), fail
                return
            buf.append(img)
            idx.append(i)
            pts.append(float(t))
            if len(buf) == self.batch_size:
                yield np.stack(buf), np.asarray(idx, np.int64), np.asarray(pts), ()
                buf, idx, pts = [], [], []
        if buf:
            yield np.stack(buf), np.asarray(idx, np.int64), np.asarray(pts), ()

    def __iter__(self) -> Iterator[FrameBatch]:
        if self._reader is None and not self._salvage:
            raise SourceError(f"{self.path}: source is closed")
        self.frames_decoded = 0
        raw = self._salvage_batches() if self._salvage else self._decord_batches()
        for frames, idx, pts, failures in raw:
            if len(idx):
                pixels = to_pixels(frames, self.preprocess, self.device, self.dtype)
            else:
                pixels = empty_pixels(self.preprocess, self.device, self.dtype)
            self.frames_decoded += len(idx)
            yield FrameBatch(pixels, idx, pts, failures)

    def close(self) -> None:
        self._reader = None
