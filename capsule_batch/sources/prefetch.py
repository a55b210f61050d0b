"""Run a producer generator in a thread behind a bounded queue, so decoding overlaps the consumer.

A worker exception is re-raised in the consumer (never a hang), and `close()` stops the thread even
when the consumer stops early: the worker checks a stop flag between items and never blocks forever
on a full queue.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_DONE = object()


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


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
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Raised(e))

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("prefetch worker died without a result") from None
                continue
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item

    def close(self) -> None:
        """Stop the worker and wait for it (it finishes its current item first)."""
        self._stop.set()
        while True:  # unblock a worker waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)


class PrefetchedSource:
    """Mixin for sources whose `_produce()` generator of FrameBatches runs in a prefetch thread.

    The host class sets `prefetch` (queue depth) and `_prefetcher = None` in its constructor; iterating
    counts `frames_decoded`, and stopping early or closing ends the thread.
    """

    prefetch: int
    _prefetcher: Prefetcher | None

    def _produce(self) -> Iterator[Any]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        self.close_prefetcher()
        self.frames_decoded = 0
        name = f"{getattr(self, 'name', 'source')}:{getattr(getattr(self, 'path', None), 'name', '')}"
        self._prefetcher = Prefetcher(self._produce, depth=self.prefetch, name=name)
        try:
            for batch in self._prefetcher:
                self.frames_decoded += len(batch)
                yield batch
        finally:
            self.close_prefetcher()

    def close_prefetcher(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
