"""Which files of a frame folder are frames: the one listing rule for `run`, the review, DALI and `train predict`.

A frame folder holds a recording's frames, one image file each, in natural sort order (`frame_2` before
`frame_10`). Exports put other files beside them: segmentation masks (`x_mask.png`, a `masks/` folder), label
files, CSVs, thumbnails databases. The rule:

* frame files are the image types in `FRAME_SUFFIXES` (JPEG, PNG, BMP, TIFF; case ignored);
* files whose names match an exclude pattern (`DEFAULT_EXCLUDE`: masks, labels, ground truth) are not frames;
  they are counted and named in one note;
* anything else that is not hidden (`.DS_Store`) is skipped with a warning that names it and counts it;
* a listing that walks sub-folders (`recursive=True`, as `train predict` does) never enters a folder named like
  masks or labels (`NON_FRAME_DIRS`).

`exclude` replaces the default patterns (`()` excludes nothing); patterns are shell-style (`fnmatch`), matched
against the file name without case.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsule_batch.errors import SourceError

_logger = logging.getLogger(__name__)

#: image types a frame folder may hold (what PIL decodes and `load_rgb` turns into RGB)
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
FRAME_TYPES = "JPEG, PNG, BMP or TIFF"
#: file names that mark masks, labels and ground truth, not frames (`--exclude` replaces them)
DEFAULT_EXCLUDE = ("*_mask.*", "*_masks.*", "*-mask.*", "mask_*", "*_label.*", "*_labels.*", "*_gt.*",
                   "*_groundtruth.*", "*_seg.*", "*_segmentation.*")
#: sub-folders a recursive listing never enters (compared without case)
NON_FRAME_DIRS = ("mask", "masks", "label", "labels", "annotation", "annotations", "groundtruth", "ground_truth",
                  "gt", "segmentation", "segmentations")
#: at most this many names in a warning
_NAMED = 5


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that orders `frame_2` before `frame_10` (digit runs compare as numbers)."""
    return tuple(int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name))


@dataclass
class FrameListing:
    """A frame folder's frames (`files`, natural order: frame i is `files[i]`) and what was left out."""

    folder: Path
    files: list[Path]
    excluded: list[Path] = field(default_factory=list)  # matched an exclude pattern (masks, labels)
    skipped: list[Path] = field(default_factory=list)  # not a frame file type
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE

    def names(self) -> list[str]:
        """Each frame's path relative to the folder (`/`-separated): what a study stores and shows."""
        return [p.relative_to(self.folder).as_posix() for p in self.files]

    def report(self, log: logging.Logger = _logger) -> None:
        """One warning for skipped files, one note for excluded ones, each with a count and the first names."""
        if self.skipped:
            log.warning("%s: %d file(s) skipped, not %s: %s", self.folder, len(self.skipped), FRAME_TYPES,
                        _some(self.skipped, self.folder))
        if self.excluded:
            log.info("%s: %d file(s) left out as masks or labels (--exclude %s): %s", self.folder,
                     len(self.excluded), " ".join(self.exclude) or "''", _some(self.excluded, self.folder))


def _some(paths: list[Path], folder: Path) -> str:
    names = [p.relative_to(folder).as_posix() for p in paths[:_NAMED]]
    return ", ".join(names) + (f" and {len(paths) - _NAMED} more" if len(paths) > _NAMED else "")


def is_excluded(name: str, patterns: Iterable[str]) -> bool:
    low = name.lower()
    return any(fnmatch.fnmatchcase(low, p.lower()) for p in patterns if p)


def scan_frames(folder: str | Path, exclude: Iterable[str] | None = None, *, recursive: bool = False,
                ) -> FrameListing:
    """The frames of `folder` by the module's rule; a SourceError when there are none (naming what was there)."""
    folder = Path(folder)
    patterns = DEFAULT_EXCLUDE if exclude is None else tuple(exclude)
    files: list[Path] = []
    out = FrameListing(folder, files, exclude=patterns)
    try:
        entries = sorted(folder.rglob("*") if recursive else folder.iterdir(), key=lambda p: natural_key(str(p)))
    except OSError as e:
        raise SourceError(f"{folder}: cannot list the folder ({e.strerror or e})") from None
    for p in entries:
        rel = p.relative_to(folder)
        if any(part.lower() in NON_FRAME_DIRS for part in rel.parts[:-1]) or not p.is_file():
            continue
        if any(part.startswith(".") for part in rel.parts) or p.name.lower() == "thumbs.db":
            continue
        if p.suffix.lower() not in FRAME_SUFFIXES:
            out.skipped.append(p)
        elif is_excluded(p.name, patterns):
            out.excluded.append(p)
        else:
            files.append(p)
    if not files:
        from capsule_batch.sources.video import VIDEO_SUFFIXES

        videos = [p for p in out.skipped if p.suffix.lower() in VIDEO_SUFFIXES]
        hint = (f"; it holds {len(videos)} video file(s) ({_some(videos, folder)}): give the video files "
                f"themselves, e.g. {folder}/*{videos[0].suffix}") if videos else ""
        raise SourceError(f"{folder}: no frames ({FRAME_TYPES} files) in this folder{hint}")
    return out


def list_frames(folder: str | Path, exclude: Iterable[str] | None = None) -> list[Path]:
    """The frame files of `folder` in natural order (frame i is entry i); see `scan_frames`."""
    return scan_frames(folder, exclude).files


__all__ = ["DEFAULT_EXCLUDE", "FRAME_SUFFIXES", "FRAME_TYPES", "FrameListing", "NON_FRAME_DIRS", "is_excluded",
           "list_frames", "natural_key", "scan_frames"]
