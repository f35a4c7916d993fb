"""Reads rows of the big (per-row-chunked) fields of a cache straight from their Zarr shard files.

Why not zarr-python: measured here, zarr-python spends ~8 ms of Python per single-row read of a sharded
array (129 samples/s, ten times slower than one `.npz` per sample). A big field stores one chunk per row
inside shard files of `shard_rows` rows, so a row is one byte range: this module parses each shard
file's index once (the standard sharding-codec index at the end of the file, crc32c-checked), then
decodes each row straight from a read-only mapping of the file (local disks) or, for object stores, from
merged ranges fetched in one concurrent round per batch (`range_reads.py`) into the caller's batch buffer,
or, with a `ShardMemory` (shard-window order, one reader), from whole shard files kept in memory, each
fetched with one request (its index parsed from its tail), or, with a `RowMemory` (shard-window order,
several readers), from the row chunks fetched ahead for this worker alone. `CacheReader` owns one per opened cache.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numcodecs
import numpy as np

from .cache_format import SHARDS_DIR, CacheFormatError, FieldSpec, GroupManifest
from .range_reads import IN_FLIGHT, Span, coalesce, read_spans
from .read_through import ReadThroughCache
from .row_memory import RowMemory
from .shard_memory import PartedFile, ShardMemory
from .storage import Storage

_EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass
class _RowArray:
    """A per-row-chunked array of one (group, bucket, field): shard files plus their parsed indexes."""

    rel: str  # path of the array folder, relative to the cache root
    rows: int
    shard_rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype
    decoder: Any  # numcodecs codec or None
    expected_sizes: Mapping[str, int]
    indexes: dict[int, np.ndarray]

    def shard_file(self, shard: int) -> str:
        return f"{self.rel}/c/{shard}" + "/0" * len(self.row_shape)


def _decoder_for(codecs: Sequence[Mapping[str, Any]]) -> Any:
    names = [c["name"] for c in codecs]
    if names == ["bytes"]:
        return None
    if names[:1] == ["bytes"] and len(names) == 2 and names[1] in ("blosc", "zstd"):
        return numcodecs.Blosc() if names[1] == "blosc" else numcodecs.Zstd()
    raise CacheFormatError(f"unsupported inner codec chain {names}")


def _bytes_of(blob: PartedFile | np.ndarray, start: int, end: int) -> memoryview | bytes:
    """Bytes `[start, end)` of a whole file: fetched in parts (`PartedFile`) or a local copy's mapping."""
    return blob.slice(start, end) if isinstance(blob, PartedFile) else memoryview(blob)[start:end]


def _group_dir(storage: Storage, rel: str) -> str:
    """The group folder of a path under `shards/<group id>/`, as shown in errors."""
    return storage.path("/".join(rel.split("/")[:2]))


class RowFieldReader:
    """Per-row reads of big fields for one cache: shard indexes parsed once, then kept."""

    def __init__(self, storage: Storage, manifests: Mapping[str, GroupManifest], in_flight: int = IN_FLIGHT,
                 read_through: ReadThroughCache | None = None, shard_memory: ShardMemory | None = None,
                 row_memory: RowMemory | None = None) -> None:
        self.storage = storage
        self.manifests = manifests
        self.in_flight = in_flight
        self.read_through = read_through  # object stores: local copies of shard files (`read_through.py`)
        self.shard_memory = shard_memory  # object stores: whole shard files in memory (`shard_memory.py`)
        self.row_memory = row_memory  # object stores: this worker's coming rows, fetched ahead (`row_memory.py`)
        self._arrays: dict[tuple[str, str, str], _RowArray] = {}
        self._prefetcher: ThreadPoolExecutor | None = None  # one thread: whole-file prefetches, in order
        self._queued: list[tuple[Sequence[str], str, FieldSpec, np.ndarray, np.ndarray]] = []
        self._queued_lock = threading.Lock()

    def read(self, groups: Sequence[str], name: str, spec: FieldSpec, gidx: np.ndarray, local: np.ndarray,
             out: np.ndarray) -> None:
        """Fill `out[i]` with row `local[i]` of group `groups[gidx[i]]`, bucket `name`, field `spec`."""
        self.read_fields([(groups, name, spec, gidx, local, out)])

    def read_fields(self, jobs: Sequence[tuple[Sequence[str], str, FieldSpec, np.ndarray, np.ndarray, np.ndarray]]) -> None:
        """`read` for several fields of one batch at once: on an object store, the missing shard indexes
        of every field go out in one concurrent round, then the rows of every field in one more."""
        where: list[tuple[_RowArray, int, int, np.ndarray]] = []  # (array, shard, row in shard, target row)
        for groups, name, spec, gidx, local, out in jobs:
            for pos, (gi, lr) in enumerate(zip(gidx, local, strict=True)):
                ra = self._row_array(groups[gi], name, spec)
                where.append((ra, *divmod(int(lr), ra.shard_rows), out[pos]))
        if not self.storage.is_local and self.shard_memory is not None:
            self._read_whole_files(where)
            return
        if not self.storage.is_local:
            self._fetch_indexes({(ra.rel, shard): (ra, shard) for ra, shard, _, _ in where if shard not in ra.indexes})
        # (file, offset, nbytes) and (array, target row) for every stored row.
        requests: list[tuple[str, int, int]] = []
        targets: list[tuple[_RowArray, np.ndarray]] = []
        for ra, shard, within, target in where:
            offset, nbytes = self._shard_index(ra, shard)[within]
            if offset == _EMPTY:
                target[...] = 0
                continue
            requests.append((ra.shard_file(shard), int(offset), int(nbytes)))
            targets.append((ra, target))
        if self.storage.is_local:
            # Decode straight from the mapped file into the batch: no intermediate bytes object.
            for (file, offset, nbytes), (ra, target) in zip(requests, targets, strict=True):
                self._decode_row(ra, file, self.storage.map_file(file)[offset: offset + nbytes], target)
            return
        if self.read_through is not None:
            remote = []
            for i, ((file, offset, nbytes), (ra, target)) in enumerate(zip(requests, targets, strict=True)):
                local = self.read_through.mapped(file, ra.expected_sizes[file[len(ra.rel) + 1:]])
                if local is None:
                    remote.append(i)
                else:
                    self._decode_row(ra, file, local[offset: offset + nbytes], target)
            requests, targets = [requests[i] for i in remote], [targets[i] for i in remote]
        if self.row_memory is not None:
            remote = []
            for i, ((file, offset, _), (ra, target)) in enumerate(zip(requests, targets, strict=True)):
                chunk = self.row_memory.take((file, offset))
                if chunk is None:
                    remote.append(i)
                else:
                    self._decode_row(ra, file, chunk, target)
            requests, targets = [requests[i] for i in remote], [targets[i] for i in remote]
        for (file, _, _), (ra, target), chunk in zip(requests, targets, self._fetch_chunks(requests), strict=True):
            self._decode_row(ra, file, chunk, target)

    def _fetch_chunks(self, requests: Sequence[tuple[str, int, int]]) -> list[memoryview]:
        """The bytes of each `(file, offset, nbytes)`, in order: merged into spans, fetched in one round."""
        chunks: list[memoryview] = [memoryview(b"")] * len(requests)
        if not requests:
            return chunks
        spans = coalesce(requests)
        for span, blob in zip(spans, read_spans(self.storage, spans, in_flight=self.in_flight), strict=True):
            view = memoryview(blob)
            for i in span.members:
                _, offset, nbytes = requests[i]
                chunks[i] = view[offset - span.start: offset - span.start + nbytes]
        return chunks

    def prefetch(self, jobs: Sequence[tuple[Sequence[str], str, FieldSpec, np.ndarray, np.ndarray]]) -> None:
        """Queue a background fetch of these rows (`read_fields` jobs without their targets): the whole
        shard files holding them into the shard memory, or just their chunks into the row memory."""
        if self.shard_memory is None and self.row_memory is None:
            return
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lf-shard-prefetch")
        # Requests that arrive while a prefetch runs are served together by the next one: one round trip for
        # all of them, not one per micro-batch's worth of rows (far behind the reader).
        with self._queued_lock:
            running = bool(self._queued)
            self._queued.extend(jobs)
        if not running:
            self._prefetcher.submit(self._prefetch_queued)

    def _prefetch_queued(self) -> None:
        with self._queued_lock:
            jobs, self._queued = self._queued, []
        if not jobs:
            return
        if self.row_memory is not None:
            self._prefetch_rows(jobs, self.row_memory)
        else:
            self._prefetch_files(jobs)

    def _prefetch_files(self, jobs: Sequence[tuple[Sequence[str], str, FieldSpec, np.ndarray, np.ndarray]]) -> None:
        assert self.shard_memory is not None
        try:
            sizes = {}
            for groups, name, spec, gidx, local in jobs:
                if not len(gidx):
                    continue
                # The rows asked for fall in a few files: find those without a pass per row.
                shard_rows = self._row_array(groups[int(gidx[0])], name, spec).shard_rows  # the same for every group
                pairs = np.unique(np.stack([np.asarray(gidx, np.int64), np.asarray(local, np.int64) // shard_rows]), axis=1)
                for gi, shard in pairs.T.tolist():
                    ra = self._row_array(groups[gi], name, spec)
                    sizes[ra.shard_file(shard)] = self._committed_size(ra, shard)
            self.shard_memory.get_many(sizes)
        except Exception:  # noqa: BLE001 - the read itself fetches again and reports a lasting failure
            pass

    def _prefetch_rows(self, jobs: Sequence[tuple[Sequence[str], str, FieldSpec, np.ndarray, np.ndarray]],
                       memory: RowMemory) -> None:
        """Fetch the chunks of these rows not held or under way yet: their shard indexes first (one round),
        then the merged ranges (one more)."""
        rows = []
        for groups, name, spec, gidx, local in jobs:
            for gi, lr in sorted({(int(g), int(r)) for g, r in zip(gidx, local, strict=True)}):
                ra = self._row_array(groups[gi], name, spec)
                rows.append((ra, *divmod(lr, ra.shard_rows)))
        mine: list[tuple[str, int]] = []
        try:
            self._fetch_indexes({(ra.rel, shard): (ra, shard) for ra, shard, _ in rows if shard not in ra.indexes})
            requests = {}
            for ra, shard, within in rows:
                offset, nbytes = ra.indexes[shard][within]
                if offset != _EMPTY:
                    requests[(ra.shard_file(shard), int(offset))] = int(nbytes)
            mine = memory.claim(requests)
            wanted = [(file, offset, requests[(file, offset)]) for file, offset in mine]
            memory.fill(dict(zip(mine, self._fetch_chunks(wanted), strict=True)))
        except Exception:  # noqa: BLE001 - the read itself fetches again and reports a lasting failure
            memory.drop(mine)

    def close(self) -> None:
        """Stop the prefetch thread (queued prefetches are dropped)."""
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=False, cancel_futures=True)
            self._prefetcher = None

    def _read_whole_files(self, where: Sequence[tuple[_RowArray, int, int, np.ndarray]]) -> None:
        """Rows decoded from whole shard files: local copies (read-through) where there are, else the
        files kept in (or fetched into) the shard memory, all missing ones in one round."""
        assert self.shard_memory is not None
        blobs: dict[str, Any] = {}
        sizes: dict[str, int] = {}
        for ra, shard, _, _ in where:
            rel = ra.shard_file(shard)
            if rel in blobs or rel in sizes:
                continue
            size = self._committed_size(ra, shard)
            local = self.read_through.mapped(rel, size) if self.read_through is not None else None
            if local is None:
                sizes[rel] = size
            else:
                blobs[rel] = local
        blobs.update(self.shard_memory.get_many(sizes))
        for ra, shard, within, target in where:
            rel = ra.shard_file(shard)
            blob = blobs[rel]
            index = ra.indexes.get(shard)
            if index is None:
                size = len(blob)
                index = ra.indexes[shard] = self._parse_index(ra, shard, _bytes_of(blob, size - (ra.shard_rows * 16 + 4), size))
            offset, nbytes = index[within]
            if offset == _EMPTY:
                target[...] = 0
                continue
            self._decode_row(ra, rel, _bytes_of(blob, int(offset), int(offset) + int(nbytes)), target)

    def _committed_size(self, ra: _RowArray, shard: int) -> int:
        """The size of a shard file as its group's manifest committed it (a missing entry: a changed cache)."""
        rel = ra.shard_file(shard)
        size = ra.expected_sizes.get(rel[len(ra.rel) + 1:])
        if size is None:
            raise CacheFormatError(f"{self.storage.path(rel)}: not in the manifest of cache group {rel.split('/')[1]}; "
                                   f"the cache changed after commit: delete {_group_dir(self.storage, rel)} and "
                                   "re-run the cache job")
        return size

    def _fetch_indexes(self, wanted: Mapping[tuple[str, int], tuple[_RowArray, int]]) -> None:
        """Fetch the shard indexes a batch needs that are not kept yet, all in one concurrent round. The
        index sits at the end of the file, so its offset follows from the committed size: no request to
        ask a size first (a file replaced since commit fails its index checksum instead)."""
        if not wanted:
            return
        items = list(wanted.values())
        requests = []
        for ra, shard in items:
            rel = ra.shard_file(shard)
            size = self._committed_size(ra, shard)
            nbytes = ra.shard_rows * 16 + 4
            requests.append((rel, size - nbytes, nbytes))
        spans = [Span(f, off, off + n, (i,)) for i, (f, off, n) in enumerate(requests)]
        for (ra, shard), raw in zip(items, read_spans(self.storage, spans, in_flight=self.in_flight), strict=True):
            ra.indexes[shard] = self._parse_index(ra, shard, raw)

    def _row_array(self, group_id: str, name: str, spec: FieldSpec) -> _RowArray:
        key = (group_id, name, spec.name)
        ra = self._arrays.get(key)
        if ra is None:
            rel = f"{SHARDS_DIR}/{group_id}/{name}/{spec.name}"
            try:
                meta = json.loads(self.storage.read_text(f"{rel}/zarr.json"))
            except FileNotFoundError:
                raise CacheFormatError(f"{self.storage.path(rel)}/zarr.json is missing (cache group {group_id}): the cache "
                                       f"changed after commit; delete {_group_dir(self.storage, rel)} and "
                                       "re-run the cache job") from None
            (codec,) = meta["codecs"]
            if codec["name"] != "sharding_indexed" or codec["configuration"]["index_location"] != "end":
                raise CacheFormatError(f"{self.storage.path(rel)}: expected a sharded array with the index at the end")
            prefix = f"{name}/{spec.name}/"
            ra = _RowArray(
                rel=rel,
                rows=int(meta["shape"][0]),
                shard_rows=int(meta["chunk_grid"]["configuration"]["chunk_shape"][0]),
                row_shape=tuple(meta["shape"][1:]),
                dtype=np.dtype(meta["data_type"]).newbyteorder("<"),
                decoder=_decoder_for(codec["configuration"]["codecs"]),
                expected_sizes={k[len(prefix):]: v for k, v in self.manifests[group_id].files.items()
                                if k.startswith(prefix)},
                indexes={},
            )
            self._arrays[key] = ra
        return ra

    def _shard_index(self, ra: _RowArray, shard: int) -> np.ndarray:
        index = ra.indexes.get(shard)
        if index is None:
            rel = ra.shard_file(shard)
            inner = rel[len(ra.rel) + 1:]
            group_id = rel.split("/")[1]
            try:
                size: int | None = self.storage.file_size(rel) if inner in ra.expected_sizes else -1
            except FileNotFoundError:
                size = None
            if size != ra.expected_sizes.get(inner, -2):
                what = "is missing" if size is None else f"size {size} does not match the committed size {ra.expected_sizes.get(inner)}"
                raise CacheFormatError(
                    f"{self.storage.path(rel)}: {what} (cache group {group_id}); the file was modified or deleted "
                    f"after commit: delete {_group_dir(self.storage, rel)} and re-run the cache job"
                )
            nbytes = ra.shard_rows * 16 + 4
            index = ra.indexes[shard] = self._parse_index(ra, shard, self.storage.read_range(rel, size - nbytes, nbytes))
        return index

    def _parse_index(self, ra: _RowArray, shard: int, raw: bytes | memoryview) -> np.ndarray:
        """A shard file's index (offset, nbytes per row), its crc32c checked."""
        raw = bytes(raw)  # google_crc32c takes read-only bytes only; an index is a few KB
        if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            rel = ra.shard_file(shard)
            raise CacheFormatError(f"{self.storage.path(rel)}: shard index checksum mismatch (cache group "
                                   f"{rel.split('/')[1]}); the file is corrupt or was replaced after commit: delete "
                                   f"{_group_dir(self.storage, rel)} and re-run the cache job")
        return np.frombuffer(raw[:-4], dtype="<u8").reshape(ra.shard_rows, 2)

    def _decode_row(self, ra: _RowArray, file: str, chunk: Any, target: np.ndarray) -> None:
        """Decode one stored row chunk into `target` (a row of the batch buffer)."""
        try:
            if ra.decoder is None:
                target[...] = np.frombuffer(chunk, dtype=ra.dtype).reshape(target.shape)
            elif isinstance(ra.decoder, numcodecs.Blosc):
                ra.decoder.decode(chunk, out=target)
            else:
                target[...] = np.frombuffer(ra.decoder.decode(chunk), dtype=ra.dtype).reshape(target.shape)
        except Exception as exc:  # a chunk that does not decode: corrupt bytes inside the file
            raise CacheFormatError(f"{self.storage.path(file)}: a chunk does not decode ({type(exc).__name__}) "
                                   f"(cache group {file.split('/')[1]}); the file is corrupt: delete "
                                   f"{_group_dir(self.storage, file)} and re-run the cache job") from None
