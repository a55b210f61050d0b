"""What video sources share: probing the container with PyAV, a sequential PyAV decode (the `pyav` source, and what
decord falls back to), and `VideoFrames`, the one way to read single frames by frame number (the review app,
training)."""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from capsule_batch.errors import SourceError
from capsule_batch.sources.base import DecodeFailure, RecordingInfo, is_synthetic_spec

_logger = logging.getLogger(__name__)

#: file types taken for video recordings (a hint where a folder of them is given as a frame folder)
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".m2ts", ".mts", ".mpg", ".mpeg", ".vob",
                  ".wmv", ".flv", ".ogv", ".h264", ".264", ".hevc", ".h265")


def check_video_path(path: Path) -> tuple[bool, str]:
    """Cheap path checks shared by video sources' `accepts`."""
    if is_synthetic_spec(path):
        return False, "a synthetic spec, not a video file (use --source synthetic)"
    if path.is_dir():
        return False, "a folder of frames, not a video file (use --source images)"
    return True, ""


def probe_video(path: Path) -> RecordingInfo:
    """Container metadata (the frame count is the container's claim), or a SourceError naming the problem."""
    import av

    if path.is_file() and path.stat().st_size == 0:
        raise SourceError(f"{path}: empty file (0 bytes), not a video")
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise SourceError(f"{path}: no video stream in this file")
            s = c.streams.video[0]
            fps = float(s.average_rate) if s.average_rate else None
            return RecordingInfo(
                path=path, kind="video", frame_count=int(s.frames) or None, fps=fps,
                width=s.codec_context.width or None, height=s.codec_context.height or None,
                codec=s.codec_context.name,
                extra={"duration_s": float(s.duration * s.time_base) if s.duration and s.time_base else None,
                       "container": c.format.name},
            )
    except av.FFmpegError as e:
        raise SourceError(f"{path}: not a readable video ({e.strerror or e})") from None


def pyav_frames(path: Path, start: int, claimed: int | None) -> Iterator[tuple[Any, int, Any]]:
    """Decode sequentially from the first frame; yield (rgb, index, pts) for index >= start, and where decoding
    fails or ends before the `claimed` frame count, one final (None, first_missing_index, reason).

    `pts` is seconds from the stream's start time, as decord gives them (an MPEG-TS stream's clock does not start at
    0). Single-threaded on purpose: FFmpeg's frame threading can end quietly at damaged data instead of raising."""
    import av

    i = 0
    try:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            tb, t0 = s.time_base, s.start_time or 0
            for frame in c.decode(s):
                if i >= start:
                    t = float((frame.pts - t0) * tb) if frame.pts is not None and tb else float(frame.time or 0.0)
                    yield frame.to_ndarray(format="rgb24"), i, t
                i += 1
    except av.FFmpegError as e:
        yield None, max(i, start), f"decoding stopped after {i} frames: {e.strerror or e}"
        return
    if claimed and i < claimed:
        yield None, max(i, start), f"decoding stopped after {i} of the {claimed} frames the container lists"


Batch = tuple[Any, Any, Any, tuple[DecodeFailure, ...]]


def pyav_batches(path: Path, start: int, batch_size: int, claimed: int | None) -> Iterator[Batch]:
    """`pyav_frames` in batches: (frames (N,H,W,3) uint8, index, pts, failures); a failure ends the iteration."""
    import numpy as np

    buf: list[Any] = []
    idx: list[int] = []
    pts: list[float] = []
    for img, i, t in pyav_frames(path, start, claimed):
        if img is None:
            if buf:
                yield np.stack(buf), np.asarray(idx, np.int64), np.asarray(pts), ()
            yield np.empty((0,), np.uint8), np.empty((0,), np.int64), np.empty((0,)), (
                DecodeFailure(i, str(t), final=True),)
            return
        buf.append(img)
        idx.append(i)
        pts.append(float(t))
        if len(buf) == batch_size:
            yield np.stack(buf), np.asarray(idx, np.int64), np.asarray(pts), ()
            buf, idx, pts = [], [], []
    if buf:
        yield np.stack(buf), np.asarray(idx, np.int64), np.asarray(pts), ()


_pts_lock = threading.Lock()


@functools.lru_cache(maxsize=64)
def _timestamps(path: str) -> tuple[int, ...]:
    import av

    try:
        with av.open(path) as c:
            stream = c.streams.video[0]
            return tuple(sorted(p.pts for p in c.demux(stream) if p.pts is not None and p.size > 0))
    except (av.error.FFmpegError, IndexError, OSError) as e:
        raise SourceError(f"{path}: cannot read video ({e})") from e


def frame_timestamps(path: str | os.PathLike) -> tuple[int, ...]:
    """Presentation timestamps (stream time base) of every frame of the first video stream, in frame order, from
    the demuxer without decoding: frame i is the i-th in presentation order. Cached per path (64 files)."""
    with _pts_lock:
        return _timestamps(str(path))


class VideoFrames:
    """Single frames of one video file, frame-exact: one open container, reads guarded by a lock.

    A read seeks to the keyframe before the target and decodes forward to the frame whose timestamp reaches the
    target's: the first frame after a seek is usually not the target."""

    def __init__(self, path: str | os.PathLike):
        import av

        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"{self.path}: no such recording")
        try:
            self._c = av.open(str(self.path))
        except av.error.FFmpegError as e:
            raise SourceError(f"{self.path}: cannot open the recording ({e})") from e
        if not self._c.streams.video:
            self._c.close()
            raise SourceError(f"{self.path}: no video stream")
        self._s = self._c.streams.video[0]
        self._lock = threading.Lock()

    def close(self) -> None:
        self._c.close()

    def __enter__(self) -> VideoFrames:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def frame_count(self) -> int:
        return len(frame_timestamps(self.path))

    def read(self, index: int) -> Any:
        """Frame `index` (0-based, presentation order) as an av.VideoFrame."""
        import av

        pts = frame_timestamps(self.path)
        if not 0 <= index < len(pts):
            raise SourceError(f"{self.path}: frame {index} out of range (the video has {len(pts)} frames)")
        try:
            with self._lock:
                for frame in self._decode_from(pts[index]):
                    if frame.pts >= pts[index]:
                        return frame
        except (av.error.FFmpegError, OSError) as e:
            raise SourceError(f"{self.path}: cannot decode frame {index} ({e})") from e
        raise SourceError(f"{self.path}: frame {index} (pts {pts[index]}) not found after seeking")

    def _reopen(self) -> None:
        """The container opened again: decoding starts at its first packet (a seek to the first timestamp may not
        get there in MPEG-TS with B-frames, whose decode timestamps start before it)."""
        import av

        self._c.close()
        self._c = av.open(str(self.path))
        self._s = self._c.streams.video[0]

    def _decode_from(self, target: int) -> Iterator[Any]:
        """Frames (with a timestamp) decoded forward from a keyframe at or before `target` (stream time base).

        FFmpeg seeks by decode timestamps, which run ahead of presentation timestamps where there are B-frames:
        a seek to `target` can land on the keyframe just after it (seen with variable frame rate H.264). In a
        container without an index (MPEG-TS, MPEG-PS) a seek is a guess by byte position and can land after the last
        keyframe before the target, where nothing decodes until the next one. In both cases an earlier point is
        sought, twice as far back each time, until the first frame decoded is not past the target. `target` and the
        points sought are the stream's own timestamps (which need not start at 0)."""
        start = self._s.start_time or 0
        at, back = target, 1
        while True:
            if at < start:  # sought from the first timestamp and still past the target: read from the file's start
                self._reopen()
            else:
                self._c.seek(at, stream=self._s, backward=True, any_frame=False)
            frames = (f for f in self._c.decode(self._s) if f.pts is not None)
            first = next(frames, None)
            if (first is not None and first.pts <= target) or at < start:
                if first is not None:
                    yield first
                yield from frames
                return
            back = max(2 * back, (first.pts - target) if first is not None else 1)
            at = target - back if at > start else start - 1
