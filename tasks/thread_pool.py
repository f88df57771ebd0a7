"""A thread pool made on first use and made again in a forked child, for work that releases the GIL
(numba kernels, OpenCV encoders): a DataLoader worker or a forked batch runner has none of its
parent's threads, so it must not submit to the parent's pool."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class LazyThreadPool:
    """``get()`` returns the pool, creating it with ``workers()`` threads on first use in this process."""

    def __init__(self, workers: Callable[[], int], name: str) -> None:
        self._workers, self._name = workers, name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def get(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=max(1, self._workers()), thread_name_prefix=self._name)
            return self._pool

    def _forget(self) -> None:
        self._pool, self._lock = None, threading.Lock()
