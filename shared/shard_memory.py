"""Whole shard files of a cache on an object store, fetched with one request each and kept in memory.

With the shard-window order (`train/shard_window.py`) a worker reads the rows of a few shard files for
many micro-batches in a row, so fetching each file whole (one request, at the size its group's manifest
committed) and serving rows from memory replaces one request per row by one per file. At most
`max_files` files are kept, least recently used dropped first; a call that is still decoding from a
dropped file holds its own reference, so memory is at most `max_files` files plus those of the calls in
flight (the read-ahead's). Concurrent callers (read-ahead threads) that want the same file wait for the
one request already out for it instead of sending another. A big file goes out as a few parts of
`PART` bytes in flight together: against S3 one connection carries ~100 MB/s, so several streams per file
fetch it faster, and a part is still far more data than a request's latency costs (on loopback, where
one stream is fast, 32 MB parts measured as fast as one GET per file: docs/benchmarks.md).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping

from .range_reads import IN_FLIGHT, Span, read_spans
from .storage import Storage

PART = 32 << 20


class PartedFile:
    """A file's bytes as the parts they arrived in (`part` bytes each, the last shorter): joining them into
    one buffer would copy every byte once more on the worker's core, which it needs for decoding."""

    def __init__(self, parts: list[bytes | memoryview], part: int) -> None:
        self.parts, self.part = [memoryview(p) for p in parts], part
        self.size = sum(len(p) for p in self.parts)

    def __len__(self) -> int:
        return self.size

    def slice(self, start: int, end: int) -> memoryview | bytes:
        """Bytes `[start, end)`: a view into one part, or the pieces of several joined (a row chunk that
        straddles a part boundary, rare with parts far larger than rows)."""
        if end <= start:
            return b""
        first, last = start // self.part, (end - 1) // self.part
        if first == last:
            base = first * self.part
            return self.parts[first][start - base: end - base]
        pieces = []
        for i in range(first, last + 1):
            base = i * self.part
            pieces.append(self.parts[i][max(start, base) - base: min(end, base + self.part) - base])
        return b"".join(pieces)


class _Pending:
    """A fetch under way: other callers wait on `done`, then read `data` (None: it failed, fetch again)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.data: PartedFile | None = None


class ShardMemory:
    """Whole files of `storage` by relative path, at most `max_files` kept (LRU)."""

    def __init__(self, storage: Storage, max_files: int, in_flight: int = IN_FLIGHT) -> None:
        if max_files < 1:
            raise ValueError(f"max_files must be >= 1, got {max_files}")
        self.storage, self.max_files, self.in_flight = storage, max_files, in_flight
        self._files: OrderedDict[str, PartedFile] = OrderedDict()
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self.fetched = 0  # files this process requested (benchmarks and tests)

    def get_many(self, sizes: Mapping[str, int]) -> dict[str, PartedFile]:
        """The bytes of every file in `sizes` (relative path -> committed size): kept ones at once, the
        missing ones in one concurrent round of whole-file requests (retried as `read_spans` does)."""
        out: dict[str, PartedFile] = {}
        while len(out) < len(sizes):
            mine: dict[str, _Pending] = {}
            theirs: dict[str, _Pending] = {}
            with self._lock:
                for rel in sizes:
                    if rel in out:
                        continue
                    if rel in self._files:
                        self._files.move_to_end(rel)
                        out[rel] = self._files[rel]
                    elif rel in self._pending:
                        theirs[rel] = self._pending[rel]
                    else:
                        mine[rel] = self._pending[rel] = _Pending()
            if mine:
                self._fetch(mine, sizes)
                out.update({rel: p.data for rel, p in mine.items() if p.data is not None})
            for rel, pending in theirs.items():
                pending.done.wait()
                if pending.data is not None:  # else: their fetch failed; the next round asks again
                    out[rel] = pending.data
        return out

    def _fetch(self, mine: Mapping[str, _Pending], sizes: Mapping[str, int]) -> None:
        rels = list(mine)
        spans = [Span(rel, lo, min(lo + PART, sizes[rel]), (i,)) for i, rel in enumerate(rels)
                 for lo in range(0, sizes[rel], PART)]
        try:
            parts = read_spans(self.storage, spans, in_flight=self.in_flight)
            blobs: list[PartedFile] = []
            for i in range(len(rels)):
                blobs.append(PartedFile([p for span, p in zip(spans, parts, strict=True) if span.members == (i,)], PART))
        except BaseException:
            with self._lock:
                for rel in rels:
                    del self._pending[rel]
            for pending in mine.values():
                pending.done.set()  # waiters see no data and fetch themselves (and fail the same way)
            raise
        with self._lock:
            for rel, blob in zip(rels, blobs, strict=True):
                mine[rel].data = blob
                self._files[rel] = blob
                del self._pending[rel]
            while len(self._files) > self.max_files:
                self._files.popitem(last=False)
            self.fetched += len(rels)
        for pending in mine.values():
            pending.done.set()
