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
import time
from collections.abc import Iterator
from typing import Any, ClassVar

from capsule_batch.bundle import ModelBundle
from capsule_batch.devices import PRECISIONS, resolve_device, use_cuda_device
from capsule_batch.errors import EngineError, MissingPackageError
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

#: `auto` tries these (backend, device type) pairs in order; the first that can work here wins. On a CPU the
#: measured choice (cpu_choice.py) decides for auto, fp32 and bf16; this order serves only what it leaves (fp16).
AUTO_ORDER: tuple[tuple[str, str], ...] = (
    ("tensorrt", "cuda"),
    ("torch", "cuda"),
    ("torch", "cpu"),
    ("onnxruntime", "cpu"),
)


#: What `auto` means on CUDA, beyond the backend (AUTO_ORDER) and its first precision: the options each backend
#: gets unless the caller sets them, and the batch size `run` and `bench` use unless --batch-size is given. These
#: are the measured best of benchmarks/gpu_suite.py's engine part (the fastest configuration whose outputs pass
#: the parity check); its `as-run` lines measure exactly this, and it says when another configuration was faster.
#: Until a GPU run has measured them they are the prior stated in docs/gpu.md.
CUDA_AUTO_OPTIONS: dict[str, dict[str, Any]] = {"torch": {"cuda_graphs": True}}
AUTO_BATCH_SIZE: dict[str, int] = {"cuda": 256, "cpu": 64}


def auto_batch_size(device_type: str) -> int:
    """The batch size of a run that gives none: large enough on a GPU to keep it busy between launches."""
    return AUTO_BATCH_SIZE.get(device_type, 64)


def choose_backend(device_type: str) -> str:
    """The `auto` backend for a device type, by AUTO_ORDER; the reasons are logged at debug level."""
    for name, dev in AUTO_ORDER:
        if dev != device_type:
            continue
        cls = BACKENDS.get(name)
        ok, why = cls.available()
        if ok:
            ok, why = cls.supports(device_type)
        if ok:
            return name
        _logger.debug("auto engine: skipping %s on %s (%s)", name, device_type, why)
    raise EngineError(f"no backend can run on {device_type} here (backends: {', '.join(BACKENDS.names())})")


#: backends and precisions among which `auto` on a CPU chooses by measurement (cpu_choice.py)
CPU_CHOICE_BACKENDS = ("auto", "torch", "onnxruntime")
CPU_CHOICE_PRECISIONS = ("auto", "fp32", "bf16")


def create_engine(
    bundle: ModelBundle,
    *,
    backend: str = "auto",
    device: Any = "cpu",
    precision: str = "auto",
    max_batch: int = 64,
    parity_frames: int | None = None,
    **kwargs: Any,
) -> Engine:
    """Build an engine; an explicit backend that cannot work here fails with the reason.

    `device` is a torch.device or a spec (`auto`, `cpu`, `cuda:N`). On CUDA, `precision` `auto` is the backend's
    first (fp16 for torch) and a backend gets `CUDA_AUTO_OPTIONS` for the options not given (torch: CUDA graphs).
    On a CPU, an `auto` backend or precision is the measured CPU choice (cpu_choice.py): the fastest configuration
    this CPU runs natively whose outputs pass parity with fp32 on `parity_frames` frames, stored in the engine
    store and reused. Extra keyword arguments go to the backend: `store` and `rebuild` to those that use the
    engine store (and to the CPU choice); `compile`, `cuda_graphs`, `cast` to torch; `threads` to onnxruntime.
    """
    dev = resolve_device(device if device is None or isinstance(device, str) else str(device))
    if (dev.type == "cpu" and "auto" in (backend, precision) and backend in CPU_CHOICE_BACKENDS
            and precision in CPU_CHOICE_PRECISIONS):
        from capsule_batch.backends.cpu_choice import choose

        t0 = time.perf_counter()
        engine, decision = choose(
            bundle, backend=backend, precision=precision, max_batch=max_batch, store=kwargs.get("store"),
            rebuild=kwargs.get("rebuild", "auto"), parity_frames=parity_frames,
            build=lambda c: build_engine(bundle, c.backend, dev, c.precision, max_batch,
                                         {**_accepted(c.backend, kwargs), **c.options}))
        engine.choice = decision
        engine.create_seconds = round(time.perf_counter() - t0, 3)
        return engine
    name = choose_backend(dev.type) if backend == "auto" else backend
    return build_engine(bundle, name, dev, precision, max_batch, kwargs)


def _accepted(backend: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The options among `kwargs` that `backend` takes (the CPU choice builds several backends from one set)."""
    import inspect

    params = inspect.signature(BACKENDS.get(backend).__init__).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def build_engine(bundle: ModelBundle, name: str, dev: Any, precision: str, max_batch: int,
                 kwargs: dict[str, Any]) -> Engine:
    """One engine of backend `name` on the resolved device `dev`, `precision` resolved by the backend."""
    try:
        cls = BACKENDS.get(name)
    except KeyError as e:
        raise EngineError(str(e.args[0])) from None
    missing = cls.missing_package()
    if missing:
        raise MissingPackageError(missing[0], missing[1], f"the {name} backend")
    ok, why = cls.supports(dev.type)
    if not ok:
        raise EngineError(f"backend {name} cannot run on {dev}: {why}")
    prec = cls.resolve_precision(precision, dev.type)
    if dev.type == "cuda":
        kwargs = {**CUDA_AUTO_OPTIONS.get(name, {}), **kwargs}
    if not cls.uses_store:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("store", "rebuild")}
    t0 = time.perf_counter()
    engine = cls(bundle, device=dev, precision=prec, max_batch=max_batch, **kwargs)
    engine.create_seconds = round(time.perf_counter() - t0, 3)  # a TensorRT build or an ONNX export: minutes
    _logger.info("engine ready in %.1f s: %s", engine.create_seconds, engine.describe())
    return engine


__all__ = ["AUTO_BATCH_SIZE", "AUTO_ORDER", "BACKENDS", "CPU_CHOICE_BACKENDS", "CPU_CHOICE_PRECISIONS",
           "CUDA_AUTO_OPTIONS", "Engine", "auto_batch_size", "build_engine", "choose_backend", "chunks",
           "create_engine", "is_illegal_access", "is_out_of_memory"]
