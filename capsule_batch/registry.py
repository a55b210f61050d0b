"""A tiny name -> class registry shared by sources and backends.

Implementations register themselves with a decorator; the registry imports the built-in modules on
first use, so `import capsule_batch` stays cheap and optional packages are imported only inside the
implementation that needs them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, builtin_modules: tuple[str, ...]):
        self.kind = kind
        self._builtin = builtin_modules
        self._items: dict[str, type[T]] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def deco(cls: type[T]) -> type[T]:
            if name in self._items and self._items[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for mod in self._builtin:
                importlib.import_module(mod)

    def names(self) -> list[str]:
        self._load()
        return list(self._items)

    def get(self, name: str) -> type[T]:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r} (choose from {', '.join(self._items)})") from None

    def items(self) -> list[tuple[str, type[T]]]:
        self._load()
        return list(self._items.items())
