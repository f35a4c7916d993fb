"""Row chunks fetched ahead for one DataLoader worker, kept until that worker reads them.

In the shard-window order with several readers of one window (ranks x DataLoader workers), fetching the
window's shard files whole would make each of them download every file although it reads only its share
of the rows: an epoch would cost `ranks x workers` times the cache's bytes from the store. Instead each
worker fetches the byte ranges of exactly the rows its coming micro-batches hold (merged where adjacent,
all in flight together: `range_reads`), keyed by (file, offset), and the read of a micro-batch takes its
rows from here. A row is held once: taking it frees it (every row is read once per epoch). A row still
being fetched makes its reader wait for that request instead of sending another; a row that is not here
(not fetched yet, failed, dropped for memory) is read directly by the caller, and a later prefetch skips it
(recently read rows are remembered). At most `max_rows` are held, oldest dropped first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping

Key = Hashable  # (file, offset) in practice


class RowMemory:
    """Prefetched row chunks by key, with fetches under way visible to readers."""

    def __init__(self, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self._held: OrderedDict[Key, memoryview] = OrderedDict()
        self._pending: dict[Key, threading.Event] = {}
        self._recent: OrderedDict[Key, None] = OrderedDict()  # taken or read directly: not to be fetched again
        self._lock = threading.Lock()
        self.fetched = 0  # rows this worker fetched ahead (benchmarks and tests)

    def claim(self, keys: Iterable[Key]) -> list[Key]:
        """The keys neither held nor being fetched, now marked as being fetched by the caller, who must
        then `fill` or `drop` each."""
        mine = []
        with self._lock:
            for key in keys:
                if key not in self._held and key not in self._pending and key not in self._recent:
                    self._pending[key] = threading.Event()
                    mine.append(key)
        return mine

    def fill(self, chunks: Mapping[Key, memoryview]) -> None:
        """Hold the fetched chunks of claimed keys; readers waiting for them go on."""
        with self._lock:
            for key, chunk in chunks.items():
                self._held[key] = chunk
                self._pending.pop(key).set()
            self.fetched += len(chunks)
            while len(self._held) > self.max_rows:
                self._held.popitem(last=False)

    def drop(self, keys: Iterable[Key]) -> None:
        """Give up claimed keys (their fetch failed): readers waiting for them read them themselves."""
        with self._lock:
            for key in keys:
                event = self._pending.pop(key, None)
                if event is not None:
                    event.set()

    def take(self, key: Key) -> memoryview | None:
        """The chunk of `key`, removed from memory (waiting while it is being fetched), or None: the caller
        reads it itself, and no prefetch fetches it again while it is remembered as read."""
        with self._lock:
            chunk = self._held.pop(key, None)
            event = self._pending.get(key) if chunk is None else None
            if event is None:
                self._read(key)
                return chunk
        event.wait()
        with self._lock:
            self._read(key)
            return self._held.pop(key, None)

    def _read(self, key: Key) -> None:
        self._recent[key] = None
        while len(self._recent) > 4 * self.max_rows:
            self._recent.popitem(last=False)
