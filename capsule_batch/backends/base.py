"""The Engine contract (DESIGN.md).

An engine is built from a `ModelBundle` for one device, precision and maximum batch, and maps
preprocessed pixels (N, 3, S, S) to class probabilities (N, C) float32 on the same device, softmax
applied. `N` may be anything from 1 to `max_batch`.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from capsule_batch.bundle import ModelBundle
from capsule_batch.errors import EngineError
from capsule_batch.registry import Registry


class Engine(abc.ABC):
    name: ClassVar[str] = "?"

    def __init__(self, bundle: ModelBundle, *, device: Any, precision: str, max_batch: int):
        self.bundle = bundle
        self.device = device
        self.precision = precision
        self.max_batch = int(max_batch)

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """(usable on this machine, why not)."""
        return True, ""

    @property
    @abc.abstractmethod
    def dtype(self) -> Any:
        """The dtype the engine wants its input pixels in."""

    @abc.abstractmethod
    def infer(self, pixels: Any) -> Any:
        """(N, 3, S, S) -> probabilities (N, C) float32 on `self.device`."""

    def describe(self) -> dict[str, Any]:
        """Configuration recorded in study files and benchmark lines."""
        return {"backend": self.name, "device": str(self.device), "precision": self.precision,
                "max_batch": self.max_batch}

    def close(self) -> None:
        """Release resources; safe to call twice."""


#: Built-in backend modules register themselves on import.
BACKENDS: Registry[Engine] = Registry("backend", ())


def create_engine(
    bundle: ModelBundle,
    *,
    backend: str = "auto",
    device: Any = "cpu",
    precision: str = "auto",
    max_batch: int = 64,
    **kwargs: Any,
) -> Engine:
    """Build an engine; an explicit backend that cannot work here fails with the reason."""
    names = BACKENDS.names()
    if backend == "auto":
        raise EngineError(f"no backend can run here (backends: {', '.join(names) or 'none'})")
    try:
        cls = BACKENDS.get(backend)
    except KeyError as e:
        raise EngineError(str(e.args[0])) from None
    ok, why = cls.available()
    if not ok:
        raise EngineError(f"backend {backend} cannot work here: {why}")
    return cls(bundle, device=device, precision=precision, max_batch=max_batch, **kwargs)
