"""How the cache job keeps its encoder busy: preparation ahead of it, writes behind it.

`ordered_map`: image decoding, resizing and upscaling on worker threads, a bounded number ahead.
`WriteBehind`: the writes of a cache group on a background thread, so the encoder computes the next
batch meanwhile. The encoder is the expensive part of the cache job; compressing and writing a batch (blosc/zstd release
the GIL) can run beside it. One write at a time, in submission order (rows land in a group's arrays in
the order they were encoded); at most one batch is waiting, which bounds the memory held to two batches.
`wait()` before anything that needs the writes done (flush, commit, abort); an error of a write is
raised there, in the job's thread. `timed_reads` and `waited` charge the job thread's time reading the
shard and waiting for prepared samples to the shard's stats (`read`, `prepare_wait`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], ahead: int) -> Iterator[tuple[T, Future]]:
    """Like `pool.map`, in input order, but bounded: at most `ahead` items in flight (memory stays flat)."""
    window: deque[tuple[T, Future]] = deque()
    for item in items:
        window.append((item, pool.submit(fn, item)))
        if len(window) >= ahead:
            yield window.popleft()
    while window:
        yield window.popleft()


class WriteBehind:
    """Runs `submit`ted writes one after another on one thread; `waited` is the encoder's blocked time."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-write")
        self._pending: Future[float] | None = None
        self.waited = 0.0  # seconds the job's thread spent waiting for writes
        self.written = 0.0  # seconds the writes themselves took, on the write thread

    def submit(self, write: Callable[..., Any], *args: Any) -> None:
        """Start `write(*args)` once the previous write is done."""
        self.wait()

        def timed() -> float:
            t = time.perf_counter()
            write(*args)
            return time.perf_counter() - t

        self._pending = self._pool.submit(timed)

    def wait(self) -> None:
        """Block until the submitted write is done; re-raise its error."""
        if self._pending is None:
            return
        t = time.perf_counter()
        try:
            self.written += self._pending.result()
        finally:
            self._pending = None
            self.waited += time.perf_counter() - t

    def close(self) -> None:
        """Finish the last write (its error raised) and stop the thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def timed_reads(reader: Iterable[Any], stats: Any) -> Iterator[Any]:
    """Charge the time spent pulling samples out of the shard (network, tar parsing) to `read`."""
    it = iter(reader)
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            stats.add("read", time.perf_counter() - t)
            return
        stats.add("read", time.perf_counter() - t)
        yield item


def waited(prepared: Iterable[Any], stats: Any) -> Iterator[Any]:
    """Charge the time the encoder's thread waits for the next prepared sample (its reading excluded) to
    `prepare_wait`: what `cache_overlap` loses to preparation."""
    it = iter(prepared)
    while True:
        t, read = time.perf_counter(), stats.seconds.get("read", 0.0)
        try:
            item = next(it)
        except StopIteration:
            return
        stats.add("prepare_wait", max(0.0, time.perf_counter() - t - (stats.seconds.get("read", 0.0) - read)))
        yield item
