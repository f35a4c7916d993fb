"""Small pure helpers behind `shard_listing.py` and `sources.py`: skip counting, metadata filters, and
what may be shown.

Kept apart so those read as listing and streaming; everything here is side-effect free and
needs no storage.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import operator
import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from latentforge.shared.config import MetadataFilter

# Preference order when one sample has several images (img2dataset writes exactly one).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")

# Every reason a sample or shard can be skipped; docs/data-sources.md mirrors this table.
SKIP_REASONS: dict[str, str] = {
    "no_image": "sample has no jpg/jpeg/png/webp/bmp/tiff member",
    "no_caption": "caption missing, empty, or not a string",
    "caption_not_utf8": "the .txt caption is not valid UTF-8",
    "bad_json": "the .json metadata is not valid UTF-8 JSON or not an object",
    "filtered": "a metadata filter rejected the sample",
    "filtered_missing_field": "a filter's field is absent (or null) in the metadata",
    "duplicate_key": "key (or key+extension) already seen in this shard; the first is kept",
    "key_too_long": "the sample key is over 240 bytes of UTF-8 (cache_format.MAX_SOURCE_KEY_BYTES)",
    "key_not_utf8": "the sample key (a tar member name) is not valid UTF-8, or holds a NUL",
    "unreadable_file": "folder sources: one file could not be read; that sample is skipped",
    "truncated_tar": "tar ends early or is corrupt mid-way; samples before it are kept",
    "not_a_tar": "the shard is not a tar (or compressed tar) at all; whole shard skipped",
    "shard_unreadable": "the shard could not be opened or read (OSError class recorded)",
}

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    "in": lambda a, b: a in b,
    "not in": lambda a, b: a not in b,
}
# Stat fields that identify a file version; a whitelist, so nothing else (never a signed URL) leaks in.
_STAT_KEYS = ("size", "mtime", "ETag", "etag", "LastModified", "Last-Modified", "Content-MD5", "VersionId",
              "generation", "md5Hash")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_TAR_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar")


class SkipCounter:
    """Counts of skip reasons plus up to `max_examples` example details per reason.

    Merge the counters of many shards (or, via `as_dict`, of many ranks) for the job summary.
    """

    def __init__(self, max_examples: int = 5) -> None:
        self.max_examples = max_examples
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def skip(self, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples and detail:
            examples.append(detail)

    def merge(self, other: SkipCounter | Mapping[str, Mapping[str, Any]]) -> SkipCounter:
        """Add another counter (or another counter's `as_dict()`, e.g. gathered from a rank)."""
        items = other.as_dict() if isinstance(other, SkipCounter) else other
        for reason, entry in items.items():
            self.counts[reason] += int(entry["count"])
            examples = self.examples.setdefault(reason, [])
            examples.extend(entry.get("examples", [])[: self.max_examples - len(examples)])
        return self

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """{reason: {"count": n, "examples": [...]}}, sorted by reason (JSON-able)."""
        return {r: {"count": n, "examples": list(self.examples.get(r, []))} for r, n in sorted(self.counts.items())}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __getitem__(self, reason: str) -> int:
        return self.counts[reason]

    def __repr__(self) -> str:
        return f"SkipCounter({dict(sorted(self.counts.items()))})"


def validate_filters(source_index: int, filters: list[MetadataFilter]) -> None:
    """Fail at listing time, not per sample, on a filter that can never work."""
    for j, f in enumerate(filters):
        if f.op in ("in", "not in") and not isinstance(f.value, list | tuple):
            raise ValueError(
                f"data.sources[{source_index}].filters[{j}]: op {f.op!r} needs a list value, "
                f"got {f.value!r}; write e.g. value: [a, b]"
            )


def check_filters(filters: list[MetadataFilter], meta: Mapping[str, Any]) -> tuple[str, str] | None:
    """None if the sample passes every filter, else (reason, detail). Plain operators, never eval."""
    for f in filters:
        value = meta.get(f.field)
        if value is None:  # absent or JSON null: nothing to compare against
            return "filtered_missing_field", f"no {f.field!r} in metadata"
        try:
            ok = _OPS[f.op](value, f.value)
        except TypeError:  # e.g. "n/a" > 5: incomparable values fail the filter
            ok = False
        if not ok:
            return "filtered", f"{f.field}={value!r} fails {f.op} {f.value!r}"
    return None


def stat_facts(info: Mapping[str, Any]) -> dict[str, Any]:
    """The whitelisted, JSON-able version facts of an fsspec `info()` record."""
    out: dict[str, Any] = {}
    for key in _STAT_KEYS:
        value = info.get(key)
        if value is not None:
            out[key] = value.isoformat() if isinstance(value, _dt.datetime) else value
    return out


def sanitise_name(rel: str) -> str:
    """A shard's path relative to its pattern's folder, as a group-id-safe name (00000.tar -> 00000)."""
    lowered = rel.lower()
    for suffix in _TAR_SUFFIXES:
        if lowered.endswith(suffix) and len(rel) > len(suffix):
            rel = rel[: -len(suffix)]
            break
    name = _UNSAFE.sub("_", rel).strip("_") or "shard"
    if len(name) > 180:  # group ids are capped at 200 chars; keep the tail (the distinctive part)
        name = f"{hashlib.sha256(name.encode()).hexdigest()[:8]}-{name[-170:]}"
    return name


def identity_hash(identity: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of a shard identity (sorted keys, no whitespace)."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@functools.cache
def transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "could not read from storage" rather than a bug in this code."""
    errors: list[type[BaseException]] = [OSError, EOFError]
    try:  # botocore's NoCredentialsError & co. are not OSErrors
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    except ImportError:
        pass
    try:  # fsspec's http raises aiohttp.ClientResponseError for non-404 statuses
        from aiohttp import ClientError as AioClientError

        errors.append(AioClientError)
    except ImportError:
        pass
    return tuple(errors)
