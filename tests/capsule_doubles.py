"""Small but real stand-ins for the source and engine that other branches provide.

`test-av` decodes with PyAV and preprocesses with `preprocess_batch`; `start=` is frame-exact because
it decodes forward from the beginning and drops frames before `start`. `test-torch` runs the bundle's
model eagerly in fp32 with softmax. `test-raise` is `test-av` that raises after two batches;
`test-crash` segfaults and `test-hang` hangs on recordings named so. `test-torch` hangs (a stuck GPU) or
segfaults (a crash in engine code) in one `infer` call when CAPSULE_TEST_ENGINE_HANG or _CRASH names a
file holding K: the file counts down per call, across processes, and the call that finds 0 deletes it
and fails.
Importing this module registers them; tests name them through conftest's SOURCE/ENGINE constants.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from capsule_batch.backends.base import BACKENDS, Engine
from capsule_batch.errors import SourceError
from capsule_batch.model.preprocess import preprocess_batch
from capsule_batch.sources.base import SOURCES, FrameBatch, FrameSource, RecordingInfo

_DELAY = float(os.environ.get("CAPSULE_TEST_ENGINE_DELAY", "0"))


def _register(reg: Any, name: str, cls: type) -> None:
    if name not in reg.names():
        reg.register(name)(cls)


class AVSource(FrameSource):
    def _container(self) -> Any:
        import av

        try:
            return av.open(str(self.path))
        except (av.error.FFmpegError, OSError) as e:
            raise SourceError(f"{self.path}: cannot open the recording ({e})") from e

    def info(self) -> RecordingInfo:
        with self._container() as c:
            s = c.streams.video[0]
            return RecordingInfo(self.path, "video", s.frames or None, float(s.average_rate or 0) or None,
                                 s.codec_context.width, s.codec_context.height, s.codec_context.name)

    def __iter__(self) -> Iterator[FrameBatch]:
        import torch

        frames: list[np.ndarray] = []
        idx: list[int] = []
        pts: list[float] = []
        with self._container() as c:
            for i, fr in enumerate(c.decode(video=0)):
                if i < self.start:
                    continue
                frames.append(fr.to_ndarray(format="rgb24"))
                idx.append(i)
                pts.append(float(fr.time or 0.0))
                if len(frames) == self.batch_size:
                    yield self._batch(torch, frames, idx, pts)
                    frames, idx, pts = [], [], []
        if frames:
            yield self._batch(torch, frames, idx, pts)

    def _batch(self, torch: Any, frames: list[np.ndarray], idx: list[int], pts: list[float]) -> FrameBatch:
        x = torch.from_numpy(np.stack(frames)).to(self.device)
        return FrameBatch(preprocess_batch(x, self.preprocess, self.dtype), np.asarray(idx, np.int64),
                          np.asarray(pts, np.float64))


class RaisingSource(AVSource):
    def __iter__(self) -> Iterator[FrameBatch]:
        for k, b in enumerate(super().__iter__()):
            if k == 2:
                raise RuntimeError("decoder exploded")
            yield b


class CrashingSource(AVSource):
    """`test-av` that really crashes the process (a segfault in the decode thread) on recordings named *crash*,
    like a native decoder meeting a hostile file; other recordings decode normally."""

    def __iter__(self) -> Iterator[FrameBatch]:
        for k, b in enumerate(super().__iter__()):
            if k == 1 and "crash" in self.path.name:
                import ctypes

                ctypes.string_at(0)  # SIGSEGV: no Python exception, the process dies
            yield b


class HangingSource(AVSource):
    """`test-av` whose decoder hangs (CAPSULE_TEST_HANG seconds) after the first batch on recordings named *hang*."""

    def __iter__(self) -> Iterator[FrameBatch]:
        for k, b in enumerate(super().__iter__()):
            if k == 1 and "hang" in self.path.name:
                time.sleep(float(os.environ.get("CAPSULE_TEST_HANG", "30")))
            yield b


def _counted_down(variable: str) -> bool:
    """True once, for the call that finds the countdown file named by `variable` at 0 (the file is then gone)."""
    countdown = os.environ.get(variable)
    if not countdown or not os.path.exists(countdown):
        return False
    with open(countdown) as f:
        left = int(f.read())
    if left > 0:
        with open(countdown, "w") as f:
            f.write(str(left - 1))
        return False
    os.unlink(countdown)
    return True


def _fail_when_counted_down() -> None:
    if _counted_down("CAPSULE_TEST_ENGINE_HANG"):
        time.sleep(120)
    if _counted_down("CAPSULE_TEST_ENGINE_CRASH"):
        import ctypes

        ctypes.string_at(0)  # SIGSEGV in the engine call


class TorchEngine(Engine):
    def __init__(self, bundle: Any, *, device: Any, precision: str, max_batch: int):
        super().__init__(bundle, device=device, precision="fp32", max_batch=max_batch)
        self.model = bundle.create_model().to(device)

    @property
    def dtype(self) -> Any:
        import torch

        return torch.float32

    def infer(self, pixels: Any) -> Any:
        import torch

        if _DELAY:
            time.sleep(_DELAY)  # lets subprocess tests interrupt a run in the middle
        _fail_when_counted_down()
        with torch.inference_mode():
            return torch.softmax(self.model(pixels.to(self.device, torch.float32)).float(), dim=1)


_register(SOURCES, "test-av", AVSource)
_register(SOURCES, "test-raise", RaisingSource)
_register(SOURCES, "test-crash", CrashingSource)
_register(SOURCES, "test-hang", HangingSource)
_register(BACKENDS, "test-torch", TorchEngine)
