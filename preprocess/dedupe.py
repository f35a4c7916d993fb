"""Duplicate sample keys across the input shards of one source: found after every rank is done, and the
later groups rewritten without them.

Why after the fact: each rank caches its shards independently, so two shards holding the same key (an
img2dataset re-run, an overlapping brace range) are only seen together once everything is committed.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from latentforge.shared.cache_format import (
    SHARDS_DIR,
    TMP_DIR,
    UPSCALE_METHODS,
    GroupManifest,
    decode_keys,
    parse_bucket_name,
)
from latentforge.shared.cache_reader import CacheReader
from latentforge.shared.faults import fault_point

from .cache_writer import CacheWriter

log = logging.getLogger("latentforge.cache")
MAX_EXAMPLES = 1000


def dedupe_across_shards(writer: CacheWriter, storage_options: Mapping[str, Any]) -> list[str]:
    """A sample key lives in at most one group per source. Run by rank 0 once every rank is done.

    Rule: the group with the smallest id (ids sort like the shard names: s0-00000 < s0-00001) keeps
    every row of the key; a later group of the same source (by recorded origin: type and path) that also
    has it is rewritten without those rows (copied, not re-encoded) and counts the sample as
    `duplicate_key`. The result depends only on the set of committed groups, never on which rank cached
    which shard first, so one process and many give the same cache. The rewritten group records the groups
    it deferred to (`stats.duplicate_of`, with their input hashes): if one of them changes or disappears,
    the next run re-caches this group in full (`duplicate_owners_unchanged`). Returns the ids rewritten."""
    reader = CacheReader(writer.storage.url, dict(storage_options))
    try:
        keys: dict[str, set[str]] = {}
        for bucket, n in sorted(reader.bucket_counts().items()):
            rows = np.arange(n)
            found = reader.read_rows(bucket, rows, fields=["key"])["key"]
            for gid, key in zip(reader.group_ids(bucket, rows), found, strict=True):
                keys.setdefault(gid, set()).add(key)
        manifests = {m.group_id: m for m in reader.groups}
    finally:
        reader.close()
    owner: dict[tuple[Any, str], str] = {}
    rewritten = []
    for gid in sorted(keys):
        manifest = manifests[gid]
        source = (manifest.origin.type, manifest.origin.path) if manifest.origin else None
        lost = {k: owner[(source, k)] for k in keys[gid] if owner.get((source, k), gid) != gid}
        for k in keys[gid]:
            owner.setdefault((source, k), gid)
        if lost:
            _drop_duplicates(writer, manifest, lost, manifests)
            rewritten.append(gid)
    return rewritten


def duplicate_owners_unchanged(manifest: GroupManifest, current: Mapping[str, str]) -> bool:
    """A group rewritten without its duplicate keys stays done only while the groups that kept those
    keys are still listed with the same input (`current`: group id -> source hash of this run)."""
    deps = manifest.stats.get("duplicate_of") or {}
    return all(current.get(gid) == source_hash for gid, source_hash in deps.items())


def _drop_duplicates(writer: CacheWriter, manifest: GroupManifest, lost: dict[str, str],
                     manifests: dict[str, GroupManifest]) -> None:
    samples = sorted({k.removesuffix("#flip") for k in lost})
    skipped = {reason: dict(entry) for reason, entry in manifest.skipped.items()}
    entry = skipped.get("duplicate_key", {"count": 0, "examples": []})
    examples = list(entry.get("examples", []))
    for key in samples[: max(0, MAX_EXAMPLES - len(examples))]:
        examples.append(f"{manifest.group_id}/{key}: also in {lost.get(key, lost.get(key + '#flip'))}, "
                        "which keeps it (smaller group id)")
    skipped["duplicate_key"] = {"count": int(entry.get("count", 0)) + len(samples), "examples": examples}
    stats = dict(manifest.stats)
    deps = dict(stats.get("duplicate_of") or {})
    deps.update({gid: manifests[gid].source_hash for gid in lost.values()})
    stats["duplicate_of"] = dict(sorted(deps.items()))
    log.info("group %s: %d samples whose keys are also in earlier groups dropped (duplicate_key)",
             manifest.group_id, len(samples))
    rewrite_group(writer, manifest, set(lost), dict(sorted(skipped.items())), stats)


def rewrite_group(writer: CacheWriter, manifest: GroupManifest, drop_keys: set[str], skipped: Mapping[str, Any],
                  stats: Mapping[str, Any]) -> GroupManifest:
    """Commit a committed group again without the rows whose key is in `drop_keys` (rows are copied,
    not recomputed), with new skip counts and stats. Atomic like any commit: readers see the old group
    or the new one. `stats["upscale"]` is recounted from the rows kept."""
    storage, spec = writer.storage, writer.spec
    src = f"{SHARDS_DIR}/{manifest.group_id}"
    copy = None
    if not storage.is_local:  # the new group is written in place: read from a copy
        copy = f"{SHARDS_DIR}/{TMP_DIR}/{manifest.group_id}.{uuid.uuid4().hex[:12]}"
        storage.copy_tree(src, copy)
        src = copy
    old = zarr.open_group(storage.zarr_store(src, read_only=True), mode="r")
    names = {code: name for name, code in UPSCALE_METHODS.items()}
    upscale: dict[str, int] = {}
    group = writer.group(manifest.group_id, manifest.source, manifest.source_hash, origin=manifest.origin)
    try:
        for bucket_rel, n in sorted(manifest.bucket_counts.items()):
            arrays = {f.name: old[f"{bucket_rel}/{f.name}"] for f in spec.fields}
            for start in range(0, n, spec.shard_rows):
                stop = min(n, start + spec.shard_rows)
                # Rows are copied as stored (keys stay encoded); the keys are decoded only to choose.
                rows = {name: np.asarray(arr[start:stop]) for name, arr in arrays.items()}
                keep = np.array([k not in drop_keys for k in decode_keys(rows["key"])], dtype=bool)
                if not keep.any():
                    continue
                rows = {name: value[keep] for name, value in rows.items()}
                for code in rows["upscale_method"].tolist() if "upscale_method" in rows else ():
                    method = names.get(int(code), str(code))
                    upscale[method] = upscale.get(method, 0) + 1
                group.add(parse_bucket_name(bucket_rel), rows)
        fault_point("dedup:rewrite")
        new_stats = dict(stats)
        if "upscale" in new_stats:
            new_stats["upscale"] = upscale
        return group.commit(skipped=skipped, stats=new_stats)
    except BaseException:
        if not group.closed:
            group.abort()
        raise
    finally:
        if copy is not None:
            storage.remove_tree(copy)
