"""The cache format: the single contract between the cache job (writer) and the trainer (reader).

Everything both sides must agree on is built AND parsed here: layout, field specs and dtypes, the key
encoding, group ids, the manifests (with the configured source of each group), the model-identity names
and what the fingerprint covers. docs/cache-format.md describes the format; a cache at CACHE::

    CACHE/cache.json                 CacheSpec: version, family, fingerprint, fields, buckets, codec
    CACHE/prompts/[commit.json]      Zarr v3 group: empty-prompt and validation-prompt embeddings
    CACHE/shards/<group_id>/         Zarr v3 group, one per INPUT shard, id `s<source index>-<shard name>`
        <H>x<W>/<field>              one sub-group per aspect bucket, one array per field; row i = sample i
        commit.json                  GroupManifest, written LAST: only then is the group visible
    CACHE/shards/.tmp/               groups being written on local disks (renamed into place)

Every array has a Zarr v3 core data type, so any Zarr v3 implementation reads every array: bfloat16 is
stored as its uint16 bits, text (the key) as zero-padded UTF-8 bytes; `FieldSpec.dtype` is the logical one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .conditioning_format import CONDITIONING_FIELD
from .secrets import redact_url

FORMAT_VERSION = 2  # 2: keys are zero-padded UTF-8 bytes (uint8), manifests record their source
CACHE_JSON = "cache.json"
COMMIT_JSON = "commit.json"
SHARDS_DIR = "shards"
PROMPTS_DIR = "prompts"
TMP_DIR = ".tmp"
RECACHE = "re-cache: `latentforge cache --config CONFIG --overwrite` (or `make cache ARGS=--overwrite`)"
# Per-row chunking pays off once a row is big enough that decoding a whole block to get one row hurts.
ROW_CHUNK_MIN_BYTES = 4096
# Bytes per stored key (256 holds any ustar name); a source key leaves room for the job's "#flip" suffix.
KEY_BYTES = 256
MAX_SOURCE_KEY_BYTES = KEY_BYTES - 16

LOGICAL_DTYPES = ("bfloat16", "float16", "float32", "int32", "int64", "uint8", "int8", "bool", "utf8")
# Stored as: always a Zarr v3 core data type (bfloat16 keeps its bits, utf8 its zero-padded bytes).
STORAGE_DTYPES = {**{d: d for d in LOGICAL_DTYPES}, "bfloat16": "uint16", "utf8": "uint8"}
CODECS = ("blosc-lz4", "blosc-zstd", "zstd", "none")
# Which path each sample took to reach its bucket size (recorded per sample, counted in the summary).
UPSCALE_METHODS = {"none": 0, "lanczos": 1, "realesrgan": 2, "realesrgan+gfpgan": 3}
_GROUP_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_SOURCE_GROUP_RE = re.compile(r"^s(\d+)-(.+)$")
_BUCKET_RE = re.compile(r"^(\d+)x(\d+)$")

class CacheFormatError(RuntimeError):
    """The cache on disk does not follow this contract (missing, corrupt, or another version)."""


class CacheMismatchError(CacheFormatError):
    """The cache was made for another model or settings than the one asking to read it."""


@dataclass(frozen=True)
class FieldSpec:
    """One cached per-sample field. `shape` is the per-sample shape, "h"/"w" standing for the latent height
    and width of the bucket (pixels / VAE downsampling), "H"/"W" for its height and width in pixels (the
    conditioning image); a `utf8` field has shape (bytes,)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    description: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in LOGICAL_DTYPES:
            raise ValueError(f"field {self.name}: dtype {self.dtype!r} is not one of {LOGICAL_DTYPES}")
        if self.dtype == "float32" and len(self.shape) > 1:
            raise ValueError(f"field {self.name}: tensors are stored as bfloat16/float16, never float32")
        if self.dtype == "utf8" and (len(self.shape) != 1 or not isinstance(self.shape[0], int)):
            raise ValueError(f"field {self.name}: a utf8 field has shape (bytes,), not {self.shape}")

    def row_shape(self, bucket: tuple[int, int], downsample: int) -> tuple[int, ...]:
        """Concrete per-sample shape for a bucket (height, width in pixels)."""
        h, w = bucket
        sizes = {"h": h // downsample, "w": w // downsample, "H": h, "W": w}
        return tuple(sizes[d] if isinstance(d, str) and d in sizes else int(d) for d in self.shape)

    @property
    def storage_dtype(self) -> str:
        """The Zarr v3 data type the field is stored as."""
        return STORAGE_DTYPES[self.dtype]

    @property
    def is_text(self) -> bool:
        """Rows are strings (stored with `encode_keys`, read back with `decode_keys`), not tensors."""
        return self.dtype == "utf8"

    def per_row(self, bucket: tuple[int, int], downsample: int) -> bool:
        """Whether rows are individual chunks (big tensors) rather than read whole (small metadata)."""
        if self.is_text:
            return False
        nbytes = int(np.prod(self.row_shape(bucket, downsample))) * np.dtype(self.storage_dtype).itemsize
        return nbytes >= ROW_CHUNK_MIN_BYTES


def key_field() -> FieldSpec:
    """The sample key: webdataset `__key__` or the path relative to the folder, plus "#flip" for mirrors."""
    return FieldSpec("key", (KEY_BYTES,), "utf8", f"sample key, UTF-8 zero-padded to {KEY_BYTES} bytes")


def common_fields() -> list[FieldSpec]:
    """Fields every family caches: the micro-conditioning record and the sample's identity."""
    return [
        FieldSpec("original_size", (2,), "int32", "(height, width) of the source image before upscaling"),
        FieldSpec("crop_top_left", (2,), "int32", "(top, left) of the crop in the resized image, pixels"),
        FieldSpec("target_size", (2,), "int32", "(height, width) of the bucket"),
        FieldSpec("content_hash", (16,), "uint8", "blake2b-128 of the encoded image bytes"),
        FieldSpec("upscale_method", (), "uint8", "how the image reached its bucket: " + ", ".join(
            f"{code}={name}" for name, code in UPSCALE_METHODS.items())),
        key_field(),
    ]


# ---- keys ---------------------------------------------------------------------------------------------
def key_problem(key: str) -> tuple[str, str] | None:
    """(skip reason, detail) when a source key cannot be cached, else None: the job skips such a sample."""
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:  # a tar name that was not UTF-8 arrives with surrogate escapes
        return "key_not_utf8", "the key is not valid UTF-8"
    if "\0" in key:  # the padding byte
        return "key_not_utf8", "the key holds a NUL character"
    if size > MAX_SOURCE_KEY_BYTES:
        return "key_too_long", f"key is {size} bytes of UTF-8, at most {MAX_SOURCE_KEY_BYTES} are cached"
    return None


def encode_keys(keys: Sequence[str], width: int = KEY_BYTES) -> np.ndarray:
    """Keys -> (N, width) uint8 rows: each key's UTF-8 bytes, zero-padded. ValueError for a key that does
    not fit or holds a NUL (the padding byte), rather than storing a key that reads back different."""
    encoded = [k.encode("utf-8") for k in keys]
    for key, raw in zip(keys, encoded, strict=True):
        if len(raw) > width or b"\0" in raw:
            raise ValueError(f"sample key {key[:60]!r}: {len(raw)} bytes of UTF-8; a cached key is at most "
                             f"{width} bytes without NUL")
    return np.array(encoded, dtype=f"S{width}").view(np.uint8).reshape(len(encoded), width)


def decode_keys(rows: np.ndarray) -> list[str]:
    """(N, width) uint8 rows -> keys (the padding stripped). ValueError unless each row is UTF-8 bytes
    followed only by zero bytes."""
    arr = np.ascontiguousarray(rows, dtype=np.uint8)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"key rows must be (N, bytes) uint8, got shape {arr.shape}")
    raw = arr.view(f"S{arr.shape[1]}")[:, 0]  # numpy drops the trailing zero bytes
    if any(b"\0" in b for b in raw):
        raise ValueError("a key row has bytes after its zero padding")
    return [b.decode("utf-8") for b in raw]


# ---- group ids and where a group came from ---------------------------------------------------------------
def check_group_id(group_id: str) -> str:
    """Group ids become folder names on every store, so keep them to a portable alphabet."""
    if not _GROUP_ID_RE.match(group_id):
        raise ValueError(f"group id {group_id!r} must match {_GROUP_ID_RE.pattern}")
    return group_id


def group_id(source_index: int, name: str) -> str:
    """The id of the group of input shard `name` (a tar's relative name, or `virtual_shard_name(n)`) of
    `data.sources[source_index]`: `s<index>-<name>`. Ids sort by source, then shard name."""
    return check_group_id(f"s{int(source_index)}-{name}")


def virtual_shard_name(n: int) -> str:
    """Name of the n-th virtual shard of a folder source (its images in sorted order, `shard_size` each)."""
    return f"v{n:06d}"


def parse_group_id(gid: str) -> tuple[int, str]:
    """`s<index>-<name>` -> (index, name), the index as cached: a group's source is its `origin` (`find_source`)."""
    m = _SOURCE_GROUP_RE.match(gid)
    if not m:
        raise ValueError(f"group id {gid!r} is not s<source index>-<shard name>")
    return int(m.group(1)), m.group(2)


@dataclass(frozen=True)
class SourceOrigin:
    """The configured source (`data.sources[index]`) a group's shard was listed from. `type` and `path` (as
    written in the config, credentials redacted) identify it when a config lists its sources in another order."""

    index: int
    type: str
    path: str

    @classmethod
    def of(cls, index: int, type: str, path: str) -> SourceOrigin:
        """The origin of a source as configured (its path is stored redacted)."""
        return cls(int(index), type, redact_url(path))


def find_source(gid: str, origin: SourceOrigin | None, configured: Sequence[tuple[str, str]]) -> int | None:
    """Index into `configured` ((type, path) of each `data.sources` entry) of the source group `gid` came
    from, by type and path, not position; None if it records no origin (a tool wrote it). A source that is
    gone is a one-line `CacheMismatchError`: its rows with another source's `repeats` would be wrong."""
    if origin is None:
        return None
    hits = [i for i, (kind, path) in enumerate(configured) if kind == origin.type and redact_url(path) == origin.path]
    if not hits:
        raise CacheMismatchError(f"cache group {gid} came from source {origin.path!r} ({origin.type}), which is "
                                 "not in data.sources: add it back, or re-cache without it into a new cache.path")
    return origin.index if origin.index in hits else hits[0]  # the same source listed twice: keep its slot


# ---- cache.json and commit.json ------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheSpec:
    """What `cache.json` holds: everything a reader needs before opening any group."""

    family: str
    fingerprint: str
    fields: tuple[FieldSpec, ...]
    buckets: tuple[tuple[int, int], ...]
    latent_channels: int
    vae_downsample: int
    scaling_factor: float
    shift_factor: float | None = None
    latent_mode: str = "mean"
    store_dtype: str = "bfloat16"
    codec: str = "blosc-lz4"
    shard_rows: int = 256
    fingerprint_inputs: Mapping[str, Any] = field(default_factory=dict)
    model_location: Mapping[str, Any] = field(default_factory=dict)  # a hint, not fingerprinted (model_check.py)
    conditioning: str | None = None  # `cache.conditioning.kind` when the cache holds control images
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate field names in {names}")
        if self.codec not in CODECS:
            raise ValueError(f"codec {self.codec!r} is not one of {CODECS}")
        if self.latent_mode not in ("mean", "dist"):
            raise ValueError(f"latent_mode {self.latent_mode!r} must be mean or dist")
        for h, w in self.buckets:
            if h % self.vae_downsample or w % self.vae_downsample:
                raise ValueError(f"bucket {h}x{w} is not divisible by the VAE downsampling {self.vae_downsample}")
        if (self.conditioning is None) != (CONDITIONING_FIELD not in names):
            raise ValueError(f"conditioning {self.conditioning!r} and the {CONDITIONING_FIELD!r} field go together")

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"field {name!r} is not in this cache (fields: {', '.join(f.name for f in self.fields)})")

    def to_json(self) -> str:
        doc = asdict(self)
        doc["fields"] = [asdict(f) for f in self.fields]
        doc["buckets"] = [bucket_name(b) for b in self.buckets]
        if doc["conditioning"] is None:  # a cache without control images reads as before, older readers too
            del doc["conditioning"]
        return json.dumps(doc, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = CACHE_JSON) -> CacheSpec:
        """Parse `cache.json`; a corrupt file or another format version is one `CacheFormatError` line."""
        version = format_version_of(text)
        if version is None:
            raise CacheFormatError(f"{where}: not valid JSON with a format_version; the cache is corrupt, {RECACHE}")
        if version > FORMAT_VERSION:
            raise CacheFormatError(f"{where}: cache format version {version} is newer than this latentforge reads "
                                   f"(version {FORMAT_VERSION}); upgrade latentforge or re-cache with this version")
        if version < FORMAT_VERSION:
            raise CacheFormatError(f"{where}: cache format version {version} is older than this latentforge reads "
                                   f"(version {FORMAT_VERSION}); {RECACHE}")
        doc = json.loads(text)
        try:
            doc["fields"] = tuple(FieldSpec(f["name"], tuple(f["shape"]), f["dtype"], f.get("description", ""))
                                  for f in doc["fields"])
            doc["buckets"] = tuple(parse_bucket_name(b) for b in doc["buckets"])
            return cls(**doc)
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheFormatError(f"{where}: does not match format version {version} ({exc})") from None


def format_version_of(text: str) -> int | None:
    """`format_version` of a cache.json/commit.json text, None if unreadable (an older file may not parse)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return None
    version = doc.get("format_version") if isinstance(doc, dict) else None
    return version if isinstance(version, int) else None


@dataclass(frozen=True)
class GroupManifest:
    """What `commit.json` holds for one committed group (one input shard)."""

    group_id: str
    fingerprint: str
    source: Mapping[str, Any]  # identity of the input shard: url/path, kind
    source_hash: str  # content hash of the input shard, so a changed input is re-cached
    bucket_counts: Mapping[str, int]
    files: Mapping[str, int]  # relative path -> size in bytes, to detect deletion/truncation
    checksums: Mapping[str, int] = field(default_factory=dict)  # relative path -> crc32 (local disks)
    skipped: Mapping[str, Any] = field(default_factory=dict)  # reason -> {"count": n, "examples": [key: detail]}
    stats: Mapping[str, Any] = field(default_factory=dict)  # upscale counts, seconds per phase, input content hash
    origin: SourceOrigin | None = None  # the configured source; None when written by a tool, not the cache job
    format_version: int = FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        return sum(self.bucket_counts.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> GroupManifest:
        """Parse `commit.json`: an older version parses (readers ignore it, the job re-caches it), a newer fails."""
        version = format_version_of(text)
        if version is not None and version > FORMAT_VERSION:
            raise CacheFormatError(f"{where}: group format version {version} is newer than {FORMAT_VERSION}; "
                                   "upgrade latentforge")
        try:
            doc = json.loads(text)
            if doc.get("origin") is not None:
                doc["origin"] = SourceOrigin(**doc["origin"])
            return cls(**doc)
        except (json.JSONDecodeError, TypeError, AttributeError) as exc:
            raise CacheFormatError(f"{where}: corrupt commit marker ({exc}); delete the group and re-run the cache job") from None


def bucket_name(bucket: tuple[int, int]) -> str:
    """`(height, width)` -> `"HxW"`, the sub-group name of a bucket (and the trainer's JSON key for it)."""
    return f"{int(bucket[0])}x{int(bucket[1])}"


def parse_bucket_name(name: str) -> tuple[int, int]:
    """`"HxW"` -> `(height, width)`; ValueError for anything else."""
    m = _BUCKET_RE.match(name)
    if not m:
        raise ValueError(f"bucket name {name!r} is not HEIGHTxWIDTH")
    return int(m.group(1)), int(m.group(2))


def describe_mismatch(what: str, cache_side: Any, model_side: Any, cache_path: str) -> CacheMismatchError:
    """One line naming both sides, e.g. 'prompt_embeds width: cache has 2048, model expects 768'."""
    return CacheMismatchError(f"cache {cache_path} does not fit the model: {what}: cache has {cache_side}, model "
                              f"expects {model_side}; re-run the cache job with this model or point cache.path at a "
                              "matching cache")
