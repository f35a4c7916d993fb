"""Many byte ranges from an object store at once: coalesced, concurrent, bounded, retried.

An object store answers each request after 20-50 ms whatever its size, so the reader must never ask for
one row at a time and wait: the rows of a batch are sorted, neighbours (and near neighbours: reading a
small gap costs less than another round trip) are merged into one range, and all ranges go out together
(`Storage.cat_ranges`: S3 through `s3_ranges.py`'s kept-alive connections and reused buffers, other
stores through fsspec's `cat_ranges` on its event loop), at most `in_flight` at once. Transient failures
(throttling, 5xx, a dropped connection) are retried with exponential backoff; when they persist the read
fails with one line naming the object. Local files never come here: they are mapped (`Storage.map_file`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from .storage import Storage

MAX_GAP = 64 << 10  # bytes of unwanted data worth reading to save a request
MAX_RANGE = 16 << 20  # one merged range at most: bounds memory and keeps requests parallel
IN_FLIGHT = 32  # concurrent requests per reader (each DataLoader worker has its own)
RETRIES = 5
BACKOFF_S = 0.1  # first wait; doubles per attempt (0.1 + 0.2 + 0.4 + 0.8 + 1.6 = 3.1 s in all)
# Errors that say the request itself is wrong: retrying cannot help.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError)


class StorageReadError(OSError):
    """Reading the cache location failed after retries: one line naming the object and the reason."""


@dataclass(frozen=True)
class Span:
    """One merged request: `[start, end)` of `file`, covering the wanted pieces `members` (their indexes
    in the caller's request list)."""

    file: str
    start: int
    end: int
    members: tuple[int, ...]


def coalesce(requests: Sequence[tuple[str, int, int]], max_gap: int = MAX_GAP, max_range: int = MAX_RANGE) -> list[Span]:
    """Merge `(file, offset, nbytes)` requests into spans: same file, sorted by offset, a gap of at most
    `max_gap` bytes between neighbours, each span at most `max_range` bytes (a single request larger than
    that is its own span). Every request is covered by exactly one span."""
    order = sorted(range(len(requests)), key=lambda i: (requests[i][0], requests[i][1]))
    spans: list[Span] = []
    cur: list[int] = []
    file, start, end = "", 0, 0
    for i in order:
        f, off, n = requests[i]
        if cur and f == file and off - end <= max_gap and max(end, off + n) - start <= max_range:
            cur.append(i)
            end = max(end, off + n)
            continue
        if cur:
            spans.append(Span(file, start, end, tuple(cur)))
        cur, file, start, end = [i], f, off, off + n
    if cur:
        spans.append(Span(file, start, end, tuple(cur)))
    return spans


def read_spans(storage: Storage, spans: Sequence[Span], *, in_flight: int = IN_FLIGHT) -> list[bytes | memoryview]:
    """The bytes of each span, fetched concurrently (at most `in_flight` at once); failed ones are
    retried with backoff (`BACKOFF_S`, doubling), up to `RETRIES` times, then a `StorageReadError`
    naming the object."""
    out: list[bytes | memoryview | None] = [None] * len(spans)
    pending = list(range(len(spans)))
    wait, retries = BACKOFF_S, RETRIES
    for attempt in range(retries + 1):
        got = _cat_ranges(storage, [spans[i] for i in pending], in_flight)
        failed = []
        for i, data in zip(pending, got, strict=True):
            if isinstance(data, BaseException):
                if isinstance(data, _PERMANENT) or attempt == retries:
                    raise _read_error(storage, spans[i], data, attempt + 1)
                failed.append(i)
            elif len(data) != spans[i].end - spans[i].start:
                if attempt == retries:
                    raise StorageReadError(f"{storage.path(spans[i].file)}: short read ({len(data)} of "
                                           f"{spans[i].end - spans[i].start} bytes at {spans[i].start}); the object "
                                           "is truncated: delete its cache group and re-run the cache job")
                failed.append(i)
            else:
                out[i] = data
        if not failed:
            break
        time.sleep(wait)
        wait *= 2
        pending = failed
    # The last attempt raised on any failure, so every span is filled here.
    return [b for b in out if b is not None]


def _cat_ranges(storage: Storage, spans: Sequence[Span], in_flight: int) -> list[bytes | memoryview | BaseException]:
    starts, ends = [s.start for s in spans], [s.end for s in spans]
    paths = [storage.path(s.file) for s in spans]
    try:
        return storage.cat_ranges(paths, starts, ends, in_flight)
    except Exception as exc:  # a failure of the whole call (event loop, session): every span failed
        return [exc] * len(spans)


def _read_error(storage: Storage, span: Span, exc: BaseException, attempts: int) -> StorageReadError:
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    why = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if isinstance(exc, _PERMANENT):
        return StorageReadError(f"cannot read {storage.path(span.file)} ({why}); the cache changed after commit or "
                                "the credentials lack read access")
    return StorageReadError(f"cannot read {storage.path(span.file)} after {attempts} attempts ({why}); the object "
                            "store keeps failing: check it, then re-run (training resumes from its last checkpoint)")

