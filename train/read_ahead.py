"""Reading ahead inside each DataLoader worker, for caches on object stores.

A DataLoader worker handles its micro-batches one after the other; against a store that answers each
request after 20-50 ms, a worker would spend its time waiting even with every range of a batch in
flight at once. The sampler order is fixed in advance and the DataLoader hands micro-batch i to worker
i mod W, so each micro-batch can carry the next few that the same worker will be asked for
(`WithAhead`); the worker starts reading those on a small thread pool while it returns the current one,
keeping `depth` micro-batches in flight. What a step receives is unchanged, in the same order: only
when it is read moves. A prediction that misses (a worker restarted) costs a synchronous read, never a
wrong batch. With a `horizon` beyond `depth`, each item also names the worker's items after those
(`later`): in the shard-window order the worker fetches their shard files in the background, so the
next window's files arrive while it still serves the current one.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class WithAhead(Generic[T]):
    """A sampler item, and the items the same worker will be asked for after it (nearest first)."""

    item: T
    ahead: tuple[T, ...]
    later: tuple[T, ...] = ()  # the worker's items after `ahead`, up to the horizon: files to prefetch


class ReadAheadSampler(Generic[T]):
    """Wraps a sampler so each item carries the next `depth` items of the same DataLoader worker (and
    those up to `horizon`, if larger, as `later`)."""

    def __init__(self, inner: Iterable[T], workers: int, depth: int, horizon: int = 0) -> None:
        self.inner, self.stride, self.depth, self.horizon = inner, max(1, workers), depth, max(depth, horizon)

    def __iter__(self) -> Iterator[WithAhead[T]]:
        window: deque[T] = deque()
        reach = self.stride * self.horizon
        for item in self.inner:
            window.append(item)
            if len(window) > reach:
                yield self._head(window)
                window.popleft()
        while window:
            yield self._head(window)
            window.popleft()

    def _head(self, window: deque[T]) -> WithAhead[T]:
        mine = [window[k * self.stride] for k in range(1, self.horizon + 1) if k * self.stride < len(window)]
        return WithAhead(window[0], tuple(mine[: self.depth]), tuple(mine[self.depth:]))


class ReadAheadReader(Generic[T]):
    """Per worker: `get(item, ahead)` returns `read(item)`, having started `read` of each item in `ahead`
    on `depth` threads. At most 2 x depth results are held."""

    def __init__(self, read: Callable[[T], Any], depth: int) -> None:
        self.read, self.depth = read, depth
        self._pool: ThreadPoolExecutor | None = None
        self._futures: OrderedDict[T, Future[Any]] = OrderedDict()

    def get(self, item: T, ahead: Iterable[T]) -> Any:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.depth, thread_name_prefix="lf-read-ahead")
        for nxt in ahead:
            if nxt not in self._futures and nxt != item:
                self._futures[nxt] = self._pool.submit(self.read, nxt)
        future = self._futures.pop(item, None)
        while len(self._futures) > 2 * self.depth:  # predictions that never came: drop the oldest
            self._futures.popitem(last=False)[1].cancel()
        return future.result() if future is not None else self.read(item)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._futures.clear()
