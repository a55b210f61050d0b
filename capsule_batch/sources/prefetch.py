"""Run a producer generator in a thread behind a bounded queue, so producing overlaps the consumer.

The pipeline's decode stage is one of these around a `FrameSource` (capsule_batch.run.stages): the only thread
a recording is decoded in. A worker exception is re-raised in the consumer (never a hang), a worker that ends
without a result is an error, and `close()` stops the thread even when the consumer stops early: the worker
checks a stop flag between items and never blocks forever on a full queue.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

#: what `Prefetcher.get` returns once the producer is exhausted
END = object()


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


class WorkerDied(RuntimeError):
    """The worker thread ended without handing on an end or an error."""


class Prefetcher:
    """Iterate `produce()` in a daemon thread, at most `depth` items ahead of the consumer."""

    def __init__(self, produce: Callable[[], Iterator[Any]], depth: int = 2, name: str = "prefetch"):
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._produce = produce
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._produce():
                if not self._put(item):
                    return
            self._put(END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Raised(e))

    def get(self, timeout: float | None = None) -> Any:
        """The next item, or `END` after the last one. Re-raises the worker's exception; `queue.Empty` when
        nothing came within `timeout` seconds (None: wait); `WorkerDied` when the worker is gone without a result."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise WorkerDied(f"{self._thread.name}: the worker thread ended without a result") from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                continue
            if isinstance(item, _Raised):
                raise item.exc
            return item

    def __iter__(self) -> Iterator[Any]:
        while (item := self.get()) is not END:
            yield item

    def close(self, timeout: float = 30) -> None:
        """Stop the worker and wait for it up to `timeout` seconds (it finishes its current item first)."""
        self._stop.set()
        while True:  # unblock a worker waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout)
