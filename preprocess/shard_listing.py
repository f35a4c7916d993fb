"""Listing the input shards of the configured sources: tars (local, http(s), s3) and image folders.

`list_shards` turns the config's sources into a deterministic list of `ShardRef`: a stable group id per
shard (`cache_format.group_id`) plus a cheap stat-only identity, so deciding "already cached?" on a resume
never reads content. Streaming a shard's samples is `sources.py`. Credentials are never taken from the
config: fsspec, s3fs and botocore read them from the environment or a profile, and nothing here logs or
stores them.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import braceexpand
from fsspec.core import strip_protocol, url_to_fs

from latentforge.shared.cache_format import group_id, virtual_shard_name
from latentforge.shared.config import SourceConfig
from latentforge.shared.secrets import redact_url

from .source_checks import (
    IMAGE_EXTS,
    identity_hash,
    sanitise_name,
    stat_facts,
    transport_errors,
    validate_filters,
)

log = logging.getLogger(__name__)
_GLOB_CHARS = "*?["
_HTTP = ("http://", "https://")
_HEAD_LIMIT = 64  # brace-range members per folder stat-ed one by one; more -> one listing


@dataclass(frozen=True)
class ShardRef:
    """One input shard: a tar, or a virtual shard of `shard_size` images from a folder source.

    `identity` holds only facts a stat gives (url, size, mtime/ETag; for folders every member's relative
    path, size and mtime), so deciding "already cached?" costs no content read. `identity_hash` is the
    sha256 of its canonical JSON. `url` is the real location (used to open it); show `display_url`.
    """

    group_id: str
    source_index: int
    url: str = field(repr=False)
    kind: Literal["tar", "folder"]
    identity: dict[str, Any] = field(compare=False, repr=False)
    identity_hash: str
    repeats: int = 1

    @property
    def display_url(self) -> str:
        return redact_url(self.url)



def fs_options(source: SourceConfig, url: str) -> dict[str, Any]:
    """The fsspec options to open `url` of `source` with (its storage_options, plus streaming for http)."""
    opts = dict(source.storage_options)
    if url.startswith(_HTTP):
        # block_size=0 makes fsspec stream one GET instead of issuing Range requests (which simple
        # servers do not support and which buy nothing for a front-to-back tar read).
        opts.setdefault("block_size", 0)
    return opts


def _endpoint(source: SourceConfig) -> str | None:
    # Two endpoints (AWS vs R2) can hold the same bucket/key: the endpoint is part of "which file".
    opts = source.storage_options
    return opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")


def _fail_listing(i: int, shown: str, exc: BaseException) -> ValueError:
    # Class name only: botocore messages can echo request details, never worth the risk in a log.
    return ValueError(
        f"data.sources[{i}].path {shown!r}: cannot list it ({type(exc).__name__}); check the URL, "
        "storage_options.endpoint_url and the credentials in the environment (AWS_PROFILE or "
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
    )


def list_shards(sources: list[SourceConfig], sidecar: str | None = None) -> list[ShardRef]:
    """Every input shard of every source, in a deterministic order (source order, then shard order).

    `sidecar` (`cache.conditioning.sidecar` when the kind is sidecar): in folders, `KEY.<sidecar>.png`
    is the conditioning map of `KEY.<ext>`, a member of its shard (so an edited map re-caches it), not an
    image of its own.

    Raises ValueError (one line naming the source index, the path and the fix) for a source that matches
    nothing or has an invalid filter. Members of a brace range that do not exist are still listed (with
    `identity["missing"] = True`) and reported as `shard_unreadable` when read, so one missing shard
    neither crashes the listing nor silently shifts the meaning of the range.
    """
    refs: list[ShardRef] = []
    for i, source in enumerate(sources):
        validate_filters(i, source.filters)
        found = _list_folder(i, source, sidecar) if source.type in ("folder", "generate") else _list_tars(i, source)
        log.info("source %d: %d shards from %s", i, len(found), redact_url(source.path))
        refs.extend(found)
    return refs


def _stat_many(fs: Any, urls: list[str]) -> dict[str, dict[str, Any] | None]:
    """url -> fsspec info, or None where it does not exist (or is a folder)."""

    def head(url: str) -> dict[str, Any] | None:
        try:
            info = fs.info(url)
        except FileNotFoundError:
            return None
        return info if info.get("type") != "directory" else None

    by_parent: dict[str, list[str]] = {}
    for url in urls:
        by_parent.setdefault(strip_protocol(url).rpartition("/")[0], []).append(url)
    out: dict[str, dict[str, Any] | None] = {}
    singles: list[str] = []
    for parent, members in by_parent.items():
        if len(members) <= _HEAD_LIMIT or urls[0].startswith(_HTTP):  # http has no directory listing
            singles += members
            continue
        # A 100k-member brace range on S3: ~100 LIST calls instead of 100k HEADs.
        try:
            listing = {e["name"].rstrip("/"): e for e in fs.ls(parent, detail=True)}
        except FileNotFoundError:
            listing = {}
        for url in members:
            info = listing.get(strip_protocol(url))
            out[url] = info if info is not None and info.get("type") != "directory" else None
    if singles:
        with ThreadPoolExecutor(max_workers=min(32, len(singles))) as pool:
            out.update(zip(singles, pool.map(head, singles), strict=True))
    return {url: out[url] for url in urls}


def _list_tars(i: int, source: SourceConfig) -> list[ShardRef]:
    shown = redact_url(source.path)
    patterns = list(braceexpand.braceexpand(source.path))
    opts = fs_options(source, patterns[0])
    try:
        fs, _ = url_to_fs(patterns[0], **opts)
        fs.invalidate_cache()  # a long-lived process must see shards added since its last listing
        found: dict[str, dict[str, Any] | None] = {}
        plain: list[str] = []
        for pattern in patterns:
            if any(c in pattern for c in _GLOB_CHARS) and not pattern.startswith(_HTTP):
                hits = fs.glob(pattern, detail=True)
                for path in sorted(hits):
                    if hits[path].get("type") != "directory":
                        found.setdefault(_as_url(fs, path), hits[path])
            else:
                plain.append(pattern if "://" in pattern else _as_url(fs, strip_protocol(pattern)))
        if plain:
            for url, info in _stat_many(fs, plain).items():
                found.setdefault(url, info)
    except transport_errors() as exc:
        raise _fail_listing(i, shown, exc) from None
    if not any(info is not None for info in found.values()):
        if len(patterns) == 1 and "://" not in source.path and fs.isdir(source.path):
            raise ValueError(
                f"data.sources[{i}].path {shown!r} is a directory; point it at the shards, "
                f"e.g. '{shown.rstrip('/')}/*.tar' (or use type: folder for loose images)"
            )
        raise ValueError(
            f"data.sources[{i}].path {shown!r} matched no tar shards; fix the path or use a glob "
            "('dir/*.tar') or a brace range ('dir/{00000..00099}.tar') that names existing files"
        )
    missing = [u for u, info in found.items() if info is None]
    if missing:
        log.warning("source %d: %d of %d listed shards do not exist (first: %s); they will be "
                    "reported as shard_unreadable", i, len(missing), len(found), redact_url(missing[0]))
    base = _static_dir(source.path)
    names = {url: sanitise_name(_rel_name(url, base)) for url in found}
    clashes = {n for n, k in Counter(names.values()).items() if k > 1}
    refs = []
    for url, info in found.items():
        name = names[url]
        if name in clashes:  # e.g. a/b.tar and a_b.tar: disambiguate by the full url
            name = f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"
        identity: dict[str, Any] = {"url": redact_url(url), **(stat_facts(info) if info else {"missing": True})}
        if _endpoint(source):
            identity["endpoint"] = redact_url(_endpoint(source))
        refs.append(ShardRef(group_id(i, name), i, url, "tar", identity, identity_hash(identity), source.repeats))
    return refs


def _as_url(fs: Any, path: str) -> str:
    # Local shards stay plain absolute paths; remote ones get their protocol back (s3://bucket/key).
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else fs.unstrip_protocol(path)


def _static_dir(path: str) -> str:
    """The folder part of a pattern before any brace or glob: group ids are names relative to it, so
    they do not change when shards are added to or removed from the match set."""
    cut = min((path.index(c) for c in "{" + _GLOB_CHARS if c in path), default=len(path))
    prefix = path[:cut]
    return prefix[: prefix.rfind("/") + 1] if "/" in prefix else ""


def _rel_name(url: str, base: str) -> str:
    if url.startswith(_HTTP):
        url = url.split("?", 1)[0].split("#", 1)[0]
    path = strip_protocol(url)
    root = strip_protocol(base or ".").rstrip("/") + "/"
    return path[len(root):] if path.startswith(root) else path.rsplit("/", 1)[-1]


def _list_folder(i: int, source: SourceConfig, sidecar: str | None = None) -> list[ShardRef]:
    shown = redact_url(source.path)
    try:
        fs, root = url_to_fs(source.path, **fs_options(source, source.path))
        fs.invalidate_cache()
        if not fs.isdir(root):
            raise ValueError(
                f"data.sources[{i}].path {shown!r} is not a directory; type: folder needs a folder of "
                "images with .txt/.json sidecars (use type: webdataset for tar shards)"
            )
        entries = fs.find(root, detail=True)
    except transport_errors() as exc:
        raise _fail_listing(i, shown, exc) from None
    root = root.rstrip("/")
    files: dict[str, dict[str, Any]] = {}
    for path, info in entries.items():
        rel = path[len(root) + 1:] if path.startswith(root + "/") else path
        # Hidden files and folders (.git, macOS ._x.jpg resource forks) are never samples.
        if info.get("type") != "directory" and not any(p.startswith(".") for p in rel.split("/")):
            files[rel] = info
    images = sorted(r for r in files if "." in r.rsplit("/", 1)[-1] and r.rsplit(".", 1)[1].lower() in IMAGE_EXTS)
    maps: dict[str, list[str]] = {}  # image stem -> its sidecar maps
    for r in images:
        stem = _sidecar_stem(r, sidecar) if sidecar else None
        if stem is not None:
            maps.setdefault(stem, []).append(r)
    taken = {m for found in maps.values() for m in found}
    images = [r for r in images if r not in taken]
    if not images:
        raise ValueError(
            f"data.sources[{i}].path {shown!r} holds no images ({', '.join(IMAGE_EXTS)}); fix the path, "
            "or use type: webdataset for tar shards"
        )
    root_url = _as_url(fs, root)
    refs = []
    for n, start in enumerate(range(0, len(images), source.shard_size)):
        members: list[list[Any]] = []
        for rel in images[start : start + source.shard_size]:
            stem = rel.rsplit(".", 1)[0]
            for name in (rel, *maps.get(stem, ()), f"{stem}.txt", f"{stem}.json"):
                if name in files:  # sidecars count: an edited caption must re-cache the shard
                    facts = stat_facts(files[name])
                    stamp = next((facts[k] for k in ("mtime", "ETag", "etag", "LastModified") if k in facts), None)
                    members.append([name, facts.get("size"), stamp])
        identity: dict[str, Any] = {"root": redact_url(root_url), "members": members}
        if _endpoint(source):
            identity["endpoint"] = redact_url(_endpoint(source))
        refs.append(ShardRef(group_id(i, virtual_shard_name(n)), i, root_url, "folder", identity,
                             identity_hash(identity), source.repeats))
    return refs


def _sidecar_stem(rel: str, sidecar: str) -> str | None:
    """`KEY` when folder file `rel` is `KEY.<sidecar>.<image ext>`, else None."""
    parts = rel.rsplit(".", 2)
    if len(parts) == 3 and parts[1] == sidecar and parts[2].lower() in IMAGE_EXTS and "/" not in parts[1]:
        return parts[0]
    return None
