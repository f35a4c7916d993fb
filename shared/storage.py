"""Where a cache lives: a local folder or an fsspec URL, behind the few operations the format needs.

Local disks get the fast, crash-safe paths (atomic replace, directory rename, read-only mappings of
committed files for every read); object stores get fsspec with the commit-marker protocol instead of renames.
Credentials never pass through here as arguments from the config: fsspec/botocore read them from the
environment or a credentials file.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

from .faults import fault_point

_MAX_MAPS = 4096


class StorageWriteError(RuntimeError):
    """A write to the cache location failed (disk full, permission denied, read-only file system...).

    One line naming the file (or folder) and the reason; the message never carries the OS error's own
    text beyond `strerror(errno)`, because object-store errors can echo request details.
    """

    def __init__(self, where: str, exc: BaseException) -> None:
        code = getattr(exc, "errno", None)
        name = errno.errorcode.get(code) if isinstance(code, int) else None
        why = f"{os.strerror(code)} [{name}]" if name else type(exc).__name__
        self.where, self.errno = where, code
        super().__init__(f"cannot write {where}: {why}; committed data is intact, fix the storage and re-run")


class Storage:
    """A root location plus the operations the cache format uses, relative to it."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/") if "://" in url else str(Path(url).absolute())
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        self.is_local = protocol in ("file", "local")
        if self.is_local:
            self.url = self.url.removeprefix("file://")
        self.storage_options = _with_pool(protocol, storage_options or {})
        self.fs = fsspec.filesystem(protocol, **self.storage_options)
        self._map_lock = threading.Lock()
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()
        self._ranges: Any = None  # the S3 range client, made on first use (`cat_ranges`)

    def path(self, rel: str = "") -> str:
        return f"{self.url}/{rel}" if rel else self.url

    @contextmanager
    def writing(self, rel: str = "") -> Iterator[None]:
        """Turn an OSError raised while writing under `rel` into one `StorageWriteError` line."""
        try:
            yield
        except StorageWriteError:
            raise
        except OSError as exc:
            where = exc.filename if isinstance(exc.filename, str) and self.is_local else self.path(rel)
            raise StorageWriteError(where, exc) from None

    def _fresh(self, target: str) -> None:
        # Object-store listings are cached per process; other ranks and zarr's own (async) filesystem
        # instance write behind this one's back, so never answer "what is there" from that cache.
        if not self.is_local:
            self.fs.invalidate_cache(target)

    def exists(self, rel: str) -> bool:
        if self.is_local:
            return os.path.exists(self.path(rel))
        self._fresh(self.path(rel))
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        if self.is_local:
            return Path(self.path(rel)).read_bytes()
        return self.fs.cat_file(self.path(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_text_atomic(self, rel: str, text: str) -> None:
        """Readers see the old content or the new one, never a torn write."""
        target = self.path(rel)
        with self.writing(rel):
            if not self.is_local:
                fault_point("write:" + rel.rsplit("/", 1)[-1])  # an object PUT is atomic: nothing to tear
                self.fs.pipe_file(target, text.encode("utf-8"))
                return
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.{uuid.uuid4().hex}.tmp"
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                fault_point("write:" + rel.rsplit("/", 1)[-1])
                os.replace(tmp, target)
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
            _fsync_dir(os.path.dirname(target))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file (creating folders). Not atomic: used inside uncommitted groups only."""
        target = self.path(rel)
        if not self.is_local:
            self.fs.pipe_file(target, data)
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)

    def listdir(self, rel: str) -> list[str]:
        """Names (not paths) of entries directly under `rel`; empty if it does not exist."""
        base = self.path(rel)
        if self.is_local:
            return sorted(os.listdir(base)) if os.path.isdir(base) else []
        self._fresh(base)
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False))
        except FileNotFoundError:
            return []

    def file_sizes(self, rel: str) -> dict[str, int]:
        """Every file under `rel` with its size, keyed by path relative to `rel`."""
        base = self.path(rel)
        out: dict[str, int] = {}
        if self.is_local:
            for d, _, files in os.walk(base):
                for name in files:
                    full = os.path.join(d, name)
                    out[os.path.relpath(full, base)] = os.path.getsize(full)
            return out
        self._fresh(base)
        root = self.fs._strip_protocol(base).rstrip("/")
        for full, info in self.fs.find(base, detail=True).items():
            out[full[len(root) :].lstrip("/")] = int(info["size"])
        return out

    def remove_tree(self, rel: str) -> None:
        target = self.path(rel)
        if self.is_local:
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target, ignore_errors=True)
            elif os.path.lexists(target):
                os.remove(target)
            return
        with self.writing(rel):
            if self.exists(rel):
                self.fs.rm(target, recursive=True)

    def remove_file(self, rel: str) -> None:
        target = self.path(rel)
        with self.writing(rel):
            if self.is_local:
                if os.path.exists(target):
                    os.remove(target)
            elif self.exists(rel):
                self.fs.rm_file(target)

    def rename_dir(self, src: str, dst: str) -> None:
        """Atomic on local disks: the group appears at its final name complete or not at all."""
        assert self.is_local, "object stores use the commit marker, not renames"
        with self.writing(dst):
            os.rename(self.path(src), self.path(dst))
            _fsync_dir(os.path.dirname(self.path(dst)))

    def copy_tree(self, src: str, dst: str) -> None:
        """Copy a folder (object stores: server-side copies), e.g. to keep a readable copy of a group
        while it is rewritten in place."""
        with self.writing(dst):
            if self.is_local:
                shutil.copytree(self.path(src), self.path(dst))
            else:
                self._fresh(self.path(src))
                self.fs.copy(self.path(src), self.path(dst), recursive=True)

    def mtime(self, rel: str) -> float | None:
        """Last-modified time (seconds since the epoch) of a local file or folder; None if unknown."""
        if not self.is_local:
            return None
        try:
            return os.stat(self.path(rel)).st_mtime
        except FileNotFoundError:
            return None

    def zarr_store(self, rel: str, read_only: bool = False) -> Any:
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            return LocalStore(self.path(rel), read_only=read_only)
        return FsspecStore.from_url(self.path(rel), storage_options=self.storage_options, read_only=read_only)

    def read_range(self, rel: str, start: int, length: int) -> bytes:
        """Bytes [start, start+length) of a file; the hot path of the reader."""
        if not self.is_local:
            return self.fs.cat_file(self.path(rel), start=start, end=start + length)
        # The reader maps the file for its rows anyway: one open per file, no descriptor kept.
        data = self.map_file(rel)[start : start + length].tobytes()
        if len(data) != length:
            raise OSError(f"{self.path(rel)}: short read ({len(data)} of {length} bytes at {start}); file truncated?")
        return data

    def cat_ranges(self, paths: list[str], starts: list[int], ends: list[int],
                   in_flight: int) -> list[bytes | memoryview | BaseException]:
        """Bytes `[start, end)` of each of `paths` (full URLs under this location), at most `in_flight`
        requests at once; a failed request's exception in its place. S3 goes through `S3Ranges` (less
        CPU per byte than s3fs's reads, `s3_ranges.py`) unless s3fs was set up in a way it cannot carry."""
        if self._ranges is None:
            from . import s3_ranges

            s3 = self.url.split("://", 1)[0] in ("s3", "s3a")
            self._ranges = s3_ranges.S3Ranges(self.fs) if s3 and s3_ranges.usable(self.fs) else False
        if self._ranges:
            return self._ranges.cat_ranges(paths, starts, ends, in_flight)
        kwargs = {"batch_size": in_flight} if getattr(self.fs, "async_impl", False) else {}
        return list(self.fs.cat_ranges(paths, starts, ends, on_error="return", **kwargs))

    def map_file(self, rel: str) -> np.ndarray:
        """A local file mapped read-only, as uint8: the reader decodes rows straight from the page cache
        into the batch instead of `pread`-ing each range into a new bytes object first (1.2x faster with
        blosc-lz4, 1.7x uncompressed; docs/benchmarks.md). Committed cache files never change, so a
        mapping stays valid; the least recently used is dropped beyond `_MAX_MAPS` (the kernel's
        vm.max_map_count is ~65k mappings per process)."""
        if not self.is_local:
            raise ValueError(f"{self.path(rel)}: only local files can be mapped")
        with self._map_lock:
            m = self._maps.get(rel)
            if m is not None:
                self._maps.move_to_end(rel)
                return m
            fd = os.open(self.path(rel), os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                # An empty file cannot be mapped; it has no rows to read either.
                m = np.frombuffer(mmap.mmap(fd, size, prot=mmap.PROT_READ), np.uint8) if size else np.empty(0, np.uint8)
            finally:
                os.close(fd)
            self._maps[rel] = m
            if len(self._maps) > _MAX_MAPS:
                self._maps.popitem(last=False)  # unmapped when the last view of it goes
            return m

    def file_size(self, rel: str) -> int:
        if self.is_local:
            return os.path.getsize(self.path(rel))
        self._fresh(self.path(rel))
        return int(self.fs.size(self.path(rel)))

    def close(self) -> None:
        with self._map_lock:
            self._maps.clear()

    def __getstate__(self) -> dict[str, Any]:
        # Mappings do not survive pickling into DataLoader workers; each worker maps its own.
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        state["_map_lock"] = None
        state["_ranges"] = None  # threads, connections and buffers are each process's own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._map_lock = threading.Lock()


# botocore keeps 10 connections per client by default: a reader with a batch's ranges and the read-ahead
# of the next batches in flight needs more, or requests queue for a connection instead of overlapping.
S3_POOL_CONNECTIONS = 64


def _with_pool(protocol: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` with a larger S3 connection pool unless the user chose one (`config_kwargs`)."""
    if protocol not in ("s3", "s3a"):
        return options
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("max_pool_connections", S3_POOL_CONNECTIONS)
    return {**options, "config_kwargs": config}


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
