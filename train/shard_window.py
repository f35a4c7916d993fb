"""Shard-window order: an epoch order that reads a cache on an object store in whole shard files.

A globally shuffled order asks for rows spread over every shard file of a bucket, so a worker reading
from an object store pays one request (20-50 ms, and CPU) per row. Like WebDataset, this order
shuffles the *shard files* instead, lays their rows out file after file, then shuffles rows within
consecutive *windows* of about `shards` files' rows. A worker then needs about `shards + 1` files
at a time, fetches each with one request (the next window's while it serves the current one) and
serves many micro-batches from memory (`shared/shard_memory.py` keeps the files of a few windows).

Windows are cut at global-batch boundaries of the epoch pool (the carry from the previous epoch comes
first, so the first window is shorter by the carry), so every global batch lies inside one window and
the epoch plan can interleave buckets window by window (`interleave_windows`) without reopening a
window it has left. Pure numpy functions of their arguments: every rank computes the same order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

Bucket = tuple[int, int]


@dataclass(frozen=True)
class ShardWindow:
    """What the shard-window order needs: the shard file of every item, per bucket, and the window size.

    `blocks[b][i]` is any integer naming the shard file of item i of bucket b (same file, same number;
    items repeated by a source's `repeats` share their row's file). `shard_rows` is the cache's rows
    per shard file; a window holds `shards * shard_rows` items rounded up to whole global batches.
    """

    blocks: Mapping[Bucket, np.ndarray] = field(repr=False)
    shards: int
    shard_rows: int

    def __post_init__(self) -> None:
        if self.shards < 1 or self.shard_rows < 1:
            raise ValueError(f"shard window needs shards >= 1 and shard_rows >= 1, got {self.shards}, {self.shard_rows}")

    @property
    def name(self) -> str:
        """How a sampler state records the order, so a resume under another order fails loudly."""
        return f"shard_window:{self.shards}x{self.shard_rows}"

    def window_items(self, global_batch: int) -> int:
        """Items per window: about `shards` files' rows, a whole number (>= 1) of global batches."""
        return max(1, -(-self.shards * self.shard_rows // global_batch)) * global_batch

    def files_kept(self, global_batch: int, windows: int = 2) -> int:
        """Shard files (per field) a worker keeps in memory (`CachedBatches(whole_shards=...)`): those
        `windows` windows' batches can touch (the current one and those prefetched): their items over a
        file's rows, plus a partial file at each end."""
        return -(-windows * self.window_items(global_batch) // self.shard_rows) + 2

    def horizon(self, global_batch: int, micro: int, world: int, workers: int) -> int:
        """Micro-batches one DataLoader worker reads per window: how far ahead it prefetches files."""
        return -(-self.window_items(global_batch) // (micro * world * max(1, workers)))


def shard_window_order(items: np.ndarray, blocks: np.ndarray, window: int, offset: int,
                       rng: np.random.Generator) -> np.ndarray:
    """`items` in shard-window order: shard files in a random order, their items file after file, then
    shuffled within consecutive windows of `window` items, the first one shortened by `offset` (the
    carry that precedes it in the pool). A permutation of `items`."""
    items = np.asarray(items, dtype=np.int64)
    if items.size == 0:
        return items
    _, inverse = np.unique(np.asarray(blocks), return_inverse=True)
    rank = rng.permutation(int(inverse.max()) + 1)  # position of each shard file in the epoch
    laid_out = items[np.lexsort((items, rank[inverse]))]
    cuts = range(max(1, window - offset), len(laid_out), window)
    return np.concatenate([rng.permutation(part) for part in np.split(laid_out, list(cuts))])


def interleave_windows(batches: Mapping[Bucket, Sequence[np.ndarray]], per_window: int,
                       rng: np.random.Generator) -> list[tuple[Bucket, np.ndarray]]:
    """One epoch's global batches: each bucket's batches in their order, cut into runs of `per_window`
    (one window each), the runs of all buckets in a random order. A worker so holds one window's files
    at a time, not one per bucket."""
    runs = {b: [list(bs[i: i + per_window]) for i in range(0, len(bs), per_window)] for b, bs in batches.items()}
    keys = sorted(runs)
    labels = rng.permutation(np.repeat(np.arange(len(keys)), [len(runs[b]) for b in keys]))
    nxt = dict.fromkeys(keys, 0)
    out: list[tuple[Bucket, np.ndarray]] = []
    for label in labels.tolist():
        bucket = keys[label]
        out.extend((bucket, items) for items in runs[bucket][nxt[bucket]])
        nxt[bucket] += 1
    return out
