"""`images`: folders of frames (JPEG, PNG, BMP, TIFF) in natural sort order, decoded with PIL in a small thread pool.

Which files are frames is `capsule_batch.sources.listing`'s rule (masks and labels left out, other files skipped
with a warning); frame i is the i-th in natural order (`frame_2` before `frame_10`), and its file name is stored in
the study (`info().extra["files"]`). Grayscale, palette, RGBA (alpha dropped, as the reference does) and 16-bit
images (scaled to 8 bits, not clipped) become RGB. A file that fails to decode is reported with its index and the
rest continue. Frames of different sizes are each resized to the bundle's input; the sizes are recorded as runs
(`info().extra["frame_sizes"]`: [first frame, width, height] where the size changes) and a warning says so.
Files carry no timestamps: `pts` is index / `fps` when the capture rate is given (`--fps`), else NaN, and nothing
downstream invents a time for them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from capsule_batch.model.preprocess import Preprocess
from capsule_batch.sources.base import (
    SOURCES,
    DecodeFailure,
    FrameBatch,
    FrameSource,
    RecordingInfo,
    empty_pixels,
    is_synthetic_spec,
    to_pixels,
)
from capsule_batch.sources.listing import scan_frames

_logger = logging.getLogger(__name__)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding it; None when unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError, ValueError):
        return None


def add_size(runs: list[list[int]], frame: int, wh: tuple[int, int] | None) -> None:
    """Extend `runs` ([first frame, width, height] wherever the size changes; frames in order) by one frame."""
    if wh is not None and (not runs or runs[-1][1:] != list(wh)):
        runs.append([frame, *wh])


def load_rgb(path: Path) -> np.ndarray:
    """One frame file as (H, W, 3) uint8 RGB."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode in _SIXTEEN_BIT:
            a = np.asarray(img).astype(np.uint32)
            a = (a >> 8) if img.mode != "I" or a.max() > 255 else a
            return np.repeat(a.astype(np.uint8)[..., None], 3, axis=2)
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img, dtype=np.uint8)


@SOURCES.register("images")
class ImageFolderSource(FrameSource):
    """`workers` decode threads (PIL releases the GIL while decoding); `fps` the capture rate, if known, for
    timestamps; `exclude` the file-name patterns that are not frames (None: the listing's defaults)."""

    def __init__(self, path: str | Path, preprocess: Preprocess, *, workers: int = 2, fps: float | None = None,
                 exclude: tuple[str, ...] | None = None, **kw: Any):
        super().__init__(path, preprocess, **kw)
        self.fps = fps
        self.listing = scan_frames(self.path, exclude)
        if self.announce:
            self.listing.report()
        self.files = self.listing.files
        self.workers = max(1, int(workers))
        self._info: RecordingInfo | None = None

    @classmethod
    def accepts(cls, path: Path) -> tuple[bool, str]:
        if is_synthetic_spec(path) or not path.is_dir():
            return False, "not a folder of frames (use a video source for video files)"
        return True, ""

    def info(self) -> RecordingInfo:
        """The folder's facts; `extra["frame_sizes"]` is filled in as frames are decoded (one object per source)."""
        if self._info is None:
            w, h = _header_size(self.files[0]) or (None, None)
            types = sorted({p.suffix.lower().lstrip(".") for p in self.files})
            self._info = RecordingInfo(
                path=self.path, kind="frames", frame_count=len(self.files), fps=self.fps, width=w, height=h,
                codec="+".join(types),
                extra={"files": self.listing.names(), "excluded": len(self.listing.excluded),
                       "skipped": len(self.listing.skipped), "exclude": list(self.listing.exclude)})
        return self._info

    def _note_sizes(self, ok: list[tuple[int, np.ndarray]]) -> None:
        """Record the decoded frames' sizes as runs; warn once when a second size appears. A resumed run reads the
        sizes of the frames decoded before it from their headers."""
        info = self.info()
        if "frame_sizes" not in info.extra:
            runs = info.extra["frame_sizes"] = []
            for i in range(self.start):
                add_size(runs, i, _header_size(self.files[i]))
        runs = info.extra["frame_sizes"]
        had = len(runs)
        for i, img in ok:
            add_size(runs, i, (int(img.shape[1]), int(img.shape[0])))
        if had <= 1 < len(runs) and self.announce:
            _logger.warning("%s: frames of different sizes (%s from frame %d, %s from frame %d%s); each is resized "
                            "to the model's input, and the sizes are recorded in the study (frame_sizes)", self.path,
                            "x".join(map(str, runs[0][1:])), runs[0][0], "x".join(map(str, runs[1][1:])), runs[1][0],
                            ", ..." if len(runs) > 2 else "")

    def __iter__(self) -> Iterator[FrameBatch]:
        def load(i: int) -> tuple[int, np.ndarray | None, str]:
            try:
                return i, load_rgb(self.files[i]), ""
            except (OSError, SyntaxError, ValueError) as e:
                return i, None, f"{self.files[i].name}: cannot decode ({e})"

        failures: list[DecodeFailure] = []
        self.frames_decoded = 0
        with ThreadPoolExecutor(self.workers, thread_name_prefix="images") as pool:
            for lo in range(self.start, len(self.files), self.batch_size):
                hi = min(lo + self.batch_size, len(self.files))
                ok = []
                for i, img, why in pool.map(load, range(lo, hi)):
                    if img is None:
                        failures.append(DecodeFailure(i, why))
                    else:
                        ok.append((i, img))
                if not ok and hi < len(self.files):
                    continue  # failures ride with the next batch that has frames
                idx = np.asarray([i for i, _ in ok], np.int64)
                self._note_sizes(ok)
                self.frames_decoded += len(idx)
                yield FrameBatch(self._pixels([img for _, img in ok]), idx, self._pts(idx),
                                 tuple(failures))
                failures = []

    def _pts(self, idx: np.ndarray) -> np.ndarray:
        return idx / self.fps if self.fps else np.full(idx.shape, np.nan)

    def _pixels(self, imgs: list[np.ndarray]) -> Any:
        import torch

        if not imgs:
            return empty_pixels(self.preprocess, self.device, self.dtype)
        if all(im.shape == imgs[0].shape for im in imgs):
            return to_pixels(np.stack(imgs), self.preprocess, self.device, self.dtype)
        return torch.cat([to_pixels(im[None], self.preprocess, self.device, self.dtype) for im in imgs])

