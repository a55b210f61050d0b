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

Hand-off: DALI outputs become torch tensors through DLPack (no host copy); valid frames are then
copied once on the device, because DALI reuses its buffers on the next run.

Resize: DALI's own resize runs only where its kernel is the bundle's (the antialiased modes). DALI's cubic
filter is Catmull-Rom (a = -0.5, `resampling_windows.h`), not OpenCV's INTER_CUBIC (a = -0.75), so for the
fixed-kernel modes (the seed's whole-frame bicubic without antialiasing) DALI only decodes and the decoded
uint8 frames are resized and normalized by `preprocess_batch` on the same device (the GPU, or the CPU),
which is the definition every other source uses.

DALI 2.x decodes H.264/HEVC/AV1 only on the GPU; on the CPU it reads VP8/VP9/MJPEG and JPEG/PNG.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from capsule_batch.errors import MissingPackageError, SourceError
from capsule_batch.preprocess import Preprocess, preprocess_batch
from capsule_batch.sources.base import (
    SOURCES,
    DecodeFailure,
    FrameBatch,
    FrameSource,
    RecordingInfo,
    empty_pixels,
    is_synthetic_spec,
    list_frames,
)
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

    def __init__(self, path: str | Path, preprocess: Preprocess, *, readers: int | None = None, chunk: int = 2048,
                 sequence_length: int = 16, num_threads: int = 2, **kw: Any):
        super().__init__(path, preprocess, **kw)
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
        if self.path.is_dir():
            self.files = list_frames(self.path)
            self._info = RecordingInfo(self.path, "frames", len(self.files), None, None, None,
                                       codec=self.files[0].suffix.lower().lstrip("."))
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
        self.sequence_length = max(1, int(sequence_length))
        frames = self._info.frame_count or 0
        if readers is None:
            readers = 4 if self._gpu and frames > chunk * 8 else 1
        if readers > 1:
            n, keyframes = scan_video(self.path)
            self._expected_end = n
            chunks = plan_chunks(self.start, n, keyframes, chunk)
            plan = [chunks[k::readers] for k in range(readers)]
            self._readers_plan = [p for p in plan if p]
        elif not self._info.frame_count or self.start < self._info.frame_count:
            self._readers_plan = [[(self.start, TO_END)]]
        else:  # resuming at the end: nothing left to read
            self._readers_plan = []
        self._info.extra["dali_readers"] = len(self._readers_plan)

    @classmethod
    def accepts(cls, path: Path) -> tuple[bool, str]:
        if is_synthetic_spec(path):
            return False, "a synthetic spec, not a recording"
        return True, ""

    def info(self) -> RecordingInfo:
        return self._info

    def _build(self) -> list[Any]:
        """One pipeline per reader (images: one)."""
        from nvidia.dali import pipeline_def

        pdef = pipeline_def(batch_size=self._pipe_batch, num_threads=self.num_threads, device_id=self._device_id,
                            prefetch_queue_depth=2)
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
                if self.start > 0 and "input samples: 0" in str(e):  # resuming at or past the last frame
                    _logger.info("%s: no frames from %d on", self.path, self.start)
                    return []
                raise SourceError(f"{self.path}: DALI cannot read it ({_short(e)})") from None
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
                    pts = np.full(idx.shape, np.nan)
                else:
                    pix, fnum, ts = outs
                    idx = _as_numpy(fnum)[:take].reshape(-1).astype(np.int64)
                    pts = _as_numpy(ts)[:take].reshape(-1).astype(np.float64)
                valid = idx >= 0
                if self.preprocess.exact_kernel:
                    frames = self._resize_decoded(pix, take, valid)
                else:
                    t = torch.from_dlpack(pix.as_tensor())[:take]
                    t = t.reshape(-1, *t.shape[-3:])
                    # one copy out of DALI's buffer (reused on the next run); padding frames (-1) are left behind
                    frames = t.clone() if valid.all() else t[torch.from_numpy(valid).to(t.device)]
                if frames.is_cuda:  # the copy must finish before the next run may reuse DALI's buffer
                    torch.cuda.current_stream(frames.device).synchronize()
                yield idx[valid], pts[valid], frames

    def _resize_decoded(self, pix: Any, take: int, valid: np.ndarray) -> Any:
        """Decoded uint8 frames (HWC samples, or FHWC sequences) of one run -> the bundle's preprocessing by
        `preprocess_batch`, on DALI's device; the result is a new tensor, so DALI's buffer is free afterwards."""
        import torch

        if pix.is_dense_tensor():
            t = torch.from_dlpack(pix.as_tensor())[:take]
            t = t.reshape(-1, *t.shape[-3:])
            if not valid.all():
                t = t[torch.from_numpy(valid).to(t.device)]
            return preprocess_batch(t, self.preprocess)
        # image files of different sizes: one at a time
        parts = [preprocess_batch(torch.from_dlpack(pix[i])[None], self.preprocess) for i in range(take) if valid[i]]
        if parts:
            return torch.cat(parts)
        return empty_pixels(self.preprocess, torch.device("cuda", self._device_id) if self._gpu else "cpu", None)

    def _produce(self) -> Iterator[FrameBatch]:
        """Merge the readers' frames into index order and cut batches of `batch_size`."""
        import torch

        nxt = self.start
        pend_idx = np.empty((0,), np.int64)
        pend_pts = np.empty((0,), np.float64)
        pend_pix: Any = None
        failures: list[DecodeFailure] = []
        stopped: DecodeFailure | None = None
        done = False
        runs = self._runs()
        while True:
            try:
                idx, pts, pix = next(runs)
            except StopIteration:
                done = True
            except RuntimeError as e:
                done, self._expected_end = True, None
                stopped = DecodeFailure(nxt, f"decoding stopped: {_short(e)}", final=True)
            if not done:
                pend_idx = np.concatenate([pend_idx, idx])
                pend_pts = np.concatenate([pend_pts, pts])
                pend_pix = pix if pend_pix is None or not len(pend_pix) else torch.cat([pend_pix, pix])
            if len(pend_idx) > 1 and (np.diff(pend_idx) <= 0).any():  # several readers: restore the order
                order = np.argsort(pend_idx, kind="stable")
                pend_idx, pend_pts = pend_idx[order], pend_pts[order]
                pend_pix = pend_pix[torch.from_numpy(order).to(pend_pix.device)]
                fresh = np.concatenate([[True], pend_idx[1:] != pend_idx[:-1]])
            else:
                fresh = np.ones(len(pend_idx), bool)
            fresh &= pend_idx >= nxt  # duplicates never leave the source
            if not fresh.all():
                pend_idx, pend_pts = pend_idx[fresh], pend_pts[fresh]
                pend_pix = pend_pix[torch.from_numpy(fresh).to(pend_pix.device)]
            # frames ready: the contiguous run from nxt (at the end: everything, gaps reported)
            ready = int(np.sum(pend_idx == nxt + np.arange(len(pend_idx)))) if not done else len(pend_idx)
            while ready >= self.batch_size or (done and ready > 0):
                n = min(ready, self.batch_size)
                idx_out = pend_idx[:n]
                gaps = np.setdiff1d(np.arange(nxt, int(idx_out[-1]) + 1), idx_out)
                failures += [DecodeFailure(int(i), "frame not produced by the decoder") for i in gaps]
                yield FrameBatch(pend_pix[:n], idx_out, pend_pts[:n], tuple(sorted(failures, key=lambda f: f.index)))
                failures = []
                nxt = int(idx_out[-1]) + 1
                pend_idx, pend_pts, pend_pix = pend_idx[n:], pend_pts[n:], pend_pix[n:]
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
        import torch

        self.close()
        self.frames_decoded = 0
        self._pipes = self._build()
        if not self._pipes:
            return
        try:
            for batch in self._produce():
                if self.dtype is not None and batch.pixels.dtype != self.dtype:
                    batch.pixels = batch.pixels.to(self.dtype)
                if not self._gpu and torch.device(self.device) != batch.pixels.device:
                    batch.pixels = batch.pixels.to(self.device)
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
