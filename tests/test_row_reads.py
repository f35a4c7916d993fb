"""Reads of a cache on an object store in the shard-window order: several readers of a window fetch only
their own rows ahead (`row_memory.py`), one reader keeps whole files in the parts they arrived in
(`shard_memory.PartedFile`); against moto on loopback (`devkit/object_store.py`)."""

from __future__ import annotations

import numpy as np


def test_row_memory_holds_claimed_rows_once_and_readers_wait_for_fetches_under_way():
    import threading

    from latentforge.shared.row_memory import RowMemory

    memory = RowMemory(max_rows=3)
    assert memory.claim(["a", "b"]) == ["a", "b"] and memory.claim(["a", "c"]) == ["c"]  # a: under way
    got = {}
    reader = threading.Thread(target=lambda: got.setdefault("a", memory.take("a")))
    reader.start()
    memory.fill({"a": memoryview(b"A"), "b": memoryview(b"B")})
    reader.join(5)
    assert bytes(got["a"]) == b"A" and memory.take("a") is None  # taken once, then gone
    memory.drop(["c"])  # its fetch failed: claimable again, until its reader reads it itself
    assert memory.claim(["c"]) == ["c"]
    memory.drop(["c"])
    assert memory.take("c") is None and memory.claim(["c"]) == []  # read directly now: never fetched again
    memory.claim(["d", "e", "f"])
    memory.fill({"d": memoryview(b"D"), "e": memoryview(b"E"), "f": memoryview(b"F")})
    assert memory.take("b") is None and bytes(memory.take("f")) == b"F"  # at most 3 held: the oldest went


def test_one_reader_reads_whole_files_several_read_only_their_rows():
    from latentforge.train.data import WHOLE_FILE_READ_AHEAD, shard_window_reads
    from latentforge.train.shard_window import ShardWindow

    window = ShardWindow({(64, 64): np.zeros(4096, dtype=np.int64)}, shards=2, shard_rows=256)
    # One reader: whole files, read from memory, so only a short read-ahead (more costs CPU, no waiting).
    # (a window and a half ahead, three windows' files kept).
    assert shard_window_reads(window, 64, 4, 1, 0, 16) == (window.files_kept(64, 3), 0, 192, WHOLE_FILE_READ_AHEAD)
    assert window.files_kept(64, 3) == 3 * 512 // 256 + 2
    assert shard_window_reads(window, 64, 4, 1, 0, 1).read_ahead == 1
    whole, rows, horizon, ahead = shard_window_reads(window, 64, 4, 8, 4, 16)
    assert whole == 0 and horizon == 64 and rows == (2 * 64 + 16) * 4 and ahead == 16
    assert shard_window_reads(None, 64, 4, 8, 4, 16) == (0, 0, 0, 16)


def test_prefetched_rows_serve_the_read_without_requests_and_only_those_rows_are_fetched(small_cache, s3_cache):
    import torch

    from latentforge.shared.cache_reader import CacheReader

    server, url, opts = s3_cache
    fields = ["latent_mean", "prompt_embeds", "pooled_prompt_embeds"]
    local, remote = CacheReader(str(small_cache)), CacheReader(url, opts, ahead_rows=64)
    try:
        bucket, count = max(local.bucket_counts().items(), key=lambda kv: kv[1])
        rows = np.arange(0, count, 3)  # every third row: this worker's share
        remote.read_rows(bucket, rows, fields=["pooled_prompt_embeds"])  # opens the cache, loads the small field
        server.reset_stats()
        remote.prefetch(bucket, rows, fields)
        remote._rows._prefetcher.shutdown(wait=True)
        remote._rows._prefetcher = None
        fetched = server.reset_stats()
        assert remote._rows.row_memory.fetched == len(rows) * 2  # the two per-row fields, once each
        got = remote.read_rows(bucket, rows, fields=fields)
        assert server.reset_stats().gets == []  # every row from memory
        want = local.read_rows(bucket, rows, fields=fields)
        for name in fields:
            assert torch.equal(got[name], want[name]), name
        # Only this worker's rows crossed the wire (a third of the rows, with gaps under 64 KiB merged),
        # not the whole shard files: well under the files' bytes.
        files = {ra.shard_file(s): ra.expected_sizes[ra.shard_file(s)[len(ra.rel) + 1:]]
                 for ra in remote._rows._arrays.values() for s in ra.indexes}
        shard_gets = [g for g in fetched.gets if "/c/0" in g]  # indexes and row ranges, not metadata
        assert 1 <= len(shard_gets) <= 2 * len(rows) * 2
        assert 0 < fetched.range_bytes < 0.6 * sum(files.values()), (fetched.range_bytes, files)
    finally:
        local.close()
        remote.close()


def test_a_file_kept_in_parts_slices_like_the_whole_file():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from latentforge.shared.shard_memory import PartedFile

    files = (bytes(range(256)) * 4 + b"tail", bytes(range(200)) * 5)  # the last part short, or not
    parted = [PartedFile([d[lo: lo + 100] for lo in range(0, len(d), 100)], 100) for d in files]
    assert [len(p) for p in parted] == [len(d) for d in files]

    @settings(max_examples=300, deadline=None)
    @given(st.integers(0, 1), st.integers(0, 1028), st.integers(0, 1028))
    def same(which: int, a: int, b: int) -> None:
        data = files[which]
        start, end = sorted((min(a, len(data)), min(b, len(data))))
        assert bytes(parted[which].slice(start, end)) == data[start:end]

    same()


def _read_in_child(url: str, opts: dict, bucket: tuple[int, int], rows: list[int], out, inherited=None) -> None:
    from latentforge.shared.cache_reader import CacheReader

    reader = inherited or CacheReader(url, opts)  # inherited: the parent's reader, its S3 client's state with it
    out.put(float(reader.read_rows(bucket, np.asarray(rows), fields=["latent_mean"])["latent_mean"].sum()))
    reader.close()


def test_a_worker_forked_after_the_parent_read_the_store_reads_it_too(s3_cache):
    """DataLoader workers are forked from a process that has read the store (validation, the first epoch's
    workers): the S3 client must work in the child. obstore's Rust runtime does not (it hangs), which is
    why the reads stay with s3fs, whose event loop fsspec resets after a fork."""
    import multiprocessing as mp

    from latentforge.shared.cache_reader import CacheReader

    _, url, opts = s3_cache
    parent = CacheReader(url, opts)
    bucket, count = max(parent.bucket_counts().items(), key=lambda kv: kv[1])
    rows = list(range(min(count, 4)))
    want = float(parent.read_rows(bucket, np.asarray(rows), fields=["latent_mean"])["latent_mean"].sum())
    ctx = mp.get_context("fork")
    for inherited in (None, parent):  # a reader of its own; the parent's (threads and connections made anew)
        out = ctx.Queue()
        child = ctx.Process(target=_read_in_child, args=(url, opts, bucket, rows, out, inherited))
        child.start()
        child.join(60)
        alive = child.is_alive()
        if alive:
            child.kill()
        assert not alive, "a reader in a forked child hung"
        assert child.exitcode == 0 and out.get(timeout=5) == want
    parent.close()
