"""Streaming the samples of one input shard for the cache job: tars and virtual folder shards.

Listing the shards (`list_shards`, `ShardRef`: stable group ids, stat-only identities) is
`shard_listing.py`; this module reads one: `iter_shard` streams its samples and their content hash. Bad
data is skipped and counted in a `SkipCounter`, never fatal: one corrupt tar in a million-image crawl must
not stop the job. Credentials are never taken from the config: fsspec, s3fs and botocore read them from
the environment or a profile, and nothing here logs or stores them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from latentforge.shared.cache_format import key_problem
from latentforge.shared.config import SourceConfig

from .shard_listing import ShardRef, fs_options, list_shards
from .source_checks import IMAGE_EXTS, SkipCounter, check_filters, transport_errors
from .tar_stream import HashingReader, NotATarError, TruncatedTarError, iter_tar_groups

__all__ = ["IMAGE_EXTS", "RawSample", "ShardReader", "ShardRef", "SkipCounter", "iter_shard", "list_shards"]

log = logging.getLogger(__name__)


@dataclass
class RawSample:
    """One sample as stored: encoded image bytes (not decoded here), its caption and json metadata."""

    key: str
    image: bytes
    image_ext: str
    caption: str
    metadata: dict[str, Any]
    source_index: int
    sidecar: bytes | None = None  # the conditioning map `<key>.<name>.<ext>` when one is asked for and present


# ------------------------------------------------------------------------------------------- reading


def iter_shard(ref: ShardRef, source: SourceConfig, stats: SkipCounter, missing_caption: str = "skip",
               sidecar: str | None = None) -> ShardReader:
    """Stream the samples of one shard; see `ShardReader` for the content hash and shard errors.

    `missing_caption="empty"` keeps samples without a caption, with "" as caption (they then train
    unconditionally); "skip" drops them as `no_caption`. `sidecar` (e.g. "depth") attaches each sample's
    `<key>.depth.<image ext>` member or file as `RawSample.sidecar` (None when it has none).
    """
    return ShardReader(ref, source, stats, missing_caption, sidecar)


class ShardReader:
    """An iterator over one shard's good samples; bad ones go to `stats` with a reason.

    After it is exhausted, `content_hash` is the blake2b-256 hex of the shard's bytes (tars: the whole
    file; folders: each member's relative path, length and bytes in order), or None if a shard-level
    error (`error`: truncated_tar, not_a_tar, shard_unreadable) stopped it early; the samples yielded
    before such an error are valid and stay yielded. Iterate once: it streams.
    """

    def __init__(self, ref: ShardRef, source: SourceConfig, stats: SkipCounter, missing_caption: str = "skip",
                 sidecar: str | None = None) -> None:
        self.missing_caption, self.sidecar = missing_caption, sidecar
        self.ref, self.source, self.stats = ref, source, stats
        self.error: str | None = None
        self.yielded = 0
        self.skipped_samples = 0  # samples read and dropped here (shard-level errors are not samples)
        self._digest = hashlib.blake2b(digest_size=32)
        self._done = False
        self._seen: set[str] = set()
        self._gen = self._run()

    def __iter__(self) -> ShardReader:
        return self

    def __next__(self) -> RawSample:
        return next(self._gen)

    @property
    def content_hash(self) -> str | None:
        if not self._done:
            raise RuntimeError(f"shard {self.ref.group_id}: content_hash is known only after full iteration")
        return None if self.error else self._digest.hexdigest()

    def _skip_sample(self, reason: str, detail: str) -> None:
        self.skipped_samples += 1
        self.stats.skip(reason, detail)

    def _fail(self, reason: str, detail: str) -> None:
        self.error = reason
        detail = f"{self.ref.group_id} ({self.ref.display_url}): {detail}"
        log.warning("skipping rest of shard %s: %s", detail, reason)
        self.stats.skip(reason, detail)

    def _run(self) -> Iterator[RawSample]:
        try:
            if self.ref.kind == "folder":
                yield from self._folder_samples()
            else:
                yield from self._tar_samples()
        except transport_errors() as exc:
            self._fail("shard_unreadable", f"{type(exc).__name__} after {self.yielded} samples")
        self._done = True

    def _tar_samples(self) -> Iterator[RawSample]:
        with fsspec.open(self.ref.url, "rb", **fs_options(self.source, self.ref.url)) as raw:
            reader = HashingReader(raw, self._digest)

            def duplicate(name: str) -> None:
                self.stats.skip("duplicate_key", f"{self.ref.group_id}/{name}: repeated member")

            try:
                for key, files in iter_tar_groups(reader, duplicate):
                    yield from self._emit(key, files)
            except NotATarError as exc:
                self._fail("not_a_tar", str(exc))
                return
            except TruncatedTarError as exc:  # keep what was yielded, count the shard's error
                self._fail("truncated_tar", f"{exc} after {self.yielded} samples")
                return
            reader.drain()

    def _folder_samples(self) -> Iterator[RawSample]:
        fs, root = url_to_fs(self.ref.url, **fs_options(self.source, self.ref.url))
        groups: list[tuple[str, list[str]]] = []
        for rel, _size, _stamp in self.ref.identity["members"]:
            stem, ext = rel.rsplit(".", 1)
            if ext.lower() in IMAGE_EXTS and not (groups and _is_sidecar(rel, groups[-1][0], self.sidecar)):
                groups.append((stem, [rel]))
            else:
                groups[-1][1].append(rel)
        for key, rels in groups:
            files: dict[str, bytes] = {}
            for rel in rels:
                try:
                    data = fs.cat_file(f"{root.rstrip('/')}/{rel}")
                except transport_errors() as exc:
                    self._digest.update(f"{rel}\0unreadable\0".encode())
                    self._skip_sample("unreadable_file", f"{self.ref.group_id}/{rel}: {type(exc).__name__}")
                    break
                # Framing (path, length) keeps renames and split points from hashing alike.
                self._digest.update(f"{rel}\0{len(data)}\0".encode())
                self._digest.update(data)
                files[rel[len(key) + 1:].lower()] = data  # "jpg", "txt", or a sidecar's "depth.png"
            else:
                yield from self._emit(key, files)

    def _emit(self, key: str, files: dict[str, bytes]) -> Iterator[RawSample]:
        """Validate one grouped sample; yield it, or count why it was skipped (first reason only)."""
        where = f"{self.ref.group_id}/{key}"
        if key in self._seen:
            self._skip_sample("duplicate_key", f"{where}: key seen earlier in this shard")
            return
        self._seen.add(key)
        problem = key_problem(key)  # the cache stores keys as bounded UTF-8: skip what it cannot hold
        if problem is not None:
            self._skip_sample(problem[0], f"{where[:200]}: {problem[1]}")
            return
        ext = next((e for e in IMAGE_EXTS if e in files), None)
        if ext is None:
            self._skip_sample("no_image", f"{where}: members {sorted(files)}")
            return
        meta: Any = {}
        if "json" in files:
            try:
                meta = json.loads(files["json"].decode("utf-8-sig"))
            except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                self._skip_sample("bad_json", f"{where}: {type(exc).__name__}")
                return
            if not isinstance(meta, dict):
                self._skip_sample("bad_json", f"{where}: top level is {type(meta).__name__}, not an object")
                return
        failed = check_filters(self.source.filters, meta)
        if failed is not None:
            self._skip_sample(failed[0], f"{where}: {failed[1]}")
            return
        field_name = self.source.caption_field
        if field_name == "txt" and "txt" not in files:
            field_name = "caption"  # folders often mix name.txt and name.json {"caption": ...}
        caption: Any = meta.get(field_name)
        if field_name == "txt":
            try:
                caption = files["txt"].decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                self._skip_sample("caption_not_utf8", f"{where}: byte {exc.start}")
                return
        if not isinstance(caption, str) or not caption.strip():
            if self.missing_caption != "empty":
                self._skip_sample("no_caption", f"{where}: no .txt or {field_name!r} is empty or missing")
                return
            caption = ""
        self.yielded += 1
        side = next((files[f"{self.sidecar}.{e}"] for e in IMAGE_EXTS if f"{self.sidecar}.{e}" in files), None)
        yield RawSample(key, files[ext], ext, caption.strip(), meta, self.ref.source_index, side if self.sidecar else None)


def _is_sidecar(rel: str, stem: str, sidecar: str | None) -> bool:
    """Whether folder member `rel` is the `<stem>.<sidecar>.<image ext>` map of the image of `stem`."""
    if not sidecar or not rel.startswith(f"{stem}.{sidecar}."):
        return False
    return rel[len(stem) + len(sidecar) + 2:].lower() in IMAGE_EXTS
