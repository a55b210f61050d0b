"""`synthetic`: a recording that needs no file, for benchmarks and scale tests.

The "path" is a spec such as `synthetic:frames=1000000,size=336,seed=0` (optional `fps`, `pool`).
A small pool of frames is rendered once with `capsule_batch.sources.synthesize.Scene` and preprocessed once;
batches are views into that pool (frame i shows pool frame i % pool), so a frame costs almost
nothing and the source measures everything downstream of decode. Index and pts are exact and
contiguous like a real recording's. Batches share memory with the pool: do not modify them in place.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from capsule_batch.errors import SourceError
from capsule_batch.model.preprocess import Preprocess
from capsule_batch.sources.base import (
    SOURCES,
    SYNTHETIC_PREFIX,
    FrameBatch,
    FrameSource,
    RecordingInfo,
    is_synthetic_spec,
    to_pixels,
)

_DEFAULTS: dict[str, float] = {"frames": 1000, "size": 336, "seed": 0, "fps": 4.0, "pool": 32}


def parse_spec(spec: str) -> dict[str, float]:
    """`synthetic:frames=N,size=PX,seed=S,fps=F,pool=P` -> values (defaults for what is left out)."""
    body = str(spec)[len(SYNTHETIC_PREFIX):]
    out = dict(_DEFAULTS)
    for item in filter(None, (x.strip() for x in body.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in _DEFAULTS:
            raise SourceError(f"{spec}: bad synthetic spec item {item!r} (keys: {', '.join(_DEFAULTS)})")
        try:
            out[key] = float(value) if key == "fps" else int(value)
        except ValueError:
            raise SourceError(f"{spec}: {key} must be a number, got {value!r}") from None
    if out["frames"] < 1 or out["pool"] < 1 or out["fps"] <= 0:
        raise SourceError(f"{spec}: frames and pool must be >= 1 and fps > 0")
    if not 32 <= out["size"] <= 2048 or int(out["size"]) % 2:
        raise SourceError(f"{spec}: size must be an even number in 32..2048")
    return out


@SOURCES.register("synthetic")
class SyntheticSource(FrameSource):
    def __init__(self, path: str | Path, preprocess: Preprocess, **kw: Any):
        super().__init__(path, preprocess, **kw)
        self.spec = parse_spec(str(path))
        self.frames = int(self.spec["frames"])
        self._pool: Any = None

    @classmethod
    def accepts(cls, path: Path) -> tuple[bool, str]:
        if not is_synthetic_spec(path):
            return False, f"not a synthetic spec (expected {SYNTHETIC_PREFIX}frames=N,size=PX,seed=S)"
        return True, ""

    def info(self) -> RecordingInfo:
        size = int(self.spec["size"])
        return RecordingInfo(path=self.path, kind="video", frame_count=self.frames, fps=float(self.spec["fps"]),
                             width=size, height=size, codec="synthetic", extra=dict(self.spec))

    def _build_pool(self) -> Any:
        """Pool frames repeated to pool + batch_size entries, so every batch is one contiguous slice."""
        import torch

        from capsule_batch.sources.synthesize import Scene

        n = int(min(self.spec["pool"], self.frames))
        scene = Scene(int(self.spec["size"]), n, int(self.spec["seed"]), float(self.spec["fps"]),
                      findings_per_1000=0.0)
        pool = to_pixels(np.stack([scene.render(i) for i in range(n)]), self.preprocess, self.device, self.dtype)
        reps = -(-(n + self.batch_size) // n)
        return torch.cat([pool] * reps)[: n + self.batch_size], n

    def __iter__(self) -> Iterator[FrameBatch]:
        if self._pool is None:
            self._pool = self._build_pool()
        ext, n = self._pool
        fps = float(self.spec["fps"])
        self.frames_decoded = 0
        for lo in range(self.start, self.frames, self.batch_size):
            hi = min(lo + self.batch_size, self.frames)
            idx = np.arange(lo, hi, dtype=np.int64)
            off = lo % n
            self.frames_decoded += hi - lo
            yield FrameBatch(ext[off : off + hi - lo], idx, idx / fps)

    def close(self) -> None:
        self._pool = None
