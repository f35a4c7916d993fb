"""The S3 range client (`shared/s3_ranges.py`) and its receive buffers (`shared/recv_buffers.py`): the same
bytes as s3fs, errors as one line with the store's reason and never the presigned URL, reused buffers only
once nothing refers to them; against moto on loopback (`devkit/object_store.py`)."""

from __future__ import annotations

import numpy as np
import pytest


def test_a_buffer_is_reused_only_once_every_view_of_it_is_gone():
    from latentforge.shared.recv_buffers import SMALL, BufferPool

    pool = BufferPool(keep_bytes=8 * SMALL)
    a = pool.take(2 * SMALL)
    a[:3] = b"abc"
    held = np.frombuffer(a[:3], np.uint8)  # a view made from a view keeps the buffer too
    del a
    b = pool.take(2 * SMALL)
    assert pool.allocated == 4 * SMALL  # the first is still referred to: a new one
    del held, b
    c = pool.take(2 * SMALL - 5)  # fits an idle one: no new memory
    assert pool.allocated == 4 * SMALL and len(c) == 2 * SMALL - 5
    pool.take(5 * SMALL)  # would pass keep_bytes: the idle buffer is dropped to make room
    assert pool.held_bytes() <= 8 * SMALL
    small = pool.take(100)
    assert len(small) == 100 and pool.allocated == 9 * SMALL  # small ones are not pooled


def test_reads_equal_s3fs_and_errors_name_the_reason_never_the_signed_url(s3_cache, monkeypatch):
    from latentforge.shared.s3_ranges import S3Ranges
    from latentforge.shared.storage import Storage

    server, url, opts = s3_cache
    storage = Storage(url, opts)
    files = sorted(rel for rel in storage.file_sizes("").items() if "/c/" in rel[0])[:3]
    paths = [storage.path(rel) for rel, _ in files]
    starts, ends = [0, 7, 1], [size for _, size in files]
    want = storage.fs.cat_ranges(paths, starts, ends)
    got = storage.cat_ranges(paths, starts, ends, in_flight=2)
    assert isinstance(storage._ranges, S3Ranges)
    assert [bytes(g) for g in got] == want

    missing = storage.cat_ranges([storage.path("shards/nope")], [0], [10], in_flight=1)[0]
    assert isinstance(missing, FileNotFoundError) and str(missing).startswith("HTTP 404 NoSuchKey")
    server.fail = lambda path, n: 503
    throttled = storage.cat_ranges(paths[:1], [0], [10], in_flight=1)[0]
    assert type(throttled) is OSError and "SlowDown: Please reduce your request rate." in str(throttled)
    for err in (missing, throttled):
        assert "Signature" not in str(err) and "Credential" not in str(err) and "\n" not in str(err)
    server.fail = None
    # A 403 (an expired URL or credentials) is asked again once with a fresh URL.
    server.fail = lambda path, n, left=[1]: 403 if left and left.pop() else None  # noqa: B006 - one failure
    assert bytes(storage.cat_ranges(paths[:1], [0], [10], in_flight=1)[0]) == want[0][:10]


def test_set_ups_a_presigned_url_cannot_carry_stay_with_s3fs(monkeypatch):
    import s3fs

    from latentforge.shared.s3_ranges import usable

    plain = s3fs.S3FileSystem(endpoint_url="http://127.0.0.1:9", key="k", secret="s", skip_instance_cache=True)
    assert usable(plain)
    payer = s3fs.S3FileSystem(endpoint_url="http://127.0.0.1:9", key="k", secret="s", requester_pays=True,
                              skip_instance_cache=True)
    assert not usable(payer)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "")
    assert not usable(s3fs.S3FileSystem(endpoint_url="https://s3.example.com", key="k", secret="s",
                                        skip_instance_cache=True))


@pytest.mark.parametrize("status", [500, 403])
def test_error_kinds_decide_retries(status):
    from latentforge.shared.s3_ranges import _error

    err = _error(status, "Reason", b"<Error><Code>X</Code><Message>why</Message></Error>")
    assert str(err) == f"HTTP {status} X: why"
    assert isinstance(err, PermissionError) == (status == 403)
