"""What video sources share: probing the container with PyAV, and a sequential PyAV decode that salvages
the frames before the damage in a file that an indexing decoder refuses (a truncated recording)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from capsule_batch.errors import SourceError
from capsule_batch.sources.base import RecordingInfo, is_synthetic_spec


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

    Single-threaded on purpose: FFmpeg's frame threading can end quietly at damaged data instead of raising."""
    import av

    i = 0
    try:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            for frame in c.decode(s):
                if i >= start:
                    yield frame.to_ndarray(format="rgb24"), i, float(frame.time or 0.0)
                i += 1
    except av.FFmpegError as e:
        yield None, max(i, start), f"decoding stopped after {i} frames: {e.strerror or e}"
        return
    if claimed and i < claimed:
        yield None, max(i, start), f"decoding stopped after {i} of the {claimed} frames the container lists"
