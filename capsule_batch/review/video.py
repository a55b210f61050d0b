"""Full-resolution frames from the recording for the review app, frame-exact: a video file (PyAV) or a frame folder.

`open_recording` first checks that the recording is the one the study was made from (its content hash,
`capsule_batch.store.recording_identity`): a re-encoded or different recording would show a reviewer other
frames than the model saw. Video: found by the study's timestamp with `capsule_batch.sources.video.VideoFrames`
(the one single-frame reader). Frame folder: frame i is the i-th file in natural order, as the `images` source
reads it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from capsule_batch.errors import SourceError
from capsule_batch.sources.video import VideoFrames as SourceVideoFrames
from capsule_batch.store import recording_identity


def _jpeg(img: Any, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class VideoFrames(SourceVideoFrames):
    """Frames of one video file as JPEGs, found by the study's timestamps (`sources.video.VideoFrames.read_at`)."""

    def frame_jpeg(self, pts: float) -> bytes:
        """JPEG of the frame shown at `pts` seconds (the stored timestamp of a study frame)."""
        return _jpeg(self.read_at(pts).to_image())

    def jpeg(self, frame: int, pts: float) -> bytes:
        """JPEG of study frame `frame`, whose stored timestamp is `pts` (a video finds it by timestamp)."""
        return self.frame_jpeg(pts)


class FolderFrames:
    """Frames of a frame folder by number: frame i is the i-th JPEG/PNG file in natural order."""

    def __init__(self, path: str | os.PathLike):
        from capsule_batch.sources.base import list_frames

        self.path = Path(path)
        self.files = list_frames(self.path)

    def close(self) -> None:
        pass

    def jpeg(self, frame: int, pts: float) -> bytes:
        """JPEG of study frame `frame` (files carry no timestamps; `pts` is not needed)."""
        from PIL import Image

        from capsule_batch.sources.images import load_rgb

        if not 0 <= frame < len(self.files):
            raise SourceError(f"{self.path}: no frame {frame} (the folder has {len(self.files)})")
        try:
            return _jpeg(Image.fromarray(load_rgb(self.files[frame])))
        except OSError as e:
            raise SourceError(f"{self.files[frame]}: cannot read frame {frame} ({e})") from e


def open_recording(path: str | os.PathLike, study_attrs: dict[str, Any]) -> VideoFrames | FolderFrames:
    """The recording behind a study, for full-resolution frames; refused when it is not the one the study
    was made from (a different content hash than the study stores)."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"{p}: no such recording")
    want = study_attrs.get("source_hash")
    if want:
        got = recording_identity(p)["source_hash"]
        if got != want:
            made_from = study_attrs.get("source_path", "?")
            raise SourceError(f"{p}: not the recording this study was made from ({made_from}): its content hash "
                              "differs, so its frames may not be the frames that were classified")
    return FolderFrames(p) if p.is_dir() else VideoFrames(p)
