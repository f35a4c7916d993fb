"""Writes caches in the format of `cache_format.py`: the spec, one group per input shard, the prompts.

A `GroupWriter` buffers rows per bucket and writes whole Zarr shard files when a bucket has `shard_rows`
rows (aligned writes, no read-modify-write), so memory stays bounded by buckets x shard_rows rows plus a
global byte budget. Nothing is visible to readers until `commit()` writes `commit.json` last.
Rewriting a committed group without some keys (cross-shard dedupe) lives in `dedupe.py`.
"""

from __future__ import annotations

import json
import sys
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from latentforge.shared.cache_format import (
    CACHE_JSON,
    COMMIT_JSON,
    FORMAT_VERSION,
    PROMPTS_DIR,
    SHARDS_DIR,
    TMP_DIR,
    CacheFormatError,
    CacheSpec,
    FieldSpec,
    GroupManifest,
    SourceOrigin,
    bucket_name,
    check_group_id,
    encode_keys,
    format_version_of,
)
from latentforge.shared.faults import fault_point
from latentforge.shared.storage import Storage, StorageWriteError

from .shard_writer import ChunkWriter, RowShardWriter


def _compressors(codec: str, itemsize: int) -> Any:
    if codec == "none":
        return None
    if codec == "zstd":
        return ZstdCodec(level=3)
    cname = codec.split("-", 1)[1]
    # Byte shuffle groups the sign/exponent bytes of 16-bit floats together, which is what compresses.
    return BloscCodec(cname=cname, clevel=5, shuffle="shuffle" if itemsize > 1 else "noshuffle", typesize=itemsize)


def to_storage(spec: FieldSpec, values: Any) -> np.ndarray:
    """Convert a batch (torch tensor, numpy array or list of str) to the field's on-disk numpy dtype.

    Text fields take a list of str (encoded with `encode_keys` to the field's width) or rows that are
    already encoded (a uint8 array, e.g. copied from a committed group)."""
    if spec.is_text:
        if isinstance(values, np.ndarray) and values.dtype == np.uint8:
            return values
        return encode_keys(list(values), width=int(spec.shape[0]))
    torch = sys.modules.get("torch")  # a tensor implies torch is imported; numpy callers never pay for it
    if torch is not None and isinstance(values, torch.Tensor):
        t = values.detach().cpu()
        if spec.dtype == "bfloat16":
            return t.to(torch.bfloat16).view(torch.uint16).numpy()
        return t.to(getattr(torch, spec.dtype)).numpy()
    arr = np.asarray(values)
    if spec.dtype == "bfloat16":
        if arr.dtype == np.uint16:  # already bfloat16 bits
            return arr
        import torch as _torch

        return _torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(_torch.bfloat16).view(_torch.uint16).numpy()
    return arr.astype(spec.storage_dtype, copy=False)


_TEMPLATES: dict[tuple[Any, ...], str] = {}


def _array_template(spec: FieldSpec, row_shape: tuple[int, ...], per_row: bool, cache: CacheSpec) -> str:
    """zarr.json of an empty array of this field and shape, as zarr-python writes it (made once)."""
    key = (spec.name, spec.dtype, row_shape, per_row, cache.shard_rows, cache.codec)
    if key not in _TEMPLATES:
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync
        from zarr.storage import MemoryStore

        store = MemoryStore()
        _create_array(zarr.open_group(store, mode="w", zarr_format=3), spec, row_shape, per_row, cache)
        meta = sync(store.get(f"{spec.name}/zarr.json", prototype=default_buffer_prototype()))
        _TEMPLATES[key] = meta.to_bytes().decode("utf-8")
    return _TEMPLATES[key]


def _create_array(group: Any, spec: FieldSpec, row_shape: tuple[int, ...], per_row: bool, cache: CacheSpec) -> Any:
    shard_rows = cache.shard_rows
    dtype = np.dtype(spec.storage_dtype)
    chunk_rows = 1 if per_row else shard_rows
    return group.create_array(
        spec.name,
        shape=(0, *row_shape),
        chunks=(chunk_rows, *row_shape),
        shards=(shard_rows, *row_shape) if per_row else None,
        dtype=dtype,
        compressors=_compressors(cache.codec, dtype.itemsize) if per_row else _compressors("zstd", dtype.itemsize),
        fill_value=0,
        attributes={"logical_dtype": spec.dtype},
        # The reader addresses rows by the shard index: every row must have its own entry, even zeros.
        config={"write_empty_chunks": True},
    )


class GroupWriter:
    """Collects the samples of one input shard, bucket by bucket, and commits them as one group."""

    def __init__(self, storage: Storage, spec: CacheSpec, group_id: str, source: Mapping[str, Any], source_hash: str,
                 max_buffer_bytes: int = 1 << 30, origin: SourceOrigin | None = None) -> None:
        self.storage = storage
        self.origin = origin
        self.spec = spec
        self.group_id = check_group_id(group_id)
        self.source = dict(source)
        self.source_hash = source_hash
        self.max_buffer_bytes = max_buffer_bytes
        # Local disks: write under .tmp and rename; object stores: write in place, marker last.
        self.rel = f"{SHARDS_DIR}/{TMP_DIR}/{group_id}.{uuid.uuid4().hex[:12]}" if storage.is_local else f"{SHARDS_DIR}/{group_id}"
        self._arrays: dict[str, dict[str, Any]] = {}
        self._buffers: dict[str, dict[str, list[np.ndarray]]] = {}
        self._buffered_rows: dict[str, int] = {}
        self._counts: dict[str, int] = {}
        self._buffer_bytes = 0
        self._closed = False
        with self._writing():
            if not storage.is_local:
                # A stale group at this name must stop counting as committed before we overwrite its files.
                storage.remove_file(f"{self.rel}/{COMMIT_JSON}")
                storage.remove_tree(self.rel)
            self.root = zarr.open_group(storage.zarr_store(self.rel), mode="w", zarr_format=3)
            self.root.attrs.update({"group_id": group_id, "fingerprint": spec.fingerprint, "source_hash": source_hash})

    @property
    def closed(self) -> bool:
        """Committed or aborted: no more rows can be added."""
        return self._closed

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write (disk full, permission denied) becomes one `StorageWriteError` line; the group
        is dropped (best effort, which also frees its space) and stays invisible: nothing is committed."""
        try:
            with self.storage.writing(self.rel):
                yield
        except StorageWriteError:
            self._closed = True
            try:
                self.storage.remove_tree(self.rel)
            except Exception:  # the store is failing anyway; readers never see an uncommitted group
                pass
            raise

    def add(self, bucket: tuple[int, int], rows: Mapping[str, Any]) -> None:
        """Append a batch of samples of one bucket: every field of the spec, leading dim = batch."""
        if self._closed:
            raise RuntimeError(f"group {self.group_id} is already committed or aborted")
        if tuple(bucket) not in self.spec.buckets:
            raise ValueError(f"bucket {bucket_name(bucket)} is not in the cache's bucket list")
        missing = {f.name for f in self.spec.fields} - set(rows)
        extra = set(rows) - {f.name for f in self.spec.fields}
        if missing or extra:
            raise ValueError(f"group {self.group_id}: fields missing {sorted(missing)}, unexpected {sorted(extra)}")
        name = bucket_name(bucket)
        converted = {}
        n = None
        for f in self.spec.fields:
            arr = to_storage(f, rows[f.name])
            want = f.row_shape(bucket, self.spec.vae_downsample)
            if arr.shape[1:] != want:
                raise ValueError(f"field {f.name} in bucket {name}: row shape {arr.shape[1:]}, expected {want}")
            if n is not None and arr.shape[0] != n:
                raise ValueError(f"field {f.name}: batch size {arr.shape[0]} differs from other fields ({n})")
            n = arr.shape[0]
            converted[f.name] = arr
        buf = self._buffers.setdefault(name, {f.name: [] for f in self.spec.fields})
        for key, arr in converted.items():
            buf[key].append(arr)
            self._buffer_bytes += arr.nbytes
        self._buffered_rows[name] = self._buffered_rows.get(name, 0) + (n or 0)
        self._counts[name] = self._counts.get(name, 0) + (n or 0)
        with self._writing():
            if self._buffered_rows[name] >= self.spec.shard_rows:
                self._flush(name, aligned=True)
            while self._buffer_bytes > self.max_buffer_bytes:
                largest = max(self._buffered_rows, key=lambda b: self._buffered_rows[b])
                self._flush(largest, aligned=False)

    def _flush(self, name: str, aligned: bool) -> None:
        buf = self._buffers[name]
        total = self._buffered_rows[name]
        if total == 0:
            return
        take = (total // self.spec.shard_rows) * self.spec.shard_rows if aligned else total
        arrays = self._arrays.get(name)
        if arrays is None:
            bucket = tuple(int(x) for x in name.split("x"))
            self.root.create_group(name)
            arrays = {}
            for f in self.spec.fields:
                shape = tuple(f.row_shape(bucket, self.spec.vae_downsample))  # type: ignore[arg-type]
                per_row = f.per_row(bucket, self.spec.vae_downsample)  # type: ignore[arg-type]
                # Written without zarr-python's per-array cost; the files are the same format.
                writer = RowShardWriter if per_row else ChunkWriter
                arrays[f.name] = writer(self.storage, f"{self.rel}/{name}/{f.name}",
                                        _array_template(f, shape, per_row, self.spec))
            self._arrays[name] = arrays
        for key, parts in buf.items():
            data = np.concatenate(parts) if len(parts) > 1 else parts[0]
            arrays[key].append(data[:take])
            rest = data[take:]
            buf[key] = [rest] if len(rest) else []
            self._buffer_bytes -= data[:take].nbytes
        self._buffered_rows[name] = total - take

    def flush(self) -> None:
        """Write every buffered row now (commit does this too; callers use it to time the writes)."""
        with self._writing():
            for name in list(self._buffers):
                self._flush(name, aligned=False)

    def commit(self, skipped: Mapping[str, Any] | None = None, stats: Mapping[str, Any] | None = None) -> GroupManifest:
        """Flush everything, record sizes/checksums, write the marker last and (locally) rename into place."""
        self.flush()
        with self._writing():
            self._closed = True
            fault_point("group:files_written")
            sizes = self.storage.file_sizes(self.rel)
            checksums = {}
            if self.storage.is_local:
                for rel in sizes:
                    checksums[rel] = zlib.crc32(self.storage.read_bytes(f"{self.rel}/{rel}"))
            manifest = GroupManifest(
                group_id=self.group_id,
                fingerprint=self.spec.fingerprint,
                source=self.source,
                source_hash=self.source_hash,
                bucket_counts=dict(sorted(self._counts.items())),
                files=sizes,
                checksums=checksums,
                skipped=dict(skipped or {}),
                stats=dict(stats or {}),
                origin=self.origin,
            )
            self.storage.write_text_atomic(f"{self.rel}/{COMMIT_JSON}", manifest.to_json())
            if self.storage.is_local:
                fault_point("group:before_rename")
                final = f"{SHARDS_DIR}/{self.group_id}"
                if self.storage.exists(final):
                    # A stale group of the same id (changed input or fingerprint): move it aside first, so
                    # the final name always holds one complete group.
                    trash = f"{SHARDS_DIR}/{TMP_DIR}/trash-{self.group_id}.{uuid.uuid4().hex[:8]}"
                    self.storage.rename_dir(final, trash)
                    fault_point("group:old_moved")
                    self.storage.rename_dir(self.rel, final)
                    self.storage.remove_tree(trash)
                else:
                    self.storage.rename_dir(self.rel, final)
        fault_point("group:committed")
        return manifest

    def abort(self) -> None:
        """Drop everything written so far (the group stays invisible either way)."""
        self._closed = True
        self.storage.remove_tree(self.rel)


class CacheWriter:
    """Creates (or reopens) a cache root and hands out group writers."""

    def __init__(self, url: str, spec: CacheSpec, storage_options: dict[str, Any] | None = None,
                 overwrite: bool = False) -> None:
        """`overwrite` (the job's --overwrite) also takes over a cache of an older format version (or an
        unreadable cache.json): every group is re-cached, since older manifests never count as done."""
        self.storage = Storage(url, storage_options)
        self.spec = spec
        old: CacheSpec | None = None
        if self.storage.exists(CACHE_JSON):
            text = self.storage.read_text(CACHE_JSON)
            version = format_version_of(text)
            if not (overwrite and (version is None or version < FORMAT_VERSION)):
                old = CacheSpec.from_json(text, self.storage.path(CACHE_JSON))  # names the fix for older versions
                if old.family != spec.family:
                    raise CacheFormatError(
                        f"{self.storage.path(CACHE_JSON)}: existing cache is {old.family} format v{old.format_version}, "
                        f"this run writes {spec.family} v{spec.format_version}; use a new cache.path"
                    )
        if old is None or old.fingerprint != spec.fingerprint or old.model_location != spec.model_location:
            # A new fingerprint re-caches every group (each group records the fingerprint it was made with); a
            # moved model folder only updates the location hint `inspect` starts from, no group is invalidated.
            self.storage.write_text_atomic(CACHE_JSON, spec.to_json())

    def committed(self) -> dict[str, GroupManifest]:
        """Committed groups by id (those with a commit marker)."""
        out = {}
        for name in self.storage.listdir(SHARDS_DIR):
            if name.startswith("."):
                continue
            rel = f"{SHARDS_DIR}/{name}/{COMMIT_JSON}"
            if self.storage.exists(rel):
                out[name] = GroupManifest.from_json(self.storage.read_text(rel), self.storage.path(rel))
        return out

    def is_done(self, group_id: str, source_hash: str, committed: Mapping[str, GroupManifest] | None = None) -> bool:
        """True when the group is committed in this format, with this fingerprint, from the same input content."""
        manifests = self.committed() if committed is None else committed
        m = manifests.get(group_id)
        return (m is not None and m.format_version == self.spec.format_version
                and m.fingerprint == self.spec.fingerprint and m.source_hash == source_hash)

    def group(self, group_id: str, source: Mapping[str, Any], source_hash: str, **kwargs: Any) -> GroupWriter:
        """A writer for group `group_id` (`source`: the input shard's identity; `origin`, a keyword: the
        configured source it was listed from, so the trainer can find that source's settings)."""
        return GroupWriter(self.storage, self.spec, group_id, source, source_hash, **kwargs)

    def clean_tmp(self) -> None:
        """Remove leftovers of crashed writers (only safe when no other writer is running)."""
        self.storage.remove_tree(f"{SHARDS_DIR}/{TMP_DIR}")

    def remove_litter(self, before: float) -> int:
        """Local disks: delete what crashed writers left behind (groups and prompts being written, temp
        files of atomic writes) that was last modified before `before` (the start of this job, so a
        writer that is still running is never touched). Object stores write in place: nothing to do.
        Returns how many entries were removed."""
        if not self.storage.is_local:
            return 0
        tmp = f"{SHARDS_DIR}/{TMP_DIR}"
        stale = [f"{tmp}/{name}" for name in self.storage.listdir(tmp)]
        stale += [name for name in self.storage.listdir("")
                  if name.startswith(f"{PROMPTS_DIR}.") and name.endswith((".tmp", ".old"))]
        stale += [name for name in self.storage.listdir("") if name.endswith(".tmp") and ".json." in name]
        removed = 0
        for rel in stale:
            mtime = self.storage.mtime(rel)
            if mtime is not None and mtime < before:
                self.storage.remove_tree(rel)  # a folder or a file
                removed += 1
        return removed

    def write_prompts(self, empty: Mapping[str, Any], prompts: Sequence[str], embeddings: Mapping[str, Any],
                      marker: Mapping[str, Any] | None = None) -> None:
        """Cache the empty-prompt embedding (train-time caption dropout) and the validation prompts.

        `empty` maps each text field to one row; `embeddings` maps each text field to len(prompts) rows.
        """
        text_fields = [self.spec.field(name) for name in empty]
        rel = f"{PROMPTS_DIR}.{uuid.uuid4().hex[:8]}.tmp" if self.storage.is_local else PROMPTS_DIR
        try:
            with self.storage.writing(rel):
                if not self.storage.is_local:
                    self.storage.remove_file(f"{PROMPTS_DIR}/{COMMIT_JSON}")
                root = zarr.open_group(self.storage.zarr_store(rel), mode="w", zarr_format=3)
                root.attrs["prompts"] = list(prompts)
                for sub, rows, n in (("empty", empty, 1), ("validation", embeddings, len(prompts))):
                    g = root.create_group(sub)
                    for f in text_fields:
                        data = to_storage(f, rows[f.name]) if n else np.zeros((0, *f.row_shape((0, 0), 1)), f.storage_dtype)
                        if data.shape[0] != n:
                            raise ValueError(f"prompts/{sub}/{f.name}: {data.shape[0]} rows, expected {n}")
                        g.create_array(f.name, data=data, attributes={"logical_dtype": f.dtype})
                fault_point("prompts:files_written")
                self.storage.write_text_atomic(f"{rel}/{COMMIT_JSON}", json.dumps({"complete": True, **(marker or {})}))
                if self.storage.is_local:
                    old = f"{PROMPTS_DIR}.{uuid.uuid4().hex[:8]}.old"
                    if self.storage.exists(PROMPTS_DIR):
                        self.storage.rename_dir(PROMPTS_DIR, old)
                        fault_point("prompts:old_moved")
                    self.storage.rename_dir(rel, PROMPTS_DIR)
                    self.storage.remove_tree(old)
        except StorageWriteError:
            if self.storage.is_local:
                self.storage.remove_tree(rel)
            raise
