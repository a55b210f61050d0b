"""`dali`: NVIDIA DALI decode + preprocessing, on the GPU (NVDEC video, nvJPEG images) or the CPU.

Structure (as in NVIDIA's efficientnet example): `preprocess_graph` is the processing graph as a
plain function; two thin `@pipeline_def` functions bind it to a reader (video or image files); the
decode device is a parameter, so the CPU pipeline (`device_id=None`) is the GPU one with
`device="cpu"` and the tests on CPU exercise the same code.

Video: `fn.experimental.readers.video` over a file list of frame ranges (frame numbers and
timestamps on, no shuffle, sequences of `sequence_length` frames; the tail of a range is padded and
the padding, frame number -1, dropped). A long recording on the GPU is split into keyframe-aligned
chunks handed round-robin to several readers, one pipeline each (each pipeline prefetches in its own
threads), so several NVDEC sessions decode at once; their frames are merged back into order before
they are yielded. Each reader's epoch size bounds what is
taken from it, so the wrap-around of the last batch never duplicates frames.

Images: `fn.readers.file` over the folder's files in natural order, the file's position as its label
(= frame index), `fn.decoders.image` (`mixed` = nvJPEG on the GPU).

Hand-off (GPU): DALI outputs become torch tensors through DLPack, without a copy. DALI 2.4's default executor
(`exec_dynamic`, on whenever the pipeline is asynchronous and pipelined with one prefetch queue, as here) gives
every run new output buffers and keeps each alive while a consumer references it, and `__dlpack__(stream)` makes
the consumer's stream wait for DALI's work on it. So nothing is cloned and nothing is synchronised on the
engine's stream: the decode thread works on its own stream (`devices.side_stream`), takes padding frames out
with `index_select` on an index copied from pinned memory (a boolean mask would synchronise to learn its size),
keeps decoded runs in the chunks they arrived in until a batch is cut from them, and waits only for its own
stream before a batch is handed on.

Resize: DALI's own resize runs only where its kernel is the bundle's (the antialiased modes). DALI's cubic
filter is Catmull-Rom (a = -0.5, `resampling_windows.h`), not OpenCV's INTER_CUBIC (a = -0.75), so for the
fixed-kernel modes (the seed's whole-frame bicubic without antialiasing) DALI only decodes and the decoded
uint8 frames are resized and normalized by `preprocess_batch` on the same device (the GPU, or the CPU),
which is the definition every other source uses.

DALI 2.x decodes H.264/HEVC/AV1 only on the GPU; on the CPU it reads VP8/VP9/MJPEG and JPEG/PNG.
"""

from __future__ import annotations

import itertools
import logging
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from capsule_batch.devices import nvdec_problem, side_stream, to_device_async
from capsule_batch.errors import MissingPackageError, SourceError
from capsule_batch.model.preprocess import Preprocess, preprocess_batch
from capsule_batch.sources.base import (
    SOURCES,
    DecodeFailure,
    FrameBatch,
    FrameSource,
    RecordingInfo,
    empty_pixels,
    is_synthetic_spec,
)
from capsule_batch.sources.listing import scan_frames
from capsule_batch.sources.video import probe_video

_logger = logging.getLogger(__name__)

CPU_VIDEO_CODECS = ("vp8", "vp9", "mjpeg")
#: range end meaning "to the last frame": DALI clamps it to the file (an end of -1 would drop the last frame)
TO_END = 10**9


def preprocess_graph(frames: Any, pre: Preprocess, out_dtype: Any, sequence: bool, size: tuple[int, int] | None) -> Any:
    """uint8 HWC (or FHWC) frames -> normalized CHW (FCHW) per the bundle. `size` is the exact resized
    (h, w) when every frame has the same geometry (video); else the shorter side is resized. Fixed-kernel
    bundles get the decoded frames unchanged (resized by torch, see the module docstring)."""
    from nvidia.dali import fn, types

    if pre.exact_kernel:
        return frames
    interp = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "nearest": types.INTERP_NN}
    s = pre.input_size
    if pre.crop == "none":
        resized = fn.resize(frames, size=[s, s], interp_type=interp[pre.interpolation], antialias=True)
    elif pre.resize_mode == "whole":
        resized = fn.resize(frames, size=[pre.resize, pre.resize], interp_type=interp[pre.interpolation],
                            antialias=True)
    elif size is not None:
        resized = fn.resize(frames, size=list(size), interp_type=interp[pre.interpolation], antialias=True)
    else:
        resized = fn.resize(frames, resize_shorter=pre.resize, interp_type=interp[pre.interpolation], antialias=True)
    return fn.crop_mirror_normalize(
        resized,
        dtype=out_dtype,
        output_layout="FCHW" if sequence else "CHW",
        crop=(s, s),
        crop_pos_x=0.5,
        crop_pos_y=0.5,
        mean=[m * 255.0 for m in pre.mean],
        std=[v * 255.0 for v in pre.std],
    )


def _video_pipeline(file_list: str, pre: Preprocess, decode_device: str, out_dtype: Any,
                    sequence_length: int, size: tuple[int, int] | None) -> tuple[Any, ...]:
    from nvidia.dali import fn

    video, _, frame_num, timestamps = fn.experimental.readers.video(
        device=decode_device,
        file_list=file_list,
        file_list_format="frames",
        file_list_include_end=True,  # measured with DALI 2.4: ranges still end before `end`; TO_END clamps
        sequence_length=sequence_length,
        step=sequence_length,
        pad_mode="constant",
        enable_frame_num="sequence",
        enable_timestamps=True,
        random_shuffle=False,
        name="reader",
    )
    return preprocess_graph(video, pre, out_dtype, True, size), frame_num, timestamps


def _image_pipeline(files: list[str], first: int, pre: Preprocess, decode_device: str,
                    out_dtype: Any) -> tuple[Any, ...]:
    from nvidia.dali import fn, types

    encoded, index = fn.readers.file(files=files, labels=list(range(first, first + len(files))),
                                     random_shuffle=False, name="reader")
    images = fn.decoders.image(encoded, device="mixed" if decode_device == "gpu" else "cpu", output_type=types.RGB)
    return preprocess_graph(images, pre, out_dtype, False, None), index


def scan_video(path: Path) -> tuple[int, list[int]]:
    """(frames, keyframe frame numbers) from the container's packets (no decode)."""
    import av

    pts: list[int] = []
    key: list[bool] = []
    with av.open(str(path)) as c:
        for p in c.demux(c.streams.video[0]):
            if p.size and p.pts is not None:
                pts.append(p.pts)
                key.append(p.is_keyframe)
    order = np.argsort(np.asarray(pts), kind="stable")
    keys = np.asarray(key)[order]
    return len(pts), [int(i) for i in np.flatnonzero(keys)]


def plan_chunks(start: int, end: int, keyframes: list[int], chunk: int) -> list[tuple[int, int]]:
    """Split [start, end) at keyframes into ranges of at least `chunk` frames (the last may be shorter)."""
    bounds = [start]
    for k in keyframes:
        if k - bounds[-1] >= chunk and k < end:
            bounds.append(k)
    bounds.append(end)
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


@SOURCES.register("dali")
class DaliSource(FrameSource):
    """`readers`: parallel video readers (None: 4 on the GPU for recordings over `chunk` x 8 frames, else 1);
    `chunk`: minimum frames per keyframe-aligned range; `sequence_length`: frames per DALI sample;
    `num_threads`: DALI CPU threads."""

    requires = ("nvidia.dali", "pip install 'capsule-batch[dali]'")

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, why = super().available()
        if ok and dali_version_tuple() < MIN_DALI:
            return False, (f"DALI {_dali_version()} is older than {'.'.join(map(str, MIN_DALI))}, whose executor "
                           "the zero-copy hand-off relies on (pip install 'capsule-batch[dali]')")
        return ok, why

    def __init__(self, path: str | Path, preprocess: Preprocess, *, readers: int | None = None, chunk: int = 2048,
                 sequence_length: int = 16, num_threads: int = 2, fps: float | None = None,
                 exclude: tuple[str, ...] | None = None, **kw: Any):
        super().__init__(path, preprocess, **kw)
        self.fps = fps
        import torch

        try:
            from nvidia.dali import types
        except ImportError:
            raise MissingPackageError("nvidia-dali-cuda130", "dali", "the dali source") from None
        dev = torch.device(self.device)
        self._gpu = dev.type == "cuda"
        self._device_id = (dev.index or 0) if self._gpu else None
        self._decode_device = "gpu" if self._gpu else "cpu"
        self._out_dtype = types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT
        self.num_threads = num_threads
        self.sequence_length = 1
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._pipes: list[Any] = []
        self._expected_end: int | None = None
        self._packet_count: int | None = None
        if self.path.is_dir():
            listing = scan_frames(self.path, exclude)
            if self.announce:
                listing.report()
            self.files = listing.files
            self._info = RecordingInfo(self.path, "frames", len(self.files), fps, None, None,
                                       codec="+".join(sorted({p.suffix.lower().lstrip(".") for p in self.files})),
                                       extra={"files": listing.names(), "excluded": len(listing.excluded),
                                              "skipped": len(listing.skipped), "exclude": list(listing.exclude)})
            self._readers_plan: list[list[tuple[int, int]]] = []
            self._expected_end = len(self.files)
            return
        self._info = probe_video(self.path)
        codec = (self._info.codec or "?").lower()
        if not self._gpu and codec not in CPU_VIDEO_CODECS:
            raise SourceError(
                f"{self.path}: DALI {_dali_version()} decodes {codec} video only on a GPU (its CPU decoder reads "
                f"{'/'.join(c.upper() for c in CPU_VIDEO_CODECS)}); use --source decord on this machine"
            )
        if self._gpu:
            why = nvdec_problem()
            if why:
                raise SourceError(f"{self.path}: DALI decodes video on the GPU with NVDEC, but {why}; "
                                  "use --source decord")
        self.sequence_length = max(1, int(sequence_length))
        frames = self._info.frame_count or 0
        if readers is None:
            readers = 4 if self._gpu and frames > chunk * 8 else 1
        if readers > 1:
            n, keyframes = scan_video(self.path)
            self._expected_end = self._packet_count = n
            chunks = plan_chunks(self.start, n, keyframes, chunk)
            plan = [chunks[k::readers] for k in range(readers)]
            self._readers_plan = [p for p in plan if p]
        elif not self._info.frame_count or self.start < self._info.frame_count or self.start < self._frames():
            self._readers_plan = [[(self.start, TO_END)]]
        else:  # resuming at the end (the packets say so, not only the container's claim): nothing left to read
            self._readers_plan = []
        self._info.extra["dali_readers"] = len(self._readers_plan)

    @classmethod
    def accepts(cls, path: Path) -> tuple[bool, str]:
        if is_synthetic_spec(path):
            return False, "a synthetic spec, not a recording"
        return True, ""

    @classmethod
    def usable_on_gpu(cls, path: Path) -> tuple[bool, str]:
        """Video on a GPU needs NVDEC's driver library; frame folders (nvJPEG) do not."""
        if path.is_dir():
            return True, ""
        why = nvdec_problem()
        return (False, why) if why else (True, "")

    def _frames(self) -> int:
        """Frames in the file, counted from its packets (no decode, once per source); a file whose packets PyAV
        cannot read is a SourceError naming it."""
        if self._packet_count is None:
            try:
                self._packet_count = scan_video(self.path)[0]
            except Exception as e:  # PyAV raises several types for an unreadable file
                raise SourceError(f"{self.path}: cannot read its packets ({type(e).__name__}: {e})"[:400]) from None
        return self._packet_count

    def info(self) -> RecordingInfo:
        return self._info

    def _build(self) -> list[Any]:
        """One pipeline per reader (images: one)."""
        from nvidia.dali import pipeline_def

        # exec_dynamic (DALI 2.4's default, stated because the zero-copy hand-off depends on it): every run gets new
        # output buffers, each kept alive while torch references it
        pdef = pipeline_def(batch_size=self._pipe_batch, num_threads=self.num_threads, device_id=self._device_id,
                            prefetch_queue_depth=2, exec_dynamic=True)
        if self.path.is_dir():
            files = [str(p) for p in self.files[self.start:]]
            if not files:
                return []
            pipes = [pdef(_image_pipeline)(files, self.start, self.preprocess, self._decode_device, self._out_dtype)]
        else:
            # DALI's file list is whitespace-separated: link the recording under a name without spaces
            self._tmp = tempfile.TemporaryDirectory(prefix="capsule-dali-")
            link = Path(self._tmp.name) / f"recording{self.path.suffix.lower()}"
            link.symlink_to(self.path.resolve())
            h, w = self._info.height, self._info.width
            size = self.preprocess.resized_shape(h, w) if h and w else None
            pipes: list[Any] = []
            for k, ranges in enumerate(self._readers_plan):
                fl = Path(self._tmp.name) / f"reader{k}.txt"
                fl.write_text("".join(f"{link} 0 {a} {b}\n" for a, b in ranges))
                pipes.append(pdef(_video_pipeline)(str(fl), self.preprocess, self._decode_device, self._out_dtype,
                                                   self.sequence_length, size))
        for pipe in pipes:
            try:
                pipe.build()
            except RuntimeError as e:
                if "input samples: 0" not in str(e):
                    raise SourceError(f"{self.path}: DALI cannot read it ({_short(e)})") from None
                # DALI says this both when nothing is left from `start` on and when it skipped a file it could not
                # open or decode: only the file's own frame count tells them apart
                if self.path.is_dir() or self.start >= self._frames():
                    _logger.info("%s: no frames from %d on", self.path, self.start)
                    return []
                raise SourceError(f"{self.path}: DALI read no frames from frame {self.start} on, but the file has "
                                  f"{self._frames()}: it skipped the file (it could not open or decode it; DALI's "
                                  "log above says why)") from None
        return pipes

    @property
    def _pipe_batch(self) -> int:
        return max(1, math.ceil(self.batch_size / self.sequence_length))

    def _runs(self) -> Iterator[tuple[np.ndarray, np.ndarray, Any]]:
        """(index, pts, pixels) of the valid frames of every reader, run by run, epoch-bounded."""
        import torch

        remaining = [int(pipe.reader_meta("reader")["epoch_size"]) for pipe in self._pipes]
        while any(r > 0 for r in remaining):
            for k, pipe in enumerate(self._pipes):
                if remaining[k] <= 0:
                    continue
                take = min(remaining[k], self._pipe_batch)
                remaining[k] -= take
                outs = pipe.run()
                if self.path.is_dir():
                    pix, labels = outs
                    idx = _as_numpy(labels).reshape(-1)[:take].astype(np.int64)
                    pts = idx / self.fps if self.fps else np.full(idx.shape, np.nan)
                else:
                    pix, fnum, ts = outs
                    idx = _as_numpy(fnum)[:take].reshape(-1).astype(np.int64)
                    pts = _as_numpy(ts)[:take].reshape(-1).astype(np.float64)
                valid = idx >= 0
                if self.preprocess.exact_kernel:
                    frames = self._resize_decoded(pix, take, valid)
                else:
                    # no copy: DALI's default executor does not reuse an output while it is referenced
                    t = torch.from_dlpack(pix.as_tensor())[:take]
                    frames = take_rows(t.reshape(-1, *t.shape[-3:]), valid)  # padding frames (-1) are left behind
                yield idx[valid], pts[valid], frames

    def _resize_decoded(self, pix: Any, take: int, valid: np.ndarray) -> Any:
        """Decoded uint8 frames (HWC samples, or FHWC sequences) of one run -> the bundle's preprocessing by
        `preprocess_batch`, on DALI's device (the result is a new tensor)."""
        import torch

        if pix.is_dense_tensor():
            t = torch.from_dlpack(pix.as_tensor())[:take]
            return preprocess_batch(take_rows(t.reshape(-1, *t.shape[-3:]), valid), self.preprocess)
        # image files of different sizes: one at a time
        parts = [preprocess_batch(torch.from_dlpack(pix[i])[None], self.preprocess) for i in range(take) if valid[i]]
        if parts:
            return torch.cat(parts)
        return empty_pixels(self.preprocess, torch.device("cuda", self._device_id) if self._gpu else "cpu", None)

    def _produce(self) -> Iterator[FrameBatch]:
        """Merge the readers' frames into index order and cut batches of `batch_size`."""
        nxt = self.start
        pending = Pending()
        failures: list[DecodeFailure] = []
        stopped: DecodeFailure | None = None
        done = False
        runs = self._runs()
        while True:
            try:
                idx, pts, pix = next(runs)
                pending.add(idx, pts, pix)
            except StopIteration:
                done = True
            except RuntimeError as e:
                done, self._expected_end = True, None
                stopped = DecodeFailure(nxt, f"decoding stopped: {_short(e)}", final=True)
            pending.order(nxt)  # several readers: restore the order; duplicates never leave the source
            # frames ready: the contiguous run from nxt (at the end: everything, gaps reported)
            ready = pending.contiguous_from(nxt) if not done else len(pending)
            while ready >= self.batch_size or (done and ready > 0):
                n = min(ready, self.batch_size)
                idx_out, pts_out, pix_out = pending.take(n)
                gaps = np.setdiff1d(np.arange(nxt, int(idx_out[-1]) + 1), idx_out)
                failures += [DecodeFailure(int(i), "frame not produced by the decoder") for i in gaps]
                yield FrameBatch(pix_out, idx_out, pts_out, tuple(sorted(failures, key=lambda f: f.index)))
                failures = []
                nxt = int(idx_out[-1]) + 1
                ready -= n
            if done:
                break
        if stopped is not None and self.path.is_dir():
            # DALI stops at a broken file without naming it: the rest goes through PIL, which reports each
            # broken file with its index and continues
            _logger.warning("%s: %s; reading frames from %d on with the images source", self.path, stopped.reason, nxt)
            from capsule_batch.sources.images import ImageFolderSource

            rest = ImageFolderSource(self.path, self.preprocess, batch_size=self.batch_size, device=self.device,
                                     dtype=self.dtype, start=nxt)
            with rest:
                for i, batch in enumerate(rest):
                    if i == 0 and failures:
                        batch.failures = tuple(failures) + batch.failures
                    yield batch
            return
        if stopped is not None:
            failures.append(DecodeFailure(nxt, stopped.reason, final=True))
        elif self._expected_end is not None and nxt < self._expected_end:
            failures.append(DecodeFailure(nxt, f"decoding stopped after frame {nxt - 1} of {self._expected_end}",
                                          final=True))
        if failures:
            yield FrameBatch(empty_pixels(self.preprocess, self.device, self.dtype), np.empty((0,), np.int64),
                             np.empty((0,), np.float64), tuple(failures))

    def __iter__(self) -> Iterator[FrameBatch]:
        import contextlib

        import torch

        self.close()
        self.frames_decoded = 0
        self._pipes = self._build()
        if not self._pipes:
            return
        stream = side_stream(torch.device("cuda", self._device_id)) if self._gpu else None
        try:
            batches = self._produce()
            while True:
                # the work of this thread goes to its own stream, not the engine's (see the module docstring)
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    batch = next(batches, None)
                    if batch is None:
                        break
                    if self.dtype is not None and batch.pixels.dtype != self.dtype:
                        batch.pixels = batch.pixels.to(self.dtype)
                    if not self._gpu and torch.device(self.device) != batch.pixels.device:
                        batch.pixels = batch.pixels.to(self.device)
                if stream is not None:
                    stream.synchronize()  # this thread's own work only: the batch is ready on any stream
                self.frames_decoded += len(batch)
                yield batch
        finally:
            self.close()

    def close(self) -> None:
        self._pipes = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _as_numpy(tl: Any) -> np.ndarray:
    """A DALI TensorList (CPU or GPU) of equal-shape samples as one numpy array."""
    if hasattr(tl, "as_cpu"):
        tl = tl.as_cpu()
    return np.asarray(tl.as_array())


def _short(e: BaseException) -> str:
    """The informative part of a DALI error: the operator and what it encountered, without the traceback."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    op = next((ln for ln in lines if ln.startswith("Error in")), "")
    cause = ""
    if "encountered:" in lines:
        cause = next(iter(lines[lines.index("encountered:") + 1 :]), "")
    msg = " ".join(x for x in (op.rstrip(","), cause) if x) or (lines[0] if lines else repr(e))
    return msg[:300]


def _dali_version() -> str:
    import nvidia.dali

    return nvidia.dali.__version__


#: the oldest DALI whose behaviour this module relies on: 2.4's default executor (exec_dynamic) gives every run new
#: output buffers, which the zero-copy hand-off to torch needs (module docstring); setup.cfg asks for the same
MIN_DALI = (2, 4)


def dali_version_tuple() -> tuple[int, ...]:
    parts = []
    for p in _dali_version().split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, p))
        parts.append(int(digits or 0))
    return tuple(parts)


def take_rows(t: Any, valid: np.ndarray) -> Any:
    """The rows of `t` where `valid` (a host mask): the tensor itself, a slice when they are a prefix, else one
    `index_select` with the index staged through pinned memory. Never `t[mask]`, which synchronises on a GPU."""
    import torch

    if valid.all():
        return t
    k = int(valid.sum())
    if valid[:k].all():
        return t[:k]
    rows = torch.from_numpy(np.flatnonzero(valid))
    return t.index_select(0, to_device_async(rows, t.device) if t.is_cuda else rows)


class Pending:
    """Frames decoded but not yet handed on. Index and pts live on the host; the pixels stay in the runs they came
    in (`chunks`) until a batch is cut from them, so a merge never copies more than the batch it hands on (not the
    whole pending buffer, thousands of frames with several readers, on every run)."""

    def __init__(self) -> None:
        self.idx = np.empty((0,), np.int64)
        self.pts = np.empty((0,), np.float64)
        self.chunk = np.empty((0,), np.int64)  # which run each pending frame is in
        self.row = np.empty((0,), np.int64)  # and at which row of it
        self.chunks: dict[int, Any] = {}
        self._next = 0

    def __len__(self) -> int:
        return int(self.idx.shape[0])

    def add(self, idx: np.ndarray, pts: np.ndarray, pix: Any) -> None:
        if not len(idx):
            return
        k, self._next = self._next, self._next + 1
        self.chunks[k] = pix
        self.idx = np.concatenate([self.idx, idx])
        self.pts = np.concatenate([self.pts, pts])
        self.chunk = np.concatenate([self.chunk, np.full(len(idx), k, np.int64)])
        self.row = np.concatenate([self.row, np.arange(len(idx), dtype=np.int64)])

    def order(self, nxt: int) -> None:
        """Frame order (stable), the first of duplicate frames kept, frames before `nxt` dropped."""
        if not len(self):
            return
        keep = np.argsort(self.idx, kind="stable")
        fresh = np.concatenate([[True], self.idx[keep][1:] != self.idx[keep][:-1]]) & (self.idx[keep] >= nxt)
        self._select(keep[fresh])

    def contiguous_from(self, nxt: int) -> int:
        """How many pending frames run without a gap from frame `nxt`."""
        return int(np.sum(self.idx == nxt + np.arange(len(self))))

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray, Any]:
        """The first `n` pending frames: index, pts and pixels (a view when they are consecutive rows of one run,
        else one gather of exactly these frames)."""
        import torch

        chunk, row = self.chunk[:n], self.row[:n]
        parts = []
        start = 0
        for end in [*(np.flatnonzero((np.diff(chunk) != 0) | (np.diff(row) != 1)) + 1).tolist(), n]:
            c, a = int(chunk[start]), int(row[start])
            parts.append(self.chunks[c][a:a + (end - start)])
            start = end
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        idx, pts = self.idx[:n], self.pts[:n]
        self._select(np.arange(n, len(self)))
        return idx, pts, out

    def _select(self, keep: np.ndarray) -> None:
        self.idx, self.pts, self.chunk, self.row = self.idx[keep], self.pts[keep], self.chunk[keep], self.row[keep]
        live = set(np.unique(self.chunk).tolist())
        for k in [k for k in self.chunks if k not in live]:
            del self.chunks[k]  # no frame of this run is pending any more: DALI may free its buffer

