"""One download per object: concurrent callers for the same key share it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from typing import Generic, TypeVar

from assetd.errors import Timeout

__all__ = ["SingleFlight"]

V = TypeVar("V")


class SingleFlight(Generic[V]):
    """``do(key, fn)`` runs ``fn`` once per key at a time; others wait for its result.

    The call runs on ``submit`` (a bounded pool in the daemon), so a caller
    whose own deadline passes gets ``timeout`` while the download goes on
    for the others and for the cache.
    """

    def __init__(self, submit: Callable[[Callable[[], V]], Future[V]]) -> None:
        self._submit = submit
        self._lock = threading.RLock()  # a finished future runs its callback inline
        self._calls: dict[Hashable, Future[V]] = {}

    def do(self, key: Hashable, fn: Callable[[], V], timeout: float | None) -> tuple[V, bool]:
        """Return ``(value, shared)``; ``shared`` is True for callers that waited on another."""
        with self._lock:
            future = self._calls.get(key)
            if future is not None and future.done():
                future = None  # finished, its callback not yet run: a new call starts afresh
            shared = future is not None
            if future is None:
                future = self._submit(fn)
                self._calls[key] = future
                future.add_done_callback(partial(self._forget, key))
        try:
            return future.result(timeout=timeout), shared
        except FutureTimeout:
            raise Timeout("deadline passed while waiting for the download") from None

    def _forget(self, key: Hashable, future: Future[V]) -> None:
        with self._lock:
            if self._calls.get(key) is future:
                del self._calls[key]

    def in_flight(self) -> int:
        with self._lock:
            return len(self._calls)
