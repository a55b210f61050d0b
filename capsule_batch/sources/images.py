"""`images`: folders of frames (JPEG/PNG) in natural sort order, decoded with PIL in a small thread pool.

Frame i is the i-th file in natural order (`frame_2` before `frame_10`). Grayscale, palette, RGBA
(alpha dropped, as the reference does) and 16-bit images (scaled to 8 bits, not clipped) become RGB.
A file that fails to decode is reported with its index and the rest continue. Files carry no
timestamps: `pts` is index / `fps` when the caller knows the capture rate, else NaN.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from capsule_batch.preprocess import Preprocess
from capsule_batch.sources.base import (
    SOURCES,
    DecodeFailure,
    FrameBatch,
    FrameSource,
    RecordingInfo,
    empty_pixels,
    is_synthetic_spec,
    list_frames,
    to_pixels,
)

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


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
    timestamps."""

    def __init__(self, path: str | Path, preprocess: Preprocess, *, workers: int = 2, fps: float | None = None,
                 **kw: Any):
        super().__init__(path, preprocess, **kw)
        self.fps = fps
        self.files = list_frames(self.path)
        self.workers = max(1, int(workers))

    @classmethod
    def accepts(cls, path: Path) -> tuple[bool, str]:
        if is_synthetic_spec(path) or not path.is_dir():
            return False, "not a folder of frames (use a video source for video files)"
        return True, ""

    def info(self) -> RecordingInfo:
        from PIL import Image

        try:
            with Image.open(self.files[0]) as img:
                w, h = img.size
        except OSError:
            w = h = None
        return RecordingInfo(path=self.path, kind="frames", frame_count=len(self.files), fps=self.fps,
                             width=w, height=h, codec=self.files[0].suffix.lower().lstrip("."))

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

