"""Receive buffers for large object-store reads, reused once nothing refers to them.

Memory fresh from the kernel costs a page fault per 4 KB on first touch: receiving 1 GB into new
buffers measured 0.8-5 CPU-s here (a VM, where faults are dear), into reused ones 0.3 CPU-s, the
socket copy alone. Readers hold what they fetched for a while (whole shard files for a window, rows
until their batch is read) through views of the buffer, and drop them without telling anyone; so a
buffer counts as free when its reference count says only the pool holds it (every `memoryview` and
every numpy array made from one keeps a reference to it), and is handed out again. Idle buffers are
kept up to `keep_bytes`; small requests get their own `bytearray` (the allocator serves those from
memory it already has).

Buffers are anonymous mappings, not numpy arrays: numpy advises the kernel to back large arrays with
huge pages, and with this kernel's default (`defrag: madvise`) the first touch of such memory may stall
on compacting memory for them; receiving into fresh numpy buffers measured 3x the worker CPU of plain
mappings (0.57 against 1.7 thousand samples/s, `bench/objstore_read.py` before buffers are reused).
"""

from __future__ import annotations

import mmap
import os
import sys
import threading

SMALL = 1 << 20  # below this, a fresh bytearray: no page-fault cost worth pooling
GRAIN = 1 << 20  # new buffers are whole MBs, so buffers fit later requests of nearly the same size
KEEP_BYTES = 2 << 30  # per process: a window of whole shard files (`shard_memory.py`) fits


def _count(buffers: list[mmap.mmap], i: int) -> int:
    return sys.getrefcount(buffers[i])


_IDLE = _count([mmap.mmap(-1, mmap.PAGESIZE)], 0)  # the count of a buffer only its list refers to


def _idle(buffers: list[mmap.mmap], i: int) -> bool:
    """Nothing but the pool's list refers to `buffers[i]` (call with no other name bound to it)."""
    return _count(buffers, i) == _IDLE


class BufferPool:
    """Writable buffers of at least the asked size, reused once every view of them is gone."""

    def __init__(self, keep_bytes: int = KEEP_BYTES) -> None:
        self.keep_bytes = keep_bytes
        self._buffers: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self.allocated = 0  # bytes of new pooled buffers so far (tests, benchmarks)

    def take(self, nbytes: int) -> memoryview:
        """A writable view of exactly `nbytes` bytes; it (and views of it) keeps the buffer in use."""
        if nbytes < SMALL:
            return memoryview(bytearray(nbytes))
        with self._lock:
            best = None
            for i in range(len(self._buffers)):
                # The smallest idle buffer that fits, unless it would waste more than it holds.
                size = len(self._buffers[i])
                if nbytes <= size <= 2 * nbytes and (best is None or size < len(self._buffers[best])) and _idle(
                        self._buffers, i):
                    best = i
            if best is not None:
                return memoryview(self._buffers[best])[:nbytes]
            size = -(-nbytes // GRAIN) * GRAIN
            self._make_room(size)
            fresh = mmap.mmap(-1, size)  # pages are mapped as the receive first writes them
            self.allocated += size
            if sum(len(b) for b in self._buffers) + size <= self.keep_bytes:
                self._buffers.append(fresh)
            return memoryview(fresh)[:nbytes]

    def _make_room(self, size: int) -> None:
        """Drop idle buffers (largest first) until `size` more bytes fit under `keep_bytes`."""
        total = sum(len(b) for b in self._buffers)
        if total + size <= self.keep_bytes:
            return
        idle = sorted((i for i in range(len(self._buffers)) if _idle(self._buffers, i)),
                      key=lambda i: -len(self._buffers[i]))
        drop = set()
        for i in idle:
            if total + size <= self.keep_bytes:
                break
            total -= len(self._buffers[i])
            drop.add(i)
        self._buffers = [b for i, b in enumerate(self._buffers) if i not in drop]

    def held_bytes(self) -> int:
        """Bytes of buffers the pool keeps (in use or idle)."""
        with self._lock:
            return sum(len(b) for b in self._buffers)


_process_pool: tuple[int, BufferPool] | None = None


def process_pool() -> BufferPool:
    """This process's pool, shared by every reader in it (a forked child starts its own, empty one)."""
    global _process_pool
    if _process_pool is None or _process_pool[0] != os.getpid():
        _process_pool = (os.getpid(), BufferPool())
    return _process_pool[1]
