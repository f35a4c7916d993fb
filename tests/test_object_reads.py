"""S3 range reads through obstore: which options it takes (the rest go through fsspec), the same bytes as
s3fs from a loopback store, and the store's reason in one short line."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from latentforge.devkit.object_store import loopback_s3
from latentforge.shared import object_reads
from latentforge.shared.range_reads import Span, StorageReadError, read_spans
from latentforge.shared.storage import Storage


def test_only_understood_options_take_the_obstore_path(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    r2 = {"endpoint_url": "https://acct.r2.cloudflarestorage.com", "client_kwargs": {"region_name": "auto"},
          "config_kwargs": {"max_pool_connections": 64, "retries": {"max_attempts": 1}}}
    reads = object_reads.object_reads("s3://bucket/some/cache", r2)
    assert reads is not None and reads.key("shards/g/x") == "some/cache/shards/g/x"
    asked = []  # no endpoint and no region named: the bucket's region is looked up (here: not on the network)
    monkeypatch.setattr(object_reads, "bucket_region", lambda bucket, anon: asked.append((bucket, anon)) or "eu-west-1")
    assert object_reads.object_reads("s3://bucket", {"anon": True}).key("x") == "x"
    assert asked == [("bucket", True)]
    object_reads.object_reads("s3://bucket", {"client_kwargs": {"region_name": "us-west-2"}})
    assert asked == [("bucket", True)]  # a named region is used as it is
    # An option obstore has no equivalent for, another protocol, a local folder: fsspec reads them.
    assert object_reads.object_reads("s3://bucket/c", {"s3_additional_kwargs": {"SSECustomerKey": "k"}}) is None
    assert object_reads.object_reads("s3://bucket/c", {"config_kwargs": {"signature_version": "s3v4"}}) is None
    assert object_reads.object_reads("gs://bucket/c", {}) is None
    assert Storage("/tmp/somewhere").object_reads() is None


def test_reason_is_the_status_and_the_stores_own_words():
    text = ("Generic S3 error: Error performing GET http://127.0.0.1:1/b/k in 1ms - Server returned non-2xx status "
            "code: 503 Service Unavailable: <?xml version='1.0'?><Error><Code>SlowDown</Code><Message>Please reduce "
            "your request rate.</Message></Error>")
    assert object_reads._reason(text) == "HTTP 503 Service Unavailable, SlowDown: Please reduce your request rate."
    assert object_reads._reason("connection reset by peer\nmore") == "connection reset by peer"


def test_obstore_reads_equal_s3fs_reads_and_fail_in_one_line(monkeypatch):
    import s3fs

    from latentforge.shared import range_reads

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(range_reads, "BACKOFF_S", 0.001)
    data = bytes(range(256)) * 4096  # 1 MiB
    with loopback_s3() as server:
        bucket = f"lf-reads-{uuid.uuid4().hex[:12]}"
        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True)
        fs.mkdir(bucket)
        fs.pipe(f"{bucket}/c/obj", data)
        fast = Storage(f"s3://{bucket}/c", {"endpoint_url": server.endpoint})
        slow = Storage(f"s3://{bucket}/c", {"endpoint_url": server.endpoint})
        slow._reads = None  # the fsspec path
        assert fast.object_reads() is not None
        spans = [Span("obj", 0, 10, (0,)), Span("obj", 1000, 300_000, (1,)), Span("obj", len(data) - 7, len(data), (2,))]
        got = read_spans(fast, spans)
        assert [bytes(g) for g in got] == [bytes(g) for g in read_spans(slow, spans)]
        assert [bytes(g) for g in got] == [data[s.start:s.end] for s in spans]
        server.fail = lambda path, n: 503
        with pytest.raises(StorageReadError) as info:
            read_spans(fast, spans[:1])
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"cannot read s3://{bucket}/c/obj after 6 attempts")
        assert "SlowDown: Please reduce your request rate." in msg
        server.fail = None
        with pytest.raises(StorageReadError, match=r"NoSuchKey.*the cache changed after commit"):
            read_spans(fast, [Span("missing", 0, 10, (0,))])


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
    from latentforge.train.data import shard_window_reads
    from latentforge.train.shard_window import ShardWindow

    window = ShardWindow({(64, 64): np.zeros(4096, dtype=np.int64)}, shards=2, shard_rows=256)
    whole, rows, horizon = shard_window_reads(window, 64, 4, 1, 0, 16)
    assert (whole, rows, horizon) == (window.files_kept(64), 0, 128)
    whole, rows, horizon = shard_window_reads(window, 64, 4, 8, 4, 16)
    assert whole == 0 and horizon == 64 and rows == (2 * 64 + 16) * 4
    assert shard_window_reads(None, 64, 4, 8, 4, 16) == (0, 0, 0)


def test_prefetched_rows_serve_the_read_without_requests_and_only_those_rows_are_fetched(small_cache, monkeypatch):
    import torch

    from latentforge.devkit.object_store import upload_tree
    from latentforge.shared.cache_reader import CacheReader

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    fields = ["latent_mean", "prompt_embeds", "pooled_prompt_embeds"]
    with loopback_s3() as server:
        url = f"s3://lf-rows-{uuid.uuid4().hex[:12]}/c"
        upload_tree(server.endpoint, str(small_cache), url)
        local, remote = CacheReader(str(small_cache)), CacheReader(url, {"endpoint_url": server.endpoint}, ahead_rows=64)
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


def test_the_bucket_region_comes_from_the_store(monkeypatch):
    import s3fs

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    with loopback_s3() as server:
        bucket = f"lf-region-{uuid.uuid4().hex[:12]}"
        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True,
                               client_kwargs={"region_name": "eu-west-1"})
        fs.mkdir(bucket, region_name="eu-west-1")
        assert object_reads.bucket_region(bucket, endpoint=server.endpoint) == "eu-west-1"
