"""The FrameSource contract (docs/design.md#framesource).

A source reads one recording (a video file or a folder of frames) and yields `FrameBatch`es:
- `pixels`: (N, 3, S, S) already preprocessed per the bundle's `Preprocess`, in the engine's dtype,
  on the engine's device;
- `index`: the frame numbers in the recording (int64), strictly increasing;
- `pts`: presentation times in seconds (float64).
Every frame from `start` to the end is accounted for exactly once, in order: either in some batch's
`index`, or in some batch's `failures` (a frame that could not be decoded, with the reason). A
source never drops or duplicates a frame silently.

Failures travel in the next batch yielded after them; a batch may therefore hold zero frames and only
failures (always so for a failure at the end of a recording).

Truncated or damaged video: the source yields every frame that decodes, then one
`DecodeFailure(index=<first frame not yielded>, reason, final=True)`: decoding stopped there, and
every frame from `index` on is missing (how many is unknown: the container's count may be wrong
too). Frame-count metadata that disagrees with a clean decode is not a failure: the decode is the
truth, `info().frame_count` keeps the container's claim and `frames_decoded` the real count.

`start` (resume from a frame number) is frame-exact for every source: the first frame yielded has
index `start`. `reopen(start)` gives the same recording from another frame (a resume, the thumbnail pass).

A source decodes in the thread that iterates it; in a run that is the pipeline's one decode thread
(capsule_batch.run.stages.DecodeStage), so sources start no thread of their own to hand batches on.
"""

from __future__ import annotations

import abc
import importlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from capsule_batch.errors import SourceError
from capsule_batch.model.preprocess import Preprocess, preprocess_batch
from capsule_batch.registry import Registry
from capsule_batch.sources.listing import FRAME_SUFFIXES, list_frames, natural_key  # noqa: F401 (re-exported)

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeFailure:
    """A frame that could not be decoded; with `final=True`, decoding stopped there and every frame from
    `index` on is missing (a truncated or damaged recording)."""

    index: int
    reason: str
    final: bool = False


@dataclass
class FrameBatch:
    pixels: Any  # torch.Tensor (N, 3, S, S)
    index: np.ndarray  # (N,) int64
    pts: np.ndarray  # (N,) float64 seconds
    failures: tuple[DecodeFailure, ...] = ()  # frames with index below index[-1] (or at the end) that failed

    def __len__(self) -> int:
        return int(self.index.shape[0])


@dataclass
class RecordingInfo:
    """What a source knows about a recording before decoding it. `frame_count` is the container's claim
    (may be wrong or None); the decode is the truth and the study file records both."""

    path: Path
    kind: str  # "video" or "frames"
    frame_count: int | None
    fps: float | None
    width: int | None
    height: int | None
    codec: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class FrameSource(abc.ABC):
    """Base class of sources; construct with `open_source` rather than directly (or directly, to hand an
    object to `capsule_batch.run.runner.run_recordings`)."""

    name: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> FrameSource:
        self = super().__new__(cls)
        self._opened_with = (args, kwargs)  # what `reopen` constructs again (subclasses add their own options)
        return self

    def __init__(
        self,
        path: str | Path,
        preprocess: Preprocess,
        *,
        batch_size: int = 64,
        device: Any = "cpu",
        dtype: Any = None,
        start: int = 0,
        announce: bool = True,
    ):
        self.path = Path(path)
        #: log what is worth a line once per run (files left out, a decoder fallback); off for `reopen`s
        self.announce = bool(announce)
        self.preprocess = preprocess
        self.batch_size = int(batch_size)
        self.device = device
        self.dtype = dtype
        self.start = int(start)
        #: frames yielded so far (after a full iteration: the real decoded count, next to info().frame_count)
        self.frames_decoded = 0
        if self.batch_size < 1:
            raise SourceError(f"batch size must be >= 1, got {batch_size}")
        if self.start < 0:
            raise SourceError(f"start frame must be >= 0, got {start}")

    #: (module to import, how to install it) for sources built on an optional package
    requires: ClassVar[tuple[str, str] | None] = None

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """(usable on this machine, why not) — checks packages and hardware, not a particular file."""
        if cls.requires is not None:
            module, install = cls.requires
            try:
                importlib.import_module(module)
            except ImportError:
                return False, f"the {module} package is not installed ({install})"
        return True, ""

    @classmethod
    def accepts(cls, path: Path) -> tuple[bool, str]:
        """(can read this kind of input, why not) — cheap checks on the path only."""
        return True, ""

    @classmethod
    def usable_on_gpu(cls, path: Path) -> tuple[bool, str]:
        """(can decode this input on a GPU here, why not) — what `auto` asks before choosing a GPU source."""
        return True, ""

    @abc.abstractmethod
    def info(self) -> RecordingInfo: ...

    @abc.abstractmethod
    def __iter__(self) -> Iterator[FrameBatch]: ...

    def reopen(self, start: int, batch_size: int | None = None) -> FrameSource:
        """The same recording from frame `start`: a new source of this class, opened with this one's arguments
        and `start` (and `batch_size`, when given) replaced."""
        args, kwargs = self._opened_with
        kwargs = {**kwargs, "start": int(start), "announce": False}
        if batch_size is not None:
            kwargs["batch_size"] = int(batch_size)
        return type(self)(*args, **kwargs)

    def close(self) -> None:  # noqa: B027 - optional hook, sources without resources keep it
        """Release decoder resources; safe to call twice."""

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Built-in source modules register themselves on import.
SOURCES: Registry[FrameSource] = Registry(
    "source",
    (
        "capsule_batch.sources.dali",
        "capsule_batch.sources.decord_source",
        "capsule_batch.sources.images",
        "capsule_batch.sources.synthetic",
    ),
)

#: "paths" that name a generated recording instead of a file (see sources/synthetic.py)
SYNTHETIC_PREFIX = "synthetic:"


def is_synthetic_spec(path: str | Path) -> bool:
    return str(path).startswith(SYNTHETIC_PREFIX)


def is_frame_folder(path: Path) -> bool:
    return path.is_dir()


def to_pixels(frames: Any, preprocess: Preprocess, device: Any, dtype: Any) -> Any:
    """uint8 (N,H,W,3) numpy/torch frames -> preprocessed (N,3,S,S) tensor on `device` in `dtype` (CPU sources).

    For a CUDA device the copy and the normalisation run on the decode thread's own stream (`side_stream`),
    which is waited for here: the batch is ready on any stream when it is handed on, and nothing here waits
    for the engine's work on the default stream."""
    import torch

    t = torch.from_numpy(np.require(frames, requirements=["C", "W"])) if isinstance(frames, np.ndarray) else frames
    if torch.device(device).type != "cuda":
        return preprocess_batch(t, preprocess, dtype, device)
    from capsule_batch.devices import side_stream

    stream = side_stream(device)
    with torch.cuda.stream(stream):
        pixels = preprocess_batch(t, preprocess, dtype, device)
    # wait for this thread's own copies and kernels only, asleep in the driver (a blocking event; a stream's
    # synchronize may spin a core that decoding needs)
    done = torch.cuda.Event(blocking=True)
    done.record(stream)
    done.synchronize()
    return pixels


def empty_pixels(preprocess: Preprocess, device: Any, dtype: Any) -> Any:
    import torch

    s = preprocess.input_size
    return torch.empty((0, 3, s, s), dtype=dtype or torch.float32, device=device)


def choose_source(path: Path, device: Any) -> str:
    """`auto`: dali on a GPU where installed and able to decode this input there (NVDEC for video), else decord
    for video and images for folders."""
    names = SOURCES.names()
    on_gpu = getattr(device, "type", str(device)).startswith("cuda")
    if on_gpu and "dali" in names:
        dali = SOURCES.get("dali")
        ok, _ = dali.available()
        if ok and dali.accepts(path)[0]:
            gpu_ok, why = dali.usable_on_gpu(path)
            if gpu_ok:
                return "dali"
            _logger.info("%s: not choosing dali: %s", path, why)
    candidates = ["images"] if is_frame_folder(path) else ["decord"]
    for name in candidates + [n for n in names if n not in candidates]:
        if name not in names:
            continue
        cls = SOURCES.get(name)
        if cls.available()[0] and cls.accepts(path)[0]:
            return name
    raise SourceError(f"{path}: no available source can read it (sources: {', '.join(names) or 'none'})")


def open_source(
    path: str | Path,
    preprocess: Preprocess,
    *,
    source: str = "auto",
    batch_size: int = 64,
    device: Any = "cpu",
    dtype: Any = None,
    start: int = 0,
    **kwargs: Any,
) -> FrameSource:
    """Open `path` with the named source (or `auto`); an explicit choice that cannot work here says why."""
    path = Path(path)
    if is_synthetic_spec(path):
        name = "synthetic" if source == "auto" else source
    else:
        if not path.exists():
            raise SourceError(f"{path}: no such file or folder")
        name = choose_source(path, device) if source == "auto" else source
    try:
        cls = SOURCES.get(name)
    except KeyError as e:
        raise SourceError(str(e.args[0])) from None
    ok, why = cls.available()
    if not ok:
        raise SourceError(f"source {name} cannot work here: {why}")
    ok, why = cls.accepts(path)
    if not ok:
        raise SourceError(f"{path}: source {name} cannot read it: {why}")
    return cls(path, preprocess, batch_size=batch_size, device=device, dtype=dtype, start=start, **kwargs)
