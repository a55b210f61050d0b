"""Frames referenced inside recordings, decoded by frame number.

One small function (`read_frame`) so that it can later be switched to capsule_batch's sources. PyAV:
the frame numbers are the order of presentation timestamps (read once per video from the demuxer,
without decoding); a frame is read by seeking to the keyframe before it and decoding forward until
`frame.pts >= target` (REFERENCE.md: the first frame after a seek is usually not the target).
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np

from capsule_batch.errors import SourceError

_lock = threading.Lock()


@functools.lru_cache(maxsize=64)
def frame_pts(video: str) -> tuple[int, ...]:
    """Presentation timestamps of every frame of the first video stream, in frame order."""
    import av

    try:
        with av.open(video) as c:
            stream = c.streams.video[0]
            pts = sorted(p.pts for p in c.demux(stream) if p.pts is not None and p.size > 0)
    except (av.error.FFmpegError, IndexError, OSError) as e:
        raise SourceError(f"{video}: cannot read video ({e})") from e
    return tuple(pts)


def frame_count(video: str | Path) -> int:
    with _lock:
        return len(frame_pts(str(video)))


def read_frame(video: str | Path, index: int) -> np.ndarray:
    """Frame `index` (0-based, in presentation order) as an (H, W, 3) uint8 RGB array."""
    import av

    with _lock:
        pts = frame_pts(str(video))
    if not 0 <= index < len(pts):
        raise SourceError(f"{video}: frame {index} out of range (the video has {len(pts)} frames)")
    target = pts[index]
    try:
        with av.open(str(video)) as c:
            stream = c.streams.video[0]
            c.seek(target, stream=stream, backward=True, any_frame=False)
            for frame in c.decode(stream):
                if frame.pts is not None and frame.pts >= target:
                    return frame.to_ndarray(format="rgb24")
    except (av.error.FFmpegError, OSError) as e:
        raise SourceError(f"{video}: cannot decode frame {index} ({e})") from e
    raise SourceError(f"{video}: frame {index} (pts {target}) not found after seeking")
