"""The Engine contract and backend selection.

An engine is built from a `ModelBundle` for one device, precision and maximum batch, and maps
preprocessed pixels (N, 3, S, S) to class probabilities (N, C) float32 on the same device, softmax
applied. Backends implement `logits(pixels)` for N <= `max_batch`; `Engine.infer` adds what every
backend needs once: calls of at most `max_batch` frames (`chunks`, which the pipeline's engine stage uses
too), the softmax, and the out-of-memory back-off. Contracts of every stage: docs/design.md.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from typing import Any, ClassVar

from capsule_batch.devices import PRECISIONS, use_cuda_device
from capsule_batch.errors import EngineError
from capsule_batch.model.bundle import ModelBundle
from capsule_batch.registry import Registry

_logger = logging.getLogger(__name__)


def is_illegal_access(exc: BaseException) -> bool:
    """A CUDA error that leaves the context unusable: never retry after it."""
    text = str(exc).lower()
    return "illegal memory access" in text or "illegal address" in text


def is_out_of_memory(exc: BaseException) -> bool:
    """Out of device memory, from torch, onnxruntime (message) or TensorRT (message)."""
    import torch

    if is_illegal_access(exc):
        return False
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("out of memory", "failed to allocate memory", "cublas_status_alloc_failed"))


class Engine:
    """Base class of all backends. Subclasses set `requires`, implement `dtype` and `logits`."""

    name: ClassVar[str] = "?"
    #: (import name, extra that installs it) for every optional package the backend needs.
    requires: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: device type -> precisions the backend can run there; "auto" resolves to the first one.
    precisions: ClassVar[dict[str, tuple[str, ...]]] = {"cpu": ("fp32",)}
    #: True when the backend keeps artefacts in the engine store (takes `store=` and `rebuild=`).
    uses_store: ClassVar[bool] = False

    def __init__(self, bundle: ModelBundle, *, device: Any, precision: str, max_batch: int):
        self.bundle = bundle
        self.device = device
        if getattr(device, "type", None) == "cuda":
            use_cuda_device(device)  # the calling thread's streams, events and graph captures are this GPU's
        self.precision = precision
        self.max_batch = int(max_batch)
        if self.max_batch < 1:
            raise EngineError(f"max_batch must be >= 1, got {max_batch}")
        self._warned_oom = False
        self.create_seconds: float | None = None  # set by create_engine
        self.choice: dict[str, Any] | None = None  # the CPU choice behind an `auto` engine (cpu_choice.py)

    @classmethod
    def missing_package(cls) -> tuple[str, str] | None:
        """(package, extra) of the first required package that is not installed, else None."""
        for package, extra in cls.requires:
            try:
                found = importlib.util.find_spec(package) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                return package, extra
        return None

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """(usable on this machine, why not)."""
        missing = cls.missing_package()
        if missing:
            return False, f"needs {missing[0]}: pip install 'capsule-batch[{missing[1]}]'"
        return True, ""

    @classmethod
    def supports(cls, device_type: str) -> tuple[bool, str]:
        """(can run on this device type, why not)."""
        if device_type not in cls.precisions:
            return False, f"runs on {' or '.join(cls.precisions)} only"
        return True, ""

    @classmethod
    def resolve_precision(cls, precision: str, device_type: str) -> str:
        """`auto` -> the backend's preferred precision on this device; refuse what it cannot run."""
        if precision not in PRECISIONS:
            raise EngineError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
        allowed = cls.precisions.get(device_type, ())
        if precision == "auto":
            return allowed[0]
        if precision not in allowed:
            raise EngineError(f"backend {cls.name} on {device_type} runs {', '.join(allowed)}, not {precision}")
        return precision

    @property
    def dtype(self) -> Any:
        """The torch dtype the engine wants its input pixels in."""
        raise NotImplementedError

    def logits(self, pixels: Any) -> Any:
        """(n, 3, S, S) with n <= max_batch -> logits (n, C) on `self.device` (any float dtype)."""
        raise NotImplementedError

    def infer(self, pixels: Any) -> Any:
        """(N, 3, S, S) -> probabilities (N, C) float32 on `self.device`, any N (in calls of `chunks`).

        Out of device memory: the call is split in halves, `max_batch` is lowered for the rest of
        the run and a warning is logged once. An illegal memory access is re-raised at once.
        """
        import torch

        size_px = self.bundle.preprocess.input_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size_px, size_px):
            raise EngineError(f"{self.name} engine: expected pixels (N, 3, {size_px}, {size_px}), "
                              f"got {tuple(pixels.shape)}")
        if getattr(self.device, "type", None) == "cuda":
            use_cuda_device(self.device)  # also when called from another thread than the one that built it
        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
        outs = [self._probs(pixels[lo:hi]) for lo, hi in chunks(int(pixels.shape[0]), self)]
        if not outs:
            return torch.empty((0, self.bundle.num_classes), dtype=torch.float32, device=self.device)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _probs(self, pixels: Any) -> Any:
        """One backend call with softmax; out of memory: lower `max_batch` and run the same frames in smaller calls."""
        import torch

        size = int(pixels.shape[0])
        try:
            return torch.softmax(self.logits(pixels).float(), dim=-1)
        except Exception as e:
            if not is_out_of_memory(e) or size == 1:
                raise
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        self._back_off(size, reason)  # outside `except`: the traceback no longer pins the failed batch
        return torch.cat([self._probs(pixels[lo:hi]) for lo, hi in chunks(size, self)])

    def _back_off(self, size: int, reason: str) -> None:
        import torch

        self.max_batch = max(1, size // 2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not self._warned_oom:
            _logger.warning("%s engine ran out of memory at batch %d (%s); continuing with batch %d",
                            self.name, size, reason, self.max_batch)
            self._warned_oom = True
        else:
            _logger.info("%s engine: batch lowered to %d", self.name, self.max_batch)

    def describe(self) -> dict[str, Any]:
        """Configuration recorded in study files and benchmark lines."""
        d = {"backend": self.name, "device": str(self.device), "precision": self.precision,
             "max_batch": self.max_batch, "dtype": str(self.dtype).removeprefix("torch.")}
        if self.choice is not None:
            d["choice"] = {k: self.choice[k] for k in ("label", "reason", "stored") if k in self.choice}
        return d

    def close(self) -> None:
        """Release resources; safe to call twice."""


def chunks(n: int, engine: Any) -> Iterator[tuple[int, int]]:
    """How N frames become engine calls: (lo, hi) row ranges of at most `engine.max_batch` frames, the one place
    that cuts batches. `max_batch` is read again for every call, so an out-of-memory back-off applies at once."""
    lo = 0
    while lo < n:
        hi = min(n, lo + max(1, int(engine.max_batch)))
        yield lo, hi
        lo = hi


#: Built-in backend modules register themselves on import.
BACKENDS: Registry[Engine] = Registry("backend", (
    "capsule_batch.backends.torch_engine",
    "capsule_batch.backends.ort_engine",
    "capsule_batch.backends.trt_engine",
))

__all__ = ["BACKENDS", "Engine", "chunks", "is_illegal_access", "is_out_of_memory"]
