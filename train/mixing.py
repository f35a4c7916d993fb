"""Weighted data mixing: per-source sampling probabilities inside the global bucket schedule.

With `data.sources[*].weight` set, source s supplies the share w_s / sum(w) of the trained samples whatever
its size (the SANA/PixArt trainer's equal-weight sampling of its datasets is all weights equal). An epoch
still holds N = sum of the sources' items x repeats slots, so `repeats` sets the epoch length; the slots
are split over sources by weight and, inside a source, over buckets by where its items are:

    q[s, b] = N * w_s / W * n[s, b] / n[s]     (rounded to integers by largest remainder, total N)

Each (source, bucket) cell draws its q[s, b] items per epoch from an endless stream of seeded
permutations of its items, so over epochs every item of a cell is drawn equally often (to within one).
The bucket's epoch pool is the carry from the previous epoch followed by the seeded shuffle of the
fresh draws (one occurrence of each carried item removed, trimmed to the bucket's fixed slot count), so
the pool size, and so the steps per epoch, never change: everything else (global batches, carry, resume,
the (accum, rank) slicing that makes the order independent of the layout) is `GlobalBucketSchedule`'s.
Pure numpy, a function of (seed, epoch, carry) as the base schedule is.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from latentforge.shared.cache_format import bucket_name

from .sampler import Bucket, GlobalBucketSchedule, SamplerState
from .shard_window import ShardWindow

# A tag in the permutation streams' seeds, so they never share entropy with the base schedule's
# [seed, epoch, h, w] (SeedSequence pads short entropy with zeros; the source position is >= 1 too).
_STREAM_TAG = 0x6D6978


def source_quotas(cells: Mapping[int, Mapping[Bucket, int]], weights: Mapping[int, float]) -> dict[int, dict[Bucket, int]]:
    """Slots per epoch of each (source, bucket) cell: integers summing to the total item count N.

    `cells[s][b]` is how many items (with repeats) source s has in bucket b; `weights[s]` > 0 its sampling
    weight. A source without items gets no slots and drops out of the normalisation. Rounding is by
    largest remainder (ties in (source, bucket) order), so each cell gets floor or ceil of its exact share.
    """
    sizes = {s: sum(c.values()) for s, c in cells.items()}
    live = [s for s in sorted(cells) if sizes[s] > 0]
    total = sum(sizes[s] for s in live)
    if not live:
        return {s: {} for s in cells}
    for s in live:
        if not weights.get(s, 0) > 0:
            raise ValueError(f"source {s} has items but weight {weights.get(s)}; weights must be > 0")
    w_total = sum(weights[s] for s in live)
    keys = [(s, b) for s in live for b in sorted(cells[s]) if cells[s][b] > 0]
    exact = np.array([total * weights[s] / w_total * cells[s][b] / sizes[s] for s, b in keys], dtype=np.float64)
    base = np.floor(exact + 1e-9).astype(np.int64)
    short = total - int(base.sum())
    # Largest fractional part first; a stable sort keeps (source, bucket) order among ties.
    order = np.argsort(-(exact - base), kind="stable")
    base[order[:short]] += 1
    out: dict[int, dict[Bucket, int]] = {s: {} for s in cells}
    for (s, b), q in zip(keys, base.tolist(), strict=True):
        out[s][b] = q
    return out


def stream_draws(items: np.ndarray, epoch: int, quota: int, seed: int, bucket: Bucket, source: int) -> np.ndarray:
    """Epoch `epoch`'s `quota` draws from the endless stream of seeded permutations of `items`.

    Positions [epoch * quota, (epoch + 1) * quota) of perm_0 ++ perm_1 ++ ...; perm_k is seeded by
    (seed, bucket, source, k), so the draws depend on nothing but their arguments.
    """
    n = len(items)
    if quota <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    start, end = epoch * quota, (epoch + 1) * quota
    first, last = start // n, (end - 1) // n
    perms = [items[np.random.default_rng([seed, _STREAM_TAG, *bucket, source + 1, k]).permutation(n)]
             for k in range(first, last + 1)]
    return np.concatenate(perms)[start - first * n : end - first * n].astype(np.int64)


class WeightedBucketSchedule(GlobalBucketSchedule):
    """`GlobalBucketSchedule` whose epoch pools are drawn by source weight (see the module docstring).

    `item_sources[b][i]` is the source index of item i of bucket b (the trainer's `CachedSamples`); items
    are the same per-bucket indices the base schedule hands out, so the data path does not change.
    """

    def __init__(self, item_sources: Mapping[Bucket, Sequence[int] | np.ndarray], weights: Mapping[int, float],
                 global_batch: int, seed: int) -> None:
        self.item_sources = {tuple(map(int, b)): np.asarray(v, dtype=np.int64) for b, v in item_sources.items()}
        cells: dict[int, dict[Bucket, int]] = {}
        self.cell_items: dict[tuple[int, Bucket], np.ndarray] = {}
        for b, src in sorted(self.item_sources.items()):
            for s in np.unique(src).tolist():
                idx = np.flatnonzero(src == s)
                cells.setdefault(s, {})[b] = len(idx)
                self.cell_items[(s, b)] = idx
        self.weights = {int(s): float(w) for s, w in weights.items()}
        self.quotas = source_quotas(cells, self.weights)
        slots = {b: sum(self.quotas[s].get(b, 0) for s in self.quotas) for b in self.item_sources}
        super().__init__(slots, global_batch, seed)

    @property
    def unreached(self) -> list[tuple[int, Bucket]]:
        """(source, bucket) cells with items but no slot per epoch: raise that source's weight or repeats."""
        return [(s, b) for (s, b) in sorted(self.cell_items) if self.quotas[s].get(b, 0) == 0]

    def _pools(self, epoch: int, carry: Mapping[str, Sequence[int]]) -> dict[Bucket, np.ndarray]:
        self._check_epoch_carry(epoch, carry)
        pools: dict[Bucket, np.ndarray] = {}
        for bucket, slots in self.bucket_sizes.items():
            n_items = len(self.item_sources[bucket])
            carried = np.asarray(carry.get(bucket_name(bucket), ()), dtype=np.int64)
            # Weighted pools repeat items, so a carry may too; it must still name items of this bucket
            # and be shorter than a global batch (the remainder of a pool), or the dataset changed.
            if carried.size and (carried.min() < 0 or carried.max() >= n_items or carried.size >= self.global_batch
                                 or carried.size > slots):
                raise ValueError(f"carry for bucket {bucket_name(bucket)} does not fit its {n_items} items")
            fresh = np.concatenate([np.zeros(0, dtype=np.int64)] + [
                stream_draws(self.cell_items[(s, bucket)], epoch, self.quotas[s].get(bucket, 0), self.seed, bucket, s)
                for s in sorted(self.quotas) if (s, bucket) in self.cell_items])
            fresh = fresh[np.random.default_rng([self.seed, epoch, *bucket]).permutation(len(fresh))]
            keep = np.ones(len(fresh), dtype=bool)
            for item in carried.tolist():  # one occurrence each: the carry stands in for its own draw
                hits = np.flatnonzero((fresh == item) & keep)
                if hits.size:
                    keep[hits[0]] = False
            pools[bucket] = np.concatenate([carried, fresh[keep][: slots - len(carried)]])
        return pools


@dataclass
class SourceCounter:
    """Samples trained per source, counted from the global schedule (rank-independent, exact on resume).

    Walks its own copy of the global batch order one optimizer step at a time; a resumed run first
    replays the steps already done, so the counts cover the whole run, not just this process.
    """

    schedule: GlobalBucketSchedule
    item_sources: Mapping[Bucket, np.ndarray]
    num_sources: int

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.num_sources, dtype=np.int64)
        self._walk: Iterator[tuple[SamplerState, Bucket, np.ndarray]] | None = None

    def advance(self, steps: int = 1) -> None:
        """Count the next `steps` global batches."""
        if self._walk is None:
            if not self.schedule.steps_per_epoch:
                return
            self._walk = self.schedule.global_batches(self.schedule.initial_state())
        for _ in range(steps):
            _, bucket, items = next(self._walk)
            self.counts += np.bincount(np.asarray(self.item_sources[bucket])[items], minlength=self.num_sources)

    def shares(self) -> list[float]:
        """Fraction of the samples seen so far that came from each source."""
        total = int(self.counts.sum())
        return [float(c) / total if total else 0.0 for c in self.counts]


def build_schedule(item_sources: Mapping[Bucket, np.ndarray], bucket_sizes: Mapping[Bucket, int],
                   source_weights: Sequence[float | None], global_batch: int, seed: int,
                   shard_window: ShardWindow | None = None) -> GlobalBucketSchedule:
    """The run's schedule: weighted when the sources set `weight` (all or none, the config checks), else the
    plain one over items x repeats (in shard-window order with `shard_window`). Items of a group that
    records no source (index len(sources)) weigh 1."""
    if all(w is None for w in source_weights):
        return GlobalBucketSchedule(bucket_sizes, global_batch, seed, shard_window)
    if shard_window is not None:
        raise ValueError("train.shuffle: shard_window does not combine with data.sources[*].weight")
    weights = {i: float(w) for i, w in enumerate(source_weights) if w is not None}
    weights.setdefault(len(source_weights), 1.0)
    return WeightedBucketSchedule(item_sources, weights, global_batch, seed)


def source_report(counts: Sequence[int], sources: Sequence[object]) -> list[dict[str, object]]:
    """run_summary.json's per-source lines: type, path, weight, loss weight, samples seen and their share."""
    total = int(sum(counts))
    out: list[dict[str, object]] = []
    for i, n in enumerate(counts):
        src = sources[i] if i < len(sources) else None
        out.append({"index": i, "type": getattr(src, "type", "unattributed"), "path": getattr(src, "path", None),
                    "weight": getattr(src, "weight", None), "loss_weight": getattr(src, "loss_weight", 1.0),
                    "samples": int(n), "share": round(int(n) / total, 6) if total else 0.0})
    return out


def check_resume_weights(saved_sources: Sequence[Mapping[str, object]], sources: Sequence[object]) -> None:
    """Refuse (one line) to resume a run whose source weights changed: the sampler position would then point
    into another sample order. `saved_sources` is the checkpoint's config snapshot of data.sources."""
    from latentforge.shared.config import ConfigError

    before = [s.get("weight") for s in saved_sources]
    now = [getattr(s, "weight", None) for s in sources]
    if before != now:
        i = next((i for i, (a, b) in enumerate(zip(before, now, strict=False)) if a != b), min(len(before), len(now)))
        raise ConfigError(f"data.sources.{i}.weight: the checkpoint was trained with weights {before}, the config "
                          f"sets {now}; keep the checkpoint's weights to resume, or start a fresh run (train.resume unset)")
