"""Read-ahead in the DataLoader workers (for object-store caches) changes when a micro-batch is read,
never what a step receives or in which order."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latentforge.shared.config import load_config
from latentforge.train.read_ahead import ReadAheadReader, ReadAheadSampler

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 60), st.integers(0, 4), st.integers(1, 6), st.integers(0, 12))
def test_each_item_carries_the_next_items_of_its_own_worker(n, workers, depth, horizon):
    items = list(range(n))
    out = list(ReadAheadSampler(items, workers, depth, horizon))
    assert [w.item for w in out] == items  # same items, same order
    stride = max(1, workers)
    for i, w in enumerate(out):
        assert w.ahead == tuple(items[i + k * stride] for k in range(1, depth + 1) if i + k * stride < n)
        # Beyond the read-ahead, up to the horizon: the shard files to prefetch.
        assert w.later == tuple(items[i + k * stride] for k in range(depth + 1, horizon + 1) if i + k * stride < n)


def test_reader_returns_what_a_plain_read_returns_and_reads_each_item_once():
    calls: list[int] = []
    lock = threading.Lock()

    def read(i: int) -> int:
        with lock:
            calls.append(i)
        return i * i

    reader = ReadAheadReader(read, depth=3)
    seq = list(ReadAheadSampler(range(20), workers=1, depth=3))
    assert [reader.get(w.item, w.ahead) for w in seq] == [i * i for i in range(20)]
    assert sorted(calls) == list(range(20))
    assert reader.get(99, ()) == 99 * 99  # not predicted: read there and then
    reader.close()


def test_loader_batches_are_the_same_with_read_ahead(small_cache):
    from latentforge.shared.cache_reader import CacheReader
    from latentforge.train.data import CachedBatches, CachedSamples, build_loader
    from latentforge.train.sampler import GlobalBucketSchedule, MicroBatchSampler

    config = load_config(DEMO, [
        f"cache.path={small_cache}", "train.output_dir=unused", "train.num_workers=2", "train.micro_batch_size=2"])
    reader = CacheReader(str(small_cache))
    samples = CachedSamples(reader, config)
    schedule = GlobalBucketSchedule(samples.bucket_sizes, 2, 0)

    def run(ahead: int) -> list[dict]:
        sampler = MicroBatchSampler(schedule, schedule.initial_state(), 0, 1, 2)
        dataset = CachedBatches(str(small_cache), {}, samples.train_rows, ahead)
        return list(itertools.islice(build_loader(dataset, sampler, config), 12))

    plain, ahead = run(0), run(4)
    assert len(plain) == len(ahead) == 12
    for a, b in zip(plain, ahead, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            same = torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else np.array_equal(a[k], b[k])
            assert same, k
    reader.close()



def test_shuffle_auto_is_shard_window_for_object_stores_unless_weighted():
    from latentforge.train.data import resolve_shuffle

    base = ["cache.path=unused", "train.output_dir=unused"]
    config = load_config(DEMO, base)
    assert resolve_shuffle(config, remote=True) == "shard_window"
    assert resolve_shuffle(config, remote=False) == "global"
    assert resolve_shuffle(load_config(DEMO, [*base, "train.shuffle=shard_window"]), remote=False) == "shard_window"
    assert resolve_shuffle(load_config(DEMO, [*base, "train.shuffle=global"]), remote=True) == "global"
