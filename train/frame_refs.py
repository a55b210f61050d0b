"""Frames referenced inside recordings, decoded by frame number.

Frame numbers are the order of presentation timestamps (read once per video from the demuxer, without
decoding); a frame is read with capsule_batch's single-frame reader (`capsule_batch.sources.video.VideoFrames`),
which seeks to the keyframe before it and decodes forward to it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from capsule_batch.sources.video import VideoFrames, frame_timestamps


def frame_count(video: str | Path) -> int:
    return len(frame_timestamps(video))


def read_frame(video: str | Path, index: int) -> np.ndarray:
    """Frame `index` (0-based, in presentation order) as an (H, W, 3) uint8 RGB array."""
    with VideoFrames(video) as frames:
        return frames.read(index).to_ndarray(format="rgb24")
