"""A bounded local copy of the shard files a worker reads from an object store.

Training reads every row of a cache once per epoch, so a shard file touched once will be touched again
(the rest of its rows this epoch, all of them the next). The first touch reads the wanted rows remotely,
as without this, and queues a download of the whole file on one background thread; once it has landed,
that file's rows are read from the local disk at local speed. Files are written atomically (temporary
name, then rename) and checked against the size the group's manifest committed, so a partial download
is never used; committed cache files never change, so a copy stays valid. When the folder holds more
than `max_bytes`, the least recently used copies are deleted (a DataLoader worker still reading a
deleted copy keeps its mapping). Several workers and ranks may share one folder.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import queue
import threading
import uuid
from collections import OrderedDict

import numpy as np

from .storage import Storage


class ReadThroughCache:
    """Local copies of committed cache files under `directory`, at most `max_bytes` in all."""

    def __init__(self, storage: Storage, directory: str, max_bytes: int) -> None:
        self.storage, self.dir, self.max_bytes = storage, os.path.abspath(directory), max_bytes
        os.makedirs(self.dir, exist_ok=True)
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()
        self._queued: set[str] = set()
        self._lock = threading.Lock()
        self._jobs: queue.Queue[tuple[str, int]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.downloaded = 0  # files this process fetched (for benchmarks and tests)

    def local_name(self, rel: str) -> str:
        """Where the copy of `rel` lives: named by a hash of the full URL, so caches never collide."""
        digest = hashlib.sha256(self.storage.path(rel).encode()).hexdigest()[:32]
        return os.path.join(self.dir, digest[:2], digest)

    def mapped(self, rel: str, size: int) -> np.ndarray | None:
        """The local copy of `rel` mapped read-only, or None (then a download is queued)."""
        with self._lock:
            m = self._maps.get(rel)
            if m is not None:
                self._maps.move_to_end(rel)
                return m
        path = self.local_name(rel)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._queue(rel, size)
            return None
        try:
            if os.fstat(fd).st_size != size:  # not ours to trust: fetch again
                self._queue(rel, size)
                return None
            m = np.frombuffer(mmap.mmap(fd, size, prot=mmap.PROT_READ), np.uint8) if size else np.empty(0, np.uint8)
        finally:
            os.close(fd)
        os.utime(path)  # recency for eviction, shared by every process using the folder
        with self._lock:
            self._maps[rel] = m
            if len(self._maps) > 1024:
                self._maps.popitem(last=False)
        return m

    def _queue(self, rel: str, size: int) -> None:
        with self._lock:
            if rel in self._queued:
                return
            self._queued.add(rel)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lf-read-through", daemon=True)
                self._thread.start()
        self._jobs.put((rel, size))

    def _run(self) -> None:
        while True:
            rel, size = self._jobs.get()
            try:
                self._download(rel, size)
            except Exception:  # noqa: BLE001 - a failed copy only means reading remotely; the next touch retries
                pass
            finally:
                with self._lock:
                    self._queued.discard(rel)

    def _download(self, rel: str, size: int) -> None:
        path = self.local_name(rel)
        if os.path.exists(path) and os.path.getsize(path) == size:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            self.storage.fs.get_file(self.storage.path(rel), tmp)
            if os.path.getsize(tmp) != size:
                return  # the store holds another size than the manifest committed: never use it
            self._evict(size)
            os.replace(tmp, path)
            self.downloaded += 1
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _evict(self, incoming: int) -> None:
        """Delete the least recently used copies until `incoming` more bytes fit under `max_bytes`."""
        files = []
        for root, _, names in os.walk(self.dir):
            for name in names:
                if not name.endswith(".tmp"):
                    p = os.path.join(root, name)
                    try:
                        st = os.stat(p)
                    except FileNotFoundError:
                        continue
                    files.append((st.st_mtime, st.st_size, p))
        total = sum(f[1] for f in files) + incoming
        for _, nbytes, p in sorted(files):
            if total <= self.max_bytes:
                break
            try:
                os.unlink(p)
                total -= nbytes
            except FileNotFoundError:
                pass
