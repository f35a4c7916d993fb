"""S3 range reads through obstore: which options it takes (the rest go through fsspec), the same bytes as
s3fs from a loopback store, and the store's reason in one short line."""

from __future__ import annotations

import uuid

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
    assert object_reads.object_reads("s3://bucket", {"anon": True}).key("x") == "x"
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
