"""Full-resolution frames from the recording for the review app, frame-exact: a video file (PyAV) or a frame folder.

`open_recording` first checks that the recording is the one the study was made from (its content hash,
`capsule_batch.store.recording_identity`): a re-encoded or different recording would show a reviewer other
frames than the model saw. Video: a seek lands on the keyframe before the target; frames are then decoded
forward until one whose timestamp reaches the target's (REFERENCE.md: the first frame after a seek is
usually not it). Frame folder: frame i is the i-th file in natural order, as the `images` source reads it.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from fractions import Fraction
from pathlib import Path
from typing import Any

from capsule_batch.errors import SourceError
from capsule_batch.store import recording_identity

_logger = logging.getLogger(__name__)


def _jpeg(img: Any, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class VideoFrames:
    """Decode single frames of one video file by timestamp; one open container, guarded by a lock."""

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
            raise SourceError(f"{self.path}: no video stream")
        self._s = self._c.streams.video[0]
        self._lock = threading.Lock()

    def close(self) -> None:
        self._c.close()

    def frame_jpeg(self, pts: float) -> bytes:
        """JPEG of the frame shown at `pts` seconds (the stored timestamp of a study frame)."""
        with self._lock:
            return _jpeg(self._decode_at(pts))

    def jpeg(self, frame: int, pts: float) -> bytes:
        """JPEG of study frame `frame`, whose stored timestamp is `pts` (a video finds it by timestamp)."""
        return self.frame_jpeg(pts)

    def _decode_at(self, pts: float) -> Any:
        tb = self._s.time_base or Fraction(1, 90000)
        rate = self._s.average_rate or self._s.guessed_rate or 30
        half = float(1 / (2 * Fraction(rate)))  # tolerance: half a frame interval
        target = int(pts / tb)
        self._c.seek(max(0, target), stream=self._s, backward=True, any_frame=False)
        last = None
        for frame in self._c.decode(self._s):
            if frame.pts is None:
                continue
            t = float(frame.pts * tb)
            if t >= pts - half:
                if t > pts + half and last is not None:
                    _logger.debug("%s: no frame at %.4f s; showing %.4f s", self.path, pts, float(last.pts * tb))
                    return last.to_image()
                return frame.to_image()
            last = frame
        if last is None:
            raise SourceError(f"{self.path}: no frame at {pts:.3f} s")
        return last.to_image()


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
