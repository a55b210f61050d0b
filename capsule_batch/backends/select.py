"""What `auto` means, decided in one place: which backend, which precision and options, which batch size.

- On a GPU: the first backend of `AUTO_ORDER` that can run here, its first precision, `CUDA_AUTO_OPTIONS`, and
  `AUTO_BATCH_SIZE`.
- On a CPU: the measured choice (cpu_choice.py) for an `auto` backend or precision among `CPU_CHOICE_BACKENDS` and
  `CPU_CHOICE_PRECISIONS`; `AUTO_ORDER` serves only what it leaves (fp16).
`create_engine` is the one entry that resolves `auto`; callers (run, bench, the GPU suite, `engine build`) go
through it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from capsule_batch.backends import cpu_choice
from capsule_batch.backends.base import BACKENDS, Engine
from capsule_batch.devices import resolve_device
from capsule_batch.errors import EngineError, MissingPackageError
from capsule_batch.model.bundle import ModelBundle

_logger = logging.getLogger(__name__)

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


def choose_backend(device_type: str, precision: str = "auto") -> str:
    """The `auto` backend for a device type (and a precision it must run), by AUTO_ORDER; the reasons are logged at
    debug level."""
    for name, dev in AUTO_ORDER:
        if dev != device_type:
            continue
        cls = BACKENDS.get(name)
        if precision != "auto" and precision not in cls.precisions.get(device_type, ()):
            _logger.debug("auto engine: skipping %s on %s (no %s there)", name, device_type, precision)
            continue
        ok, why = cls.available()
        if ok:
            ok, why = cls.supports(device_type)
        if ok:
            return name
        _logger.debug("auto engine: skipping %s on %s (%s)", name, device_type, why)
    what = device_type if precision == "auto" else f"{device_type} in {precision}"
    raise EngineError(f"no backend can run on {what} here (backends: {', '.join(BACKENDS.names())})")


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
        t0 = time.perf_counter()
        engine, decision = cpu_choice.choose(
            bundle, backend=backend, precision=precision, max_batch=max_batch, store=kwargs.get("store"),
            rebuild=kwargs.get("rebuild", "auto"), parity_frames=parity_frames,
            build=lambda c: build_engine(bundle, c.backend, dev, c.precision, max_batch,
                                         {**_accepted(c.backend, kwargs), **c.options}))
        engine.choice = decision
        engine.create_seconds = round(time.perf_counter() - t0, 3)
        return engine
    name = choose_backend(dev.type, precision) if backend == "auto" else backend
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


__all__ = ["AUTO_BATCH_SIZE", "AUTO_ORDER", "CPU_CHOICE_BACKENDS", "CPU_CHOICE_PRECISIONS", "CUDA_AUTO_OPTIONS",
           "auto_batch_size", "build_engine", "choose_backend", "create_engine"]
