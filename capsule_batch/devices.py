"""Device selection shared by sources and engines, and the CUDA helpers their GPU branches share."""

from __future__ import annotations

import threading
from typing import Any

from capsule_batch.errors import CapsuleError


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(spec: str | None) -> Any:
    """`auto` -> first CUDA device if there is one, else CPU; `cpu`, `cuda`, `cuda:N` are checked."""
    import torch

    spec = (spec or "auto").lower()
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise CapsuleError(f"bad device {spec!r}: expected auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CapsuleError(f"device {spec}: no CUDA GPU is visible on this machine")
        idx = dev.index or 0
        if idx >= torch.cuda.device_count():
            raise CapsuleError(f"device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", idx)
    if dev.type != "cpu":
        raise CapsuleError(f"device {spec}: only cpu and cuda are supported")
    return dev


PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


def torch_dtype(precision: str) -> Any:
    import torch

    try:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    except KeyError:
        raise CapsuleError(f"unknown precision {precision!r} (fp32, bf16, fp16)") from None


# ------------------------------------------------------------------------------------------------------------
# CUDA: which device a thread works on, where its copies go, what the driver can decode.
#
# cudaSetDevice is per host thread, and torch's current stream, its events and CUDA graph capture streams are
# taken on the thread's current device. So every thread that does CUDA work for `cuda:N` (the engine's calling
# thread, the decode thread) makes N current first: otherwise, on every torchrun rank but 0, an event recorded
# "on the current stream" lands on device 0 and the pinned-memory copy it is meant to mark is not waited for.

_local = threading.local()


def use_cuda_device(device: Any) -> None:
    """Make `device` the calling thread's current CUDA device (no-op for a CPU device or when already current)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev.index or 0)  # cheap (cudaSetDevice); always called, so nothing can go stale


def side_stream(device: Any) -> Any:
    """This thread's own CUDA stream on `device` (made current device first), for work that must not queue
    behind the engine's: torch's pool streams are created non-blocking, so they do not synchronise with the
    legacy default stream the engine's kernels run on."""
    import torch

    use_cuda_device(device)
    streams = getattr(_local, "streams", None)
    if streams is None:
        streams = _local.streams = {}
    dev = torch.device(device)
    key = dev.index or 0
    if key not in streams:
        streams[key] = torch.cuda.Stream(torch.device("cuda", key))
    return streams[key]


def to_device_async(x: Any, device: Any) -> Any:
    """A CPU tensor (or numpy array) on CUDA `device` without a host synchronisation: staged through pinned memory
    and copied non-blocking on the current stream. A copy from pageable memory (`x.to(device)`) synchronises the
    current stream first, which in a decode thread means waiting for every engine batch queued on it."""
    import numpy as np
    import torch

    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    if t.device.type != "cpu":
        return t.to(device, non_blocking=True)
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    staged.copy_(t)  # one host copy, whatever the strides (a crop is a view)
    # torch records the copy on the pinned block, so the block is not reused before the copy has finished
    return staged.to(device, non_blocking=True)


#: the driver's video libraries: NVDEC (decode: DALI, PyNvVideoCodec) and NVENC (loaded by PyNvVideoCodec's import)
VIDEO_LIBRARIES = ("libnvcuvid.so.1", "libnvidia-encode.so.1")


def load_library(name: str) -> str | None:
    """None when the shared library `name` loads here, else why not (the loader's message)."""
    import ctypes

    try:
        ctypes.CDLL(name)
    except OSError as e:
        return str(e) or f"{name}: cannot be loaded"
    return None


def nvdec_problem() -> str | None:
    """None when NVDEC's driver library loads, else why not: DALI's GPU video decode needs it, and a container
    started without the driver's `video` capability has CUDA but not this library."""
    why = load_library(VIDEO_LIBRARIES[0])
    return None if why is None else f"{VIDEO_LIBRARIES[0]} (NVDEC, in the NVIDIA driver) cannot be loaded: {why}"
