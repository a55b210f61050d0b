"""`decord`: CPU video decode (any FFmpeg codec) with batched sequential reads, and PyAV where decord fails.

decord indexes the whole file when it opens it, so its frame numbers and timestamps are the real ones (variable
frame rate included) and `start` is frame-exact. It reads a file by seeking, and in containers without an index
(MPEG-TS, MPEG-PS, raw elementary streams: `SEQUENTIAL_FORMATS`) its seeks are guesses: on an MPEG-TS H.264 file
with B-frames it returned the wrong picture for 39 of 40 frames without raising, or failed with "Unable to handle
EOF". Those files are decoded sequentially with PyAV (FFmpeg) from the start, as the `pyav` source does. So is a
file decord cannot open (e.g. a truncated recording: the frames before the damage are still yielded and the cut is
reported, see base.py), and a file decord stops decoding part-way through: PyAV goes on from the frame where decord
stopped, and only a frame neither can decode ends the recording. The decoder used, and why, is in
`info().extra["decoder"]` (the study's `decoder` attribute), and a switch is logged in one line.

No resize happens in the decoder: decord's scaler is not the bundle's resize (see capsule_batch/model/preprocess.py),
so frames are decoded at full size and preprocessed with `preprocess_batch`. Batches are decoded in the
thread that iterates the source (in a run: the pipeline's decode thread, capsule_batch.run.stages).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from capsule_batch.errors import MissingPackageError, SourceError
from capsule_batch.model.preprocess import Preprocess
from capsule_batch.sources.base import (
    SOURCES,
    FrameBatch,
    FrameSource,
    RecordingInfo,
    empty_pixels,
    to_pixels,
)
from capsule_batch.sources.video import Batch, check_video_path, probe_video, pyav_batches

_logger = logging.getLogger(__name__)

#: FFmpeg demuxers whose files decord's seeking cannot read reliably: decoded sequentially with PyAV instead
SEQUENTIAL_FORMATS = ("mpegts", "mpeg", "mpegvideo", "h264", "hevc", "m4v")


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
        self._reader = None
        self._closed = False
        container = str(self._info.extra.get("container") or "")
        why = ""
        if set(container.split(",")) & set(SEQUENTIAL_FORMATS):
            why = f"a {container} file, which decord cannot seek in reliably"
        else:
            try:
                self._reader = decord.VideoReader(str(self.path), ctx=decord.cpu(0), num_threads=num_threads)
            except decord.DECORDError as e:
                why = f"decord cannot open it ({_last_line(e)})"
        self._info.extra["decoder"] = "decord" if not why else f"pyav: {why}"
        if why and self.announce:
            _logger.warning("%s: %s; decoding it sequentially with PyAV (FFmpeg)", self.path, why)

    @classmethod
    def accepts(cls, path: Path) -> tuple[bool, str]:
        return check_video_path(path)

    def info(self) -> RecordingInfo:
        return self._info

    def _decord_batches(self) -> Iterator[Batch]:
        """decord's batches; where decord stops with an error, PyAV's from that frame on (see the docstring)."""
        import decord

        vr = self._reader
        n = len(vr)
        for i in range(self.start, n, self.batch_size):
            idx = list(range(i, min(i + self.batch_size, n)))
            try:
                frames = vr.get_batch(idx).asnumpy()
                pts = vr.get_frame_timestamp(idx)[:, 0].astype(np.float64)
            except decord.DECORDError as e:
                why = f"decord stopped at frame {i} ({_last_line(e)})"
                _logger.warning("%s: %s; decoding on from there with PyAV (FFmpeg)", self.path, why)
                self._info.extra["decoder"] = f"decord to frame {i - 1}, then pyav: {why}"
                yield from pyav_batches(self.path, i, self.batch_size, self._info.frame_count)
                return
            yield frames, np.asarray(idx, np.int64), pts, ()

    def __iter__(self) -> Iterator[FrameBatch]:
        if self._closed:
            raise SourceError(f"{self.path}: source is closed")
        self.frames_decoded = 0
        if self._reader is not None:
            raw = self._decord_batches()
        else:
            raw = pyav_batches(self.path, self.start, self.batch_size, self._info.frame_count)
        yield from batches_to_frames(self, raw)

    def close(self) -> None:
        self._reader = None
        self._closed = True


def _last_line(e: Exception) -> str:
    return str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__


def batches_to_frames(src: FrameSource, raw: Iterator[Batch]) -> Iterator[FrameBatch]:
    """Decoded batches (frames, index, pts, failures) as `FrameBatch`es preprocessed for `src`'s engine."""
    for frames, idx, pts, failures in raw:
        if len(idx):
            pixels = to_pixels(frames, src.preprocess, src.device, src.dtype)
        else:
            pixels = empty_pixels(src.preprocess, src.device, src.dtype)
        src.frames_decoded += len(idx)
        yield FrameBatch(pixels, idx, pts, failures)


@SOURCES.register("pyav")
class PyAVSource(FrameSource):
    """CPU video source through PyAV (FFmpeg), decoding sequentially from the first frame: every container FFmpeg
    reads, frame-exact whatever its index; a resume (`start`) decodes the frames before it again, without
    preprocessing them. What `decord` falls back to."""

    requires = ("av", "pip install av")

    def __init__(self, path: str | Path, preprocess: Preprocess, **kw: Any):
        super().__init__(path, preprocess, **kw)
        self._info = probe_video(self.path)
        self._info.extra["decoder"] = "pyav"

    @classmethod
    def accepts(cls, path: Path) -> tuple[bool, str]:
        return check_video_path(path)

    def info(self) -> RecordingInfo:
        return self._info

    def __iter__(self) -> Iterator[FrameBatch]:
        self.frames_decoded = 0
        yield from batches_to_frames(self, pyav_batches(self.path, self.start, self.batch_size,
                                                        self._info.frame_count))
