"""The trainer's data path: cached rows in, micro-batches of tensors out. No image decoding, no encoders.

`CachedSamples` maps the committed cache to training items: held-out rows (by key hash) are removed,
per-source `repeats` expand the rest, and each bucket's items are numbered 0..n-1 for the sampler. A
group's source is the one its manifest records (type and path, `cache_format.find_source`), so the
config may list its sources in another order than when the cache was made.
`CachedBatches` is the `Dataset` the DataLoader workers call with a whole `MicroBatch`, so one call is
one batched read of the cache (rows of one bucket, coalesced) rather than one read per sample.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from latentforge.shared.cache_format import find_source
from latentforge.shared.cache_reader import CacheReader
from latentforge.shared.config import Config

from .read_ahead import ReadAheadReader, ReadAheadSampler, WithAhead
from .sampler import MicroBatch, MicroBatchSampler
from .shard_window import ShardWindow

# What a training step reads; keys, hashes and upscale paths stay on disk.
TRAIN_FIELDS = ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds", "prompt_mask",
                "original_size", "crop_top_left", "target_size",
                "prompt_embeds_alt", "pooled_prompt_embeds_alt", "prompt_mask_alt")  # caption variants, if cached


def held_out(key: str, fraction: float) -> bool:
    """Stable split by key hash: the same sample is held out in every run, whatever the ranks or order."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


class CachedSamples:
    """Which cache rows are training items (per bucket, with repeats) and which are validation rows."""

    def __init__(self, reader: CacheReader, config: Config) -> None:
        self.reader = reader
        sources = group_sources(reader, config)
        repeats = {g: 1 if s == len(config.data.sources) else config.data.sources[s].repeats for g, s in sources.items()}
        self.num_sources = len(config.data.sources) + (len(config.data.sources) in sources.values())
        self.train_rows: dict[tuple[int, int], np.ndarray] = {}
        # Source index (position in data.sources; len(sources) for a group that records none) of every
        # training item: what weighted mixing, per-source loss weights and the per-source counts use.
        self.item_sources: dict[tuple[int, int], np.ndarray] = {}
        self.val_rows: dict[tuple[int, int], np.ndarray] = {}
        for bucket, n in sorted(reader.bucket_counts().items()):
            groups = reader.group_ids(bucket, range(n))
            keys = reader.read_rows(bucket, range(n), fields=["key"])["key"]
            train, train_sources, val = [], [], []
            for row, (group, key) in enumerate(zip(groups, keys, strict=True)):
                if held_out(key, config.train.held_out_fraction):
                    val.append(row)
                    continue
                train.extend([row] * repeats[group])
                train_sources.extend([sources[group]] * repeats[group])
            if train:
                self.train_rows[bucket] = np.asarray(train, dtype=np.int64)
                self.item_sources[bucket] = np.asarray(train_sources, dtype=np.int64)
            if val:
                self.val_rows[bucket] = np.asarray(val, dtype=np.int64)

    @property
    def bucket_sizes(self) -> dict[tuple[int, int], int]:
        return {b: len(r) for b, r in self.train_rows.items()}

    @property
    def num_train(self) -> int:
        return sum(self.bucket_sizes.values())


def group_repeats(reader: CacheReader, config: Config) -> dict[str, int]:
    """Group id -> `repeats` of the configured source the group came from (1 for a group that records no
    source: written by a tool, not the cache job). A group whose source is no longer in `data.sources` is
    a `CacheMismatchError`, one line naming the source and the fix."""
    sources = config.data.sources
    return {g: 1 if s == len(sources) else sources[s].repeats for g, s in group_sources(reader, config).items()}


def group_sources(reader: CacheReader, config: Config) -> dict[str, int]:
    """Group id -> index in `data.sources` of the source it came from; `len(data.sources)` for a group
    that records no source (written by a tool, not the cache job). Mismatches raise as in `group_repeats`."""
    configured = [(s.type, s.path) for s in config.data.sources]
    out = {}
    for manifest in reader.groups:
        index = find_source(manifest.group_id, manifest.origin, configured)
        out[manifest.group_id] = len(configured) if index is None else index
    return out


class CachedBatches(Dataset):
    """Dataset indexed by `MicroBatch`: returns the whole micro-batch as tensors, read in one call."""

    def __init__(self, url: str, storage_options: Mapping[str, Any], rows: Mapping[tuple[int, int], np.ndarray],
                 read_ahead: int = 0, read_through: tuple[str, int] | None = None, *, control: bool = False,
                 item_sources: Mapping[tuple[int, int], np.ndarray] | None = None, whole_shards: int = 0,
                 ahead_rows: int = 0) -> None:
        """`control`: also read the cached control images (ControlNet training); `item_sources`: the source
        index of each item, per bucket (per-source loss weights); on an object store in the shard-window
        order, `whole_shards` > 0: fetch shard files whole and keep that many per field in memory (one
        reader), or `ahead_rows` > 0: fetch just the rows of the worker's coming micro-batches, holding up
        to that many per field (several readers: see `shard_window_reads`)."""
        self.url, self.storage_options = url, dict(storage_options)
        self.read_through = read_through  # (folder, bytes): local copies of an object-store cache's shard files
        self.wanted = (*TRAIN_FIELDS, "conditioning") if control else TRAIN_FIELDS
        self.rows = {tuple(b): r for b, r in rows.items()}
        self.item_sources = {tuple(b): s for b, s in (item_sources or {}).items()}
        self.read_ahead = read_ahead  # micro-batches read concurrently ahead per worker (`read_ahead.py`)
        self.whole_shards, self.ahead_rows = whole_shards, ahead_rows
        self._reader: CacheReader | None = None  # opened lazily in each worker process
        self._ahead: ReadAheadReader[MicroBatch] | None = None
        self._prefetched: OrderedDict[MicroBatch, None] = OrderedDict()  # asked for already (`_prefetch`)

    def reader(self) -> CacheReader:
        if self._reader is None:
            self._reader = CacheReader(self.url, self.storage_options, read_through=self.read_through,
                                       whole_files=self.whole_shards * len(self.wanted),
                                       ahead_rows=self.ahead_rows * len(self.wanted))
        return self._reader

    def __len__(self) -> int:  # a map-style dataset must have one; the sampler decides what is read
        return sum(len(r) for r in self.rows.values())

    def __getitem__(self, item: MicroBatch | WithAhead[MicroBatch]) -> dict[str, Any]:
        if isinstance(item, WithAhead):
            if self._ahead is None:
                self._ahead = ReadAheadReader(self._read, max(1, self.read_ahead))
            if item.later and (self.whole_shards or self.ahead_rows):  # the next window's reads, in the background
                self._prefetch(item.later)
            return self._ahead.get(item.item, item.ahead)
        return self._read(item)

    def _prefetch(self, later: tuple[MicroBatch, ...]) -> None:
        # `later` moves on by one micro-batch per read: ask only for those not asked for yet, or every read
        # would pay again for the whole horizon's rows (hundreds), ~0.1 ms of CPU per sample read.
        new = [mb for mb in later if mb not in self._prefetched]
        self._prefetched.update(dict.fromkeys(new))
        while len(self._prefetched) > 2 * len(later):
            self._prefetched.popitem(last=False)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for mb in new:
            by_bucket.setdefault((int(mb.bucket[0]), int(mb.bucket[1])), []).extend(mb.items)
        reader = self.reader()
        for bucket, items in by_bucket.items():
            rows = np.unique(self.rows[bucket][np.asarray(items, dtype=np.int64)])
            reader.prefetch(bucket, rows, [f.name for f in reader.spec.fields if f.name in self.wanted])

    def _read(self, mb: MicroBatch) -> dict[str, Any]:
        reader = self.reader()
        bucket = (int(mb.bucket[0]), int(mb.bucket[1]))
        rows = self.rows[bucket][np.asarray(mb.items, dtype=np.int64)]
        fields = [f.name for f in reader.spec.fields if f.name in self.wanted]
        # In a worker the batch is built in shared memory: handing it to the trainer then copies nothing.
        batch = reader.read_rows(bucket, rows, fields=fields, shared_memory=get_worker_info() is not None)
        if bucket in self.item_sources:  # per-sample source index: the loss weight of each sample
            batch["source_index"] = torch.from_numpy(self.item_sources[bucket][np.asarray(mb.items, dtype=np.int64)])
        batch["step"] = mb.step
        batch["accum_index"] = mb.accum_index
        batch["bucket"] = bucket
        return batch

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None
        state["_ahead"] = None
        return state


def resolve_shuffle(config: Config, remote: bool) -> str:
    """`train.shuffle` made concrete: "global" or "shard_window" (auto: shard_window for an object store,
    unless sources are weighted: the weighted schedule draws its own order)."""
    weighted = any(s.weight is not None for s in config.data.sources)
    mode = config.train.shuffle
    if mode == "shard_window" and weighted:
        raise ValueError("train.shuffle: shard_window does not combine with data.sources[*].weight; set "
                         "train.shuffle: global or remove the weights")
    if mode == "auto":
        return "shard_window" if remote and not weighted else "global"
    return mode


WHOLE_FILE_READ_AHEAD = 2  # micro-batches read ahead by a worker that keeps whole shard files


class WindowReads(NamedTuple):
    """How a worker reads a remote cache in the shard-window order (`shard_window_reads`)."""

    whole_shards: int  # shard files kept per field (`CachedBatches(whole_shards=...)`), 0: none
    ahead_rows: int  # rows held ahead per field (`CachedBatches(ahead_rows=...)`), 0: none
    horizon: int  # micro-batches whose reads are fetched in the background (`build_loader`)
    read_ahead: int  # micro-batches read concurrently ahead (`CachedBatches(read_ahead=...)`)


def shard_window_reads(window: ShardWindow | None, global_batch: int, micro: int, world: int, workers: int,
                       read_ahead: int) -> WindowReads:
    """How a worker reads a remote cache in the shard-window order. One reader of a window (one rank, at
    most one DataLoader worker) fetches its shard files whole: one request per file part, and it reads
    every row of them. Several readers each fetch only their own rows' chunks: whole files would make
    every one of them download every file, `world x workers` times the cache's bytes per epoch. Rows are
    held one by one, not by file, so their reach may pass the window: at least 4 x `read_ahead`
    micro-batches, so each row has arrived when the read-ahead asks for it.

    A reader of whole files asks for a window's files half a window before the one ahead of it starts, so
    they have a window and a half to arrive (a store's slow answers and a dip in bandwidth are absorbed
    instead of stalling the reader at a window's start: +15-20 % samples/s on loopback at 20 ms) and keeps
    three windows' files. It reads from memory, so at most `WHOLE_FILE_READ_AHEAD` micro-batches ahead:
    each read-ahead thread costs the worker CPU in interpreter-lock hand-offs (a local cache: 0.20 ms per
    sample read with none, 0.28 with 1, 0.31 with 2, 0.44 with 16; docs/benchmarks.md, "Object store")."""
    if window is None:
        return WindowReads(0, 0, 0, read_ahead)
    horizon = window.horizon(global_batch, micro, world, workers)
    if world * max(1, workers) == 1:
        return WindowReads(window.files_kept(global_batch, windows=3), 0, -(-3 * horizon // 2),
                           min(read_ahead, WHOLE_FILE_READ_AHEAD))
    horizon = max(horizon, 4 * read_ahead)
    return WindowReads(0, (2 * horizon + read_ahead) * micro, horizon, read_ahead)


def shard_window_for(reader: CacheReader, train_rows: Mapping[tuple[int, int], np.ndarray], shards: int) -> ShardWindow:
    """The shard-window order's inputs for this cache: the shard file of every training item, per bucket."""
    blocks = {b: reader.shard_numbers(b, rows) for b, rows in train_rows.items()}
    return ShardWindow(blocks, shards, reader.spec.shard_rows)


def build_loader(dataset: CachedBatches, sampler: MicroBatchSampler, config: Config, horizon: int = 0) -> DataLoader:
    """DataLoader over micro-batches: workers read ahead while the model trains (prefetch_factor batches each);
    with `dataset.read_ahead`, each worker also keeps that many of its next micro-batches in flight, and
    fetches the shard files of its next `horizon` ones (shard-window order)."""
    workers = config.train.num_workers
    items: Any = (ReadAheadSampler(sampler, workers, dataset.read_ahead, horizon)
                  if dataset.read_ahead or horizon else sampler)
    return DataLoader(
        dataset, sampler=items, batch_size=None, num_workers=workers,
        prefetch_factor=config.train.prefetch_factor if workers else None,
        persistent_workers=False, pin_memory=torch.cuda.is_available(),
    )
