"""Reads caches in the format of `cache_format.py`: open, check against a model, fetch rows of a bucket.

Big fields (latents, embeddings) are read row by row straight from their Zarr shard files
(`row_reader.py`: zarr-python's per-row cost is ten times too slow for training). Small fields (sizes,
hashes, keys) are read whole once per (group, bucket) through zarr-python and kept in memory; keys are
decoded from their zero-padded UTF-8 bytes then. Reading the same cache with zarr-python (or any Zarr v3
implementation) gives the same values; the conformance tests check that the paths agree.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from .cache_format import (
    CACHE_JSON,
    COMMIT_JSON,
    PROMPTS_DIR,
    SHARDS_DIR,
    CacheFormatError,
    CacheSpec,
    FieldSpec,
    GroupManifest,
    bucket_name,
    decode_keys,
    describe_mismatch,
    parse_bucket_name,
)
from .model_check import check_model_files
from .read_through import ReadThroughCache
from .row_memory import RowMemory
from .row_reader import RowFieldReader
from .shard_memory import ShardMemory
from .storage import Storage

_ALIGN = 64


@dataclass(frozen=True)
class _FieldLayout:
    """How one field of one bucket sits in a batch."""

    spec: FieldSpec
    row_shape: tuple[int, ...]
    tensor: bool  # False for text fields (returned as lists of str)
    per_row: bool  # big: one chunk per row; small: read whole
    row_nbytes: int
    torch_dtype: torch.dtype | None


class CacheReader:
    """An opened cache: its spec, committed groups, bucket counts and batched row reads."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *,
                 read_through: tuple[str, int] | None = None, whole_files: int = 0, ahead_rows: int = 0) -> None:
        """Open the cache at `url`. `read_through`: (folder, bytes) for local copies of the shard files of a
        cache on an object store (`read_through.py`); `whole_files` > 0: read an object store's shard files
        whole, keeping that many in memory (`shard_memory.py`, for the shard-window order with one reader);
        else `ahead_rows` > 0: `prefetch` fetches just the rows asked for, holding up to that many row
        chunks (`row_memory.py`, the shard-window order with several readers). All are ignored for a local
        cache."""
        self.storage = Storage(url, storage_options)
        self.url = self.storage.url
        if not self.storage.exists(CACHE_JSON):
            raise CacheFormatError(f"{self.storage.path(CACHE_JSON)} not found: not a latentforge cache (run the cache job first)")
        self.spec = CacheSpec.from_json(self.storage.read_text(CACHE_JSON), self.storage.path(CACHE_JSON))
        self.groups: list[GroupManifest] = []
        self.stale_groups: list[str] = []
        for name in self.storage.listdir(SHARDS_DIR):
            rel = f"{SHARDS_DIR}/{name}/{COMMIT_JSON}"
            if name.startswith(".") or not self.storage.exists(rel):
                continue  # in progress or crashed: invisible by contract
            manifest = GroupManifest.from_json(self.storage.read_text(rel), self.storage.path(rel))
            if manifest.fingerprint != self.spec.fingerprint or manifest.format_version != self.spec.format_version:
                # Made with other settings, or an older format left behind by a re-cache: not this cache.
                self.stale_groups.append(name)
                continue
            self.groups.append(manifest)
        self._by_id = {g.group_id: g for g in self.groups}
        # Per bucket: the groups holding it, in a fixed order, and their cumulative row offsets.
        self._bucket_groups: dict[str, list[str]] = {}
        self._bucket_offsets: dict[str, np.ndarray] = {}
        for name in sorted({b for g in self.groups for b in g.bucket_counts}):
            ids = [g.group_id for g in self.groups if g.bucket_counts.get(name, 0) > 0]
            self._bucket_groups[name] = ids
            self._bucket_offsets[name] = np.cumsum([0] + [self._by_id[i].bucket_counts[name] for i in ids])
        copies = (ReadThroughCache(self.storage, read_through[0], read_through[1])
                  if read_through and not self.storage.is_local else None)
        remote = not self.storage.is_local
        memory = ShardMemory(self.storage, whole_files) if whole_files > 0 and remote else None
        ahead = RowMemory(ahead_rows) if ahead_rows > 0 and memory is None and remote else None
        self._rows = RowFieldReader(self.storage, self._by_id, read_through=copies, shard_memory=memory, row_memory=ahead)
        # (bucket, field) -> (that field over all the bucket's rows, the group indexes loaded into it)
        self._small: dict[tuple[str, str], tuple[np.ndarray, set[int]]] = {}
        self._layouts: dict[tuple[tuple[int, int], tuple[str, ...] | None], list[_FieldLayout]] = {}
        self._checked: set[tuple[str, str, str]] = set()

    # ---- what is in the cache -------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return sum(g.num_samples for g in self.groups)

    def manifest(self, group_id: str) -> GroupManifest:
        """The commit manifest of a committed group: its source shard, origin, counts, skips and stats."""
        return self._by_id[group_id]

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Committed samples per bucket, (height, width) -> count."""
        return {parse_bucket_name(b): int(off[-1]) for b, off in self._bucket_offsets.items()}

    def check_compatible(self, *, family: str, latent_channels: int, field_widths: Mapping[str, int] | None = None) -> None:
        """Raise `CacheMismatchError` (one line naming both sides) unless the cache fits the model.

        `field_widths` maps a field to the size of its last dimension as the model expects it,
        e.g. {"prompt_embeds": 2048, "pooled_prompt_embeds": 1280}.
        """
        if self.spec.family != family:
            raise describe_mismatch("model family", self.spec.family, family, self.url)
        if self.spec.latent_channels != latent_channels:
            raise describe_mismatch("latent channels", self.spec.latent_channels, latent_channels, self.url)
        names = {f.name for f in self.spec.fields}
        for name, width in (field_widths or {}).items():
            if name not in names:
                raise describe_mismatch(f"field {name}", "no such field", f"width {width}", self.url)
            have = self.spec.field(name).shape[-1]
            if have != width:
                raise describe_mismatch(f"{name} width", have, width, self.url)

    def check_model_files(self, pretrained: str, vae: str | None = None, revision: str | None = None) -> None:
        """Raise `CacheMismatchError` when the model a run trains with holds encoder weights other than
        those the cache was made with (same widths, other VAE or text encoder: `check_compatible` cannot
        tell); see `model_check.check_model_files`."""
        check_model_files(self.spec, self.url, pretrained, vae, revision)

    # ---- reading rows -------------------------------------------------------------------------------
    def locate(self, bucket: tuple[int, int], rows: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """Global bucket rows -> (group index into the bucket's group list, row within that group)."""
        name = bucket_name(bucket)
        offsets = self._bucket_offsets.get(name)
        if offsets is None:
            raise KeyError(f"bucket {name} has no committed samples in {self.url}")
        r = np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows, dtype=np.int64)
        if r.size and (r.min() < 0 or r.max() >= offsets[-1]):
            raise IndexError(f"bucket {name}: rows must be in [0, {int(offsets[-1])})")
        g = np.searchsorted(offsets, r, side="right") - 1
        return g, r - offsets[g]

    def read_rows(self, bucket: tuple[int, int], rows: Sequence[int] | np.ndarray,
                  fields: Sequence[str] | None = None, *, shared_memory: bool = False) -> dict[str, Any]:
        """Fetch rows of one bucket as a batch: tensors (bfloat16 viewed back from its bits), lists of str.

        Every tensor of the batch is a view of one buffer, filled in place: a DataLoader worker hands the
        main process one storage instead of one per field (2x less main-process time per batch,
        docs/benchmarks.md). `shared_memory` allocates that buffer in shared memory, as a worker should,
        so handing it over copies nothing."""
        name = bucket_name(bucket)
        gidx, local = self.locate(bucket, rows)
        n = len(local)
        layout = self._layout(bucket, tuple(fields) if fields is not None else None)
        flat = torch.empty(sum(-(-f.row_nbytes * n // _ALIGN) * _ALIGN for f in layout if f.tensor), dtype=torch.uint8)
        if shared_memory:
            flat.share_memory_()
        flat_np = flat.numpy()
        out: dict[str, Any] = {}
        offset = 0
        big = []  # per-row fields, read together: one round of requests for all of them on an object store
        for f in layout:
            if not f.tensor:
                out[f.spec.name] = self._read_small_field(name, f.spec, gidx, local).tolist()
                continue
            shape, nbytes = (n, *f.row_shape), f.row_nbytes * n
            arr = flat_np[offset: offset + nbytes].view(f.spec.storage_dtype).reshape(shape)
            if f.per_row:
                big.append((self._bucket_groups[name], name, f.spec, gidx, local, arr))
            else:
                arr[...] = self._read_small_field(name, f.spec, gidx, local)
            out[f.spec.name] = flat[offset: offset + nbytes].view(f.torch_dtype).view(shape)
            offset += -(-nbytes // _ALIGN) * _ALIGN  # aligned, so every dtype can view its slice
        self._rows.read_fields(big)
        return out

    def prefetch(self, bucket: tuple[int, int], rows: Sequence[int] | np.ndarray, fields: Sequence[str] | None = None) -> None:
        """Start fetching, in the background, what a later `read_rows` of these rows will need: the whole
        shard files holding them (`whole_files`) or their chunks (`ahead_rows`); otherwise nothing. Never
        raises: a failed prefetch leaves the read to fetch, and report, on its own."""
        if (self._rows.shard_memory is None and self._rows.row_memory is None) or not len(rows):
            return
        name = bucket_name(bucket)
        gidx, local = self.locate(bucket, rows)
        jobs = [(self._bucket_groups[name], name, f.spec, gidx, local)
                for f in self._layout(bucket, tuple(fields) if fields is not None else None) if f.tensor and f.per_row]
        self._rows.prefetch(jobs)

    def _layout(self, bucket: tuple[int, int], fields: tuple[str, ...] | None) -> list[_FieldLayout]:
        """Per-row shape, size and kind of each requested field in a bucket; computed once, reads are hot."""
        key = (bucket, fields)
        layout = self._layouts.get(key)
        if layout is None:
            specs = [self.spec.field(f) for f in fields] if fields is not None else list(self.spec.fields)
            down = self.spec.vae_downsample
            layout = self._layouts[key] = [
                _FieldLayout(spec=spec, row_shape=tuple(spec.row_shape(bucket, down)), tensor=not spec.is_text,
                             per_row=spec.per_row(bucket, down),
                             row_nbytes=0 if spec.is_text else
                             int(np.prod(spec.row_shape(bucket, down), dtype=np.int64)) * np.dtype(spec.storage_dtype).itemsize,
                             torch_dtype=None if spec.is_text else _torch_dtype(spec))
                for spec in specs
            ]
        return layout

    def shard_numbers(self, bucket: tuple[int, int], rows: Iterable[int]) -> np.ndarray:
        """A number per row of a bucket naming the shard file that holds it (group, row // shard_rows):
        what the shard-window order groups rows by."""
        gidx, local = self.locate(bucket, rows)
        per_group = -(-int(max(self._by_id[g].bucket_counts[bucket_name(bucket)] for g in self._bucket_groups[bucket_name(bucket)]))
                      // self.spec.shard_rows)
        return gidx * per_group + local // self.spec.shard_rows

    def group_ids(self, bucket: tuple[int, int], rows: Iterable[int]) -> list[str]:
        """The group (input shard) each row of a bucket came from."""
        gidx, _ = self.locate(bucket, rows)
        groups = self._bucket_groups[bucket_name(bucket)]
        return [groups[g] for g in gidx]

    def keys(self, bucket: tuple[int, int], rows: Sequence[int]) -> list[str]:
        """The sample keys of rows of a bucket."""
        return self.read_rows(bucket, rows, fields=["key"])["key"]

    def _read_small_field(self, name: str, spec: FieldSpec, gidx: np.ndarray, local: np.ndarray) -> np.ndarray:
        """Small fields are read whole, one group at a time as rows from it are first asked for, into one
        array over the bucket's rows: a read is then a single fancy index. Text fields are decoded as they
        are loaded and kept as str objects (a key is a few bytes, its stored row `KEY_BYTES`)."""
        groups, offsets = self._bucket_groups[name], self._bucket_offsets[name]
        entry = self._small.get((name, spec.name))
        if entry is None:
            dtype = object if spec.is_text else spec.storage_dtype
            shape = () if spec.is_text else spec.row_shape(parse_bucket_name(name), self.spec.vae_downsample)
            entry = self._small[(name, spec.name)] = (np.empty((int(offsets[-1]), *shape), dtype=dtype), set())
        bucket_rows, loaded = entry
        for gi in set(gidx.tolist()) - loaded:
            rel = f"{SHARDS_DIR}/{groups[gi]}/{name}/{spec.name}"
            # zarr fills a missing chunk with the fill value: check the files first, or a deleted
            # chunk would read as empty keys and zero sizes.
            self._check_files(groups[gi], name, spec.name, checksums=True)
            try:
                whole = np.asarray(zarr.open_array(self.storage.zarr_store(rel, read_only=True), mode="r")[:])
                if spec.is_text:
                    whole = np.array(decode_keys(whole), dtype=object)
            except Exception as exc:
                raise CacheFormatError(f"{self.storage.path(rel)}: unreadable ({type(exc).__name__}) in cache group "
                                       f"{groups[gi]}; delete {self.storage.path(f'{SHARDS_DIR}/{groups[gi]}')} and "
                                       "re-run the cache job") from None
            start, stop = int(offsets[gi]), int(offsets[gi + 1])
            if len(whole) != stop - start:
                raise CacheFormatError(f"{self.storage.path(rel)}: {len(whole)} rows, the manifest of cache group "
                                       f"{groups[gi]} says {stop - start}; delete "
                                       f"{self.storage.path(f'{SHARDS_DIR}/{groups[gi]}')} and re-run the cache job")
            bucket_rows[start:stop] = whole
            loaded.add(gi)
        return bucket_rows[offsets[gidx] + local]

    def _check_files(self, group_id: str, name: str, field: str, checksums: bool) -> None:
        """Every file of one (group, bucket, field) array that the manifest lists must exist with its
        committed size (and crc32 when asked and recorded). Once per array per reader."""
        key = (group_id, name, field)
        if key in self._checked:
            return
        manifest = self._by_id[group_id]
        prefix = f"{name}/{field}/"
        on_disk = self.storage.file_sizes(f"{SHARDS_DIR}/{group_id}/{name}/{field}")  # one listing per array
        for rel, size in sorted(manifest.files.items()):
            if not rel.startswith(prefix):
                continue
            full = f"{SHARDS_DIR}/{group_id}/{rel}"
            have = on_disk.get(rel[len(prefix):])
            if have != size:
                what = "is missing" if have is None else f"has {have} bytes, committed {size}"
                raise CacheFormatError(f"{self.storage.path(full)} {what} (cache group {group_id}): the cache changed "
                                       f"after commit; delete {self.storage.path(f'{SHARDS_DIR}/{group_id}')} and re-run "
                                       "the cache job to re-cache that shard")
            if checksums and rel in manifest.checksums and zlib.crc32(self.storage.read_bytes(full)) != manifest.checksums[rel]:
                raise CacheFormatError(f"{self.storage.path(full)}: checksum mismatch (cache group {group_id}): the file "
                                       f"is corrupt; delete {self.storage.path(f'{SHARDS_DIR}/{group_id}')} and re-run "
                                       "the cache job to re-cache that shard")
        self._checked.add(key)

    # ---- prompts and integrity ------------------------------------------------------------------
    def prompts(self) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
        """(empty-prompt fields with a leading dim of 1, validation prompts, their fields)."""
        if not self.storage.exists(f"{PROMPTS_DIR}/{COMMIT_JSON}"):
            raise CacheFormatError(f"{self.storage.path(PROMPTS_DIR)} is missing or incomplete; re-run the cache job")
        root = zarr.open_group(self.storage.zarr_store(PROMPTS_DIR, read_only=True), mode="r")
        prompts = list(root.attrs["prompts"])
        result = []
        for sub in ("empty", "validation"):
            g = root[sub]
            result.append({name: _to_torch(self.spec.field(name), np.asarray(g[name][:])) for name in sorted(g.array_keys())})
        return result[0], prompts, result[1]

    def verify(self, checksums: bool = False) -> list[str]:
        """Problems found in committed groups (missing/resized files; crc32 when `checksums`), one line each."""
        problems = []
        for g in self.groups:
            have = self.storage.file_sizes(f"{SHARDS_DIR}/{g.group_id}")
            for rel, size in g.files.items():
                where = self.storage.path(f"{SHARDS_DIR}/{g.group_id}/{rel}")
                if rel not in have:
                    problems.append(f"{where}: missing (shard {g.group_id})")
                elif have[rel] != size:
                    problems.append(f"{where}: {have[rel]} bytes, committed {size} (shard {g.group_id})")
                elif checksums and rel in g.checksums:
                    crc = zlib.crc32(self.storage.read_bytes(f"{SHARDS_DIR}/{g.group_id}/{rel}"))
                    if crc != g.checksums[rel]:
                        problems.append(f"{where}: checksum mismatch (shard {g.group_id})")
        return problems

    def close(self) -> None:
        self._rows.close()
        self.storage.close()


def _to_torch(spec: FieldSpec, arr: np.ndarray) -> Any:
    if spec.is_text:
        return decode_keys(arr)
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.view(torch.bfloat16) if spec.dtype == "bfloat16" else t


def _torch_dtype(spec: FieldSpec) -> torch.dtype:
    if spec.dtype == "bfloat16":
        return torch.bfloat16
    return torch.from_numpy(np.empty(0, dtype=spec.storage_dtype)).dtype
