"""Reading a cache from an object store: the rows of a batch go out as merged ranges in one concurrent
round (shard indexes fetched once, in one round too), and give exactly what the local reader gives;
throttling and 5xx answers are retried with backoff, and a store that keeps failing is one line naming
the object. Against moto on loopback (`devkit/object_store.py`), which counts the requests it answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latentforge.shared import range_reads
from latentforge.shared.cache_reader import CacheReader
from latentforge.shared.range_reads import StorageReadError, coalesce

FIELDS = ["latent_mean", "prompt_embeds", "pooled_prompt_embeds", "key"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 2000), st.integers(1, 300)), max_size=40),
       st.integers(0, 200), st.integers(1, 1500))
def test_coalesce_covers_each_request_once_within_its_limits(requests, max_gap, max_range):
    spans = coalesce(requests, max_gap=max_gap, max_range=max_range)
    members = sorted(i for s in spans for i in s.members)
    assert members == list(range(len(requests)))
    for s in spans:
        for i in s.members:
            f, off, n = requests[i]
            assert f == s.file and s.start <= off and off + n <= s.end
        assert len(s.members) == 1 or s.end - s.start <= max_range
        # No gap inside a span wider than max_gap: sorted pieces chain within it.
        reach = s.start
        for i in sorted(s.members, key=lambda i: requests[i][1]):
            assert requests[i][1] - reach <= max_gap
            reach = max(reach, requests[i][1] + requests[i][2])


def _batches(reader: CacheReader, n: int = 4, size: int = 6) -> list[tuple[tuple[int, int], np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for bucket, count in sorted(reader.bucket_counts().items()):
        for _ in range(n):
            out.append((bucket, rng.choice(count, size=min(size, count), replace=False)))
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k] if isinstance(a[k], list) else torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_remote_rows_equal_local_rows_in_one_concurrent_round_per_batch(small_cache, s3_cache):
    server, url, opts = s3_cache
    local, remote = CacheReader(str(small_cache)), CacheReader(url, opts)
    try:
        batches = _batches(local)
        for bucket, rows in batches:
            _same(remote.read_rows(bucket, rows, fields=FIELDS), local.read_rows(bucket, rows, fields=FIELDS))
        # Warm (indexes kept): a batch costs one GET per merged range, all in flight together.
        server.latency_s = 0.05
        bucket, rows = max(batches, key=lambda b: len(b[1]))
        server.reset_stats()
        remote.read_rows(bucket, rows, fields=["latent_mean", "prompt_embeds"])
        stats = server.reset_stats()
        assert 1 <= len(stats.gets) <= 2 * len(rows)
        assert len(stats.gets) == 1 or stats.max_in_flight >= 2, stats
    finally:
        local.close()
        remote.close()


@pytest.mark.slow
def test_throttling_is_retried_and_a_store_that_keeps_failing_is_one_line(small_cache, s3_cache, monkeypatch):
    server, url, opts = s3_cache
    monkeypatch.setattr(range_reads, "BACKOFF_S", 0.01)
    local, remote = CacheReader(str(small_cache)), CacheReader(url, opts)
    try:
        bucket, rows = _batches(local, n=1)[0]
        shard_gets = lambda path: "/shards/" in path and "/c/" in path.split("/shards/")[1]  # noqa: E731 - shard files
        left = {"n": 3}

        def three_then_fine(path: str, _: int) -> int | None:
            if shard_gets(path) and left["n"] > 0:
                left["n"] -= 1
                return 503 if left["n"] % 2 else 500
            return None

        server.fail = three_then_fine
        _same(remote.read_rows(bucket, rows, fields=FIELDS), local.read_rows(bucket, rows, fields=FIELDS))
        assert server.stats.failed == 3

        server.fail = lambda path, _: 503 if shard_gets(path) else None
        import s3fs

        # s3fs's own loop (5 tries, 0.1 x 1.7**i s apart) would run inside each of the reader's 6 attempts.
        monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
        fresh = CacheReader(url, opts)
        with pytest.raises(StorageReadError) as info:
            fresh.read_rows(bucket, rows, fields=["latent_mean"])
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"cannot read {url}/shards/") and "after 6 attempts" in msg
        assert "reduce your request rate" in msg, msg  # the store's own reason
        fresh.close()
    finally:
        local.close()
        remote.close()


@pytest.mark.slow
def test_read_through_copies_serve_later_reads_locally_and_stay_bounded(small_cache, s3_cache, tmp_path):
    import time

    server, url, opts = s3_cache
    local = CacheReader(str(small_cache))
    remote = CacheReader(url, opts, read_through=(str(tmp_path / "copies"), 10 << 20))
    try:
        batches = _batches(local, n=2)
        for bucket, rows in batches:  # first touch: remote reads, copies queued
            _same(remote.read_rows(bucket, rows, fields=FIELDS), local.read_rows(bucket, rows, fields=FIELDS))
        copies = remote._rows.read_through
        deadline = time.monotonic() + 60
        while copies._queued and time.monotonic() < deadline:
            time.sleep(0.05)
        assert copies.downloaded > 0
        for bucket, rows in batches:  # maps the copies
            remote.read_rows(bucket, rows, fields=["latent_mean", "prompt_embeds"])
        server.reset_stats()
        for bucket, rows in batches:
            _same(remote.read_rows(bucket, rows, fields=FIELDS), local.read_rows(bucket, rows, fields=FIELDS))
        assert server.reset_stats().gets == []  # every row from the local copies
        size = sum(p.stat().st_size for p in (tmp_path / "copies").rglob("*") if p.is_file())
        assert 0 < size <= 10 << 20 and not list((tmp_path / "copies").rglob("*.tmp"))
    finally:
        local.close()
        remote.close()


@pytest.mark.slow
def test_whole_shard_files_serve_rows_from_memory_bounded(small_cache, s3_cache, monkeypatch):
    server, url, opts = s3_cache
    monkeypatch.setattr(range_reads, "BACKOFF_S", 0.01)
    local, remote = CacheReader(str(small_cache)), CacheReader(url, opts, whole_files=2)
    try:
        batches = _batches(local)
        for bucket, rows in batches:  # whole files, their indexes parsed from their tails: the same rows
            _same(remote.read_rows(bucket, rows, fields=FIELDS), local.read_rows(bucket, rows, fields=FIELDS))
        memory = remote._rows.shard_memory
        assert memory is not None and len(memory._files) <= 2 and not memory._pending
        # A file kept in memory costs no request: read the same rows twice, the second time none go out.
        bucket, rows = batches[-1]
        remote.read_rows(bucket, rows, fields=["latent_mean"])
        server.reset_stats()
        remote.read_rows(bucket, rows, fields=["latent_mean"])
        assert server.reset_stats().gets == []
        # Prefetched files are there before the read asks for them.
        fresh = CacheReader(url, opts, whole_files=8)
        fresh.prefetch(bucket, rows, ["latent_mean"])
        fresh._rows._prefetcher.shutdown(wait=True)
        fresh._rows._prefetcher = None
        server.reset_stats()
        _same(fresh.read_rows(bucket, rows, fields=["latent_mean"]), local.read_rows(bucket, rows, fields=["latent_mean"]))
        assert server.reset_stats().gets == []
        fresh.close()
    finally:
        local.close()
        remote.close()


def test_shard_memory_failure_is_one_line_and_leaves_no_caller_waiting():
    from types import SimpleNamespace

    from latentforge.shared.shard_memory import ShardMemory

    calls = []

    def cat_ranges(paths, starts, ends, in_flight):
        calls.append(paths)
        return [FileNotFoundError("gone")] * len(paths)

    storage = SimpleNamespace(cat_ranges=cat_ranges, path=lambda rel: f"s3://b/c/{rel}")
    memory = ShardMemory(storage, max_files=2)
    with pytest.raises(StorageReadError, match=r"^cannot read s3://b/c/shards/g/x \(FileNotFoundError: gone\)"):
        memory.get_many({"shards/g/x": 10})
    assert not memory._pending and not memory._files and len(calls) == 1
