"""Full-resolution frames from the recording for the review app, frame-exact: a video file (PyAV) or a frame folder.

`open_recording` first checks that the recording is the one the study was made from (its content hash,
`capsule_batch.study.store.recording_identity`): a re-encoded or different recording would show a reviewer other
frames than the model saw. Video: found by frame number with `capsule_batch.sources.video.VideoFrames` (the one
single-frame reader), which numbers frames in presentation order as the run's decoders do, whatever the stream's
start time (MPEG-TS, edit lists), B-frames or frame rate: a stored timestamp is seconds from the first frame, not the
container's clock, so it cannot find a frame in a stream that does not start at 0. Frame folder: frame i is the
file the study names for it (`frames/file`), or for studies made before names were stored, the i-th file in
natural order by the listing rule of that time.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from capsule_batch.errors import SourceError
from capsule_batch.sources.video import VideoFrames as SourceVideoFrames
from capsule_batch.study.store import recording_identity


def _jpeg(img: Any, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class VideoFrames(SourceVideoFrames):
    """Frames of one video file as JPEGs, by frame number (`sources.video.VideoFrames.read`)."""

    def jpeg(self, frame: int) -> bytes:
        """JPEG of study frame `frame`."""
        return _jpeg(self.read(frame).to_image())


#: what a frame folder held for studies made before file names were stored: JPEG and PNG, nothing left out
_LEGACY_SUFFIXES = (".jpg", ".jpeg", ".png")


class FolderFrames:
    """Frames of a frame folder by number: the file the study names for frame i (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, study_attrs: dict[str, Any] | None = None,
                 files: list[str] | None = None):
        from capsule_batch.sources.listing import scan_frames

        self.path = Path(path)
        attrs = study_attrs or {}
        if files is not None:
            self.files = [self.path / f for f in files]
        elif "frame_exclude" in attrs:
            self.files = scan_frames(self.path, attrs["frame_exclude"]).files
        else:
            self.files = [p for p in scan_frames(self.path, ()).files if p.suffix.lower() in _LEGACY_SUFFIXES]

    def close(self) -> None:
        pass

    def jpeg(self, frame: int) -> bytes:
        """JPEG of study frame `frame`."""
        from PIL import Image

        from capsule_batch.sources.images import load_rgb

        if not 0 <= frame < len(self.files):
            raise SourceError(f"{self.path}: no frame {frame} (the folder has {len(self.files)})")
        try:
            return _jpeg(Image.fromarray(load_rgb(self.files[frame])))
        except OSError as e:
            raise SourceError(f"{self.files[frame]}: cannot read frame {frame} ({e})") from e


def open_recording(path: str | os.PathLike, study_attrs: dict[str, Any],
                   files: list[str] | None = None) -> VideoFrames | FolderFrames:
    """The recording behind a study, for full-resolution frames; refused when it is not the one the study
    was made from (a different content hash than the study stores). `files`: a frame folder study's file names."""
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
    return FolderFrames(p, study_attrs, files) if p.is_dir() else VideoFrames(p)
