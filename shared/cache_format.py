"""The cache format: the single contract between the cache job (writer) and the trainer (reader).

Layout of a cache at CACHE (a local folder or an fsspec URL)::

    CACHE/cache.json                    CacheSpec: version, family, fingerprint, fields, buckets, codec
    CACHE/prompts/                      Zarr v3 group: empty-prompt and validation-prompt embeddings
    CACHE/prompts/commit.json           written last: the prompts are complete
    CACHE/shards/<group_id>/            Zarr v3 group, one per INPUT shard (tar or virtual folder shard)
        zarr.json                       group attrs: source identity, source hash, fingerprint
        <H>x<W>/                        one sub-group per aspect bucket (pixel height x width)
            latent_mean, [latent_std], prompt_embeds, [pooled_prompt_embeds], [prompt_mask],
            original_size, crop_top_left, target_size, content_hash, key, [extra fields]
        commit.json                     GroupManifest, written LAST: the group is complete
    CACHE/shards/.tmp/                  groups being written on local disks (renamed into place)

Conventions:
- Sizes are int32 pairs in (height, width) order; `crop_top_left` is (top, left) in pixels of the
  resized image, `original_size` is the image size BEFORE any upscaling, `target_size` the bucket.
- Row i of every array in a bucket group is the same sample.
- Tensors are bfloat16 or float16 on disk, never float32. Zarr has no bfloat16 dtype, so bfloat16 is
  stored as its raw uint16 bits; `FieldSpec.dtype` holds the logical dtype and readers view the bits back.
- Big per-sample tensors use one Zarr chunk per row inside Zarr shard files of `shard_rows` rows (a few
  files per bucket, not one per sample; single rows are addressable without decoding neighbours). Small
  per-sample fields use one chunk per shard file and are read whole.
- Visibility: a group exists for readers only when `commit.json` is present. On local disks the group is
  also written under `shards/.tmp/` and renamed into place, so a crash never leaves a half group at its
  final name; on object stores (no atomic rename) the marker written last is the commit.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

FORMAT_VERSION = 1
CACHE_JSON = "cache.json"
COMMIT_JSON = "commit.json"
SHARDS_DIR = "shards"
PROMPTS_DIR = "prompts"
TMP_DIR = ".tmp"
# Per-row chunking pays off once a row is big enough that decoding a whole block to get one row hurts.
ROW_CHUNK_MIN_BYTES = 4096

LOGICAL_DTYPES = ("bfloat16", "float16", "float32", "int32", "int64", "uint8", "int8", "bool", "str")
# What each logical dtype is stored as in Zarr (bfloat16 has no Zarr dtype: keep its bits).
STORAGE_DTYPES = {
    "bfloat16": "uint16",
    "float16": "float16",
    "float32": "float32",
    "int32": "int32",
    "int64": "int64",
    "uint8": "uint8",
    "int8": "int8",
    "bool": "bool",
    "str": "str",
}
CODECS = ("blosc-lz4", "blosc-zstd", "zstd", "none")
# Which path each sample took to reach its bucket size (recorded per sample, counted in the summary).
UPSCALE_METHODS = {"none": 0, "lanczos": 1, "realesrgan": 2, "realesrgan+gfpgan": 3}
_GROUP_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_BUCKET_RE = re.compile(r"^(\d+)x(\d+)$")


class CacheFormatError(RuntimeError):
    """The cache on disk does not follow this contract (missing, corrupt, or a newer version)."""


class CacheMismatchError(CacheFormatError):
    """The cache was made for another model or settings than the one asking to read it."""


@dataclass(frozen=True)
class FieldSpec:
    """One cached per-sample field.

    `shape` is the per-sample shape; the strings "h" and "w" stand for the latent height and width of
    the bucket (pixel size divided by the VAE's downsampling factor).
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    description: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in LOGICAL_DTYPES:
            raise ValueError(f"field {self.name}: dtype {self.dtype!r} is not one of {LOGICAL_DTYPES}")
        if self.dtype == "float32" and len(self.shape) > 1:
            raise ValueError(f"field {self.name}: tensors are stored as bfloat16/float16, never float32")

    def row_shape(self, bucket: tuple[int, int], downsample: int) -> tuple[int, ...]:
        """Concrete per-sample shape for a bucket (height, width in pixels)."""
        h, w = bucket
        out = []
        for dim in self.shape:
            if dim == "h":
                out.append(h // downsample)
            elif dim == "w":
                out.append(w // downsample)
            else:
                out.append(int(dim))
        return tuple(out)

    @property
    def storage_dtype(self) -> str:
        return STORAGE_DTYPES[self.dtype]

    def per_row(self, bucket: tuple[int, int], downsample: int) -> bool:
        """Whether rows are individual chunks (big tensors) rather than read whole (small metadata)."""
        if self.dtype == "str":
            return False
        nbytes = int(np.prod(self.row_shape(bucket, downsample))) * np.dtype(self.storage_dtype).itemsize
        return nbytes >= ROW_CHUNK_MIN_BYTES


def common_fields() -> list[FieldSpec]:
    """Fields every family caches: the micro-conditioning record and the sample's identity."""
    return [
        FieldSpec("original_size", (2,), "int32", "(height, width) of the source image before upscaling"),
        FieldSpec("crop_top_left", (2,), "int32", "(top, left) of the crop in the resized image, pixels"),
        FieldSpec("target_size", (2,), "int32", "(height, width) of the bucket"),
        FieldSpec("content_hash", (16,), "uint8", "blake2b-128 of the encoded image bytes"),
        FieldSpec("upscale_method", (), "uint8", "how the image reached its bucket: " + ", ".join(
            f"{code}={name}" for name, code in UPSCALE_METHODS.items())),
        FieldSpec("key", (), "str", "sample key (webdataset __key__ or path relative to the folder)"),
    ]


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

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"field {name!r} is not in this cache (fields: {', '.join(f.name for f in self.fields)})")

    def to_json(self) -> str:
        doc = asdict(self)
        doc["fields"] = [asdict(f) for f in self.fields]
        doc["buckets"] = [bucket_name(b) for b in self.buckets]
        return json.dumps(doc, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = CACHE_JSON) -> CacheSpec:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CacheFormatError(f"{where}: not valid JSON ({exc.msg}); the cache is corrupt, re-run the cache job") from None
        version = doc.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CacheFormatError(
                f"{where}: cache format version {version} is newer than this latentforge reads "
                f"(version {FORMAT_VERSION}); upgrade latentforge or re-cache with this version"
            )
        try:
            doc["fields"] = tuple(
                FieldSpec(f["name"], tuple(f["shape"]), f["dtype"], f.get("description", "")) for f in doc["fields"]
            )
            doc["buckets"] = tuple(parse_bucket_name(b) for b in doc["buckets"])
            return cls(**doc)
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheFormatError(f"{where}: does not match format version {version} ({exc})") from None


@dataclass(frozen=True)
class GroupManifest:
    """What `commit.json` holds for one committed group (one input shard)."""

    group_id: str
    fingerprint: str
    source: Mapping[str, Any]  # identity of the input shard: url/path, size, mtime or etag
    source_hash: str  # content hash of the input shard, so a changed input is re-cached
    bucket_counts: Mapping[str, int]
    files: Mapping[str, int]  # relative path -> size in bytes, to detect deletion/truncation
    checksums: Mapping[str, int] = field(default_factory=dict)  # relative path -> crc32 (local disks)
    skipped: Mapping[str, Any] = field(default_factory=dict)  # reason -> {"count": n, "examples": [key: detail]}
    stats: Mapping[str, Any] = field(default_factory=dict)  # upscale counts, seconds per phase, input content hash
    format_version: int = FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        return sum(self.bucket_counts.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> GroupManifest:
        try:
            doc = json.loads(text)
            if doc.get("format_version", 0) > FORMAT_VERSION:
                raise CacheFormatError(
                    f"{where}: group format version {doc['format_version']} is newer than {FORMAT_VERSION}; "
                    "upgrade latentforge"
                )
            return cls(**doc)
        except (json.JSONDecodeError, TypeError) as exc:
            raise CacheFormatError(f"{where}: corrupt commit marker ({exc}); delete the group and re-run the cache job") from None


def bucket_name(bucket: tuple[int, int]) -> str:
    """`(height, width)` -> `"HxW"`, the sub-group name of a bucket."""
    return f"{int(bucket[0])}x{int(bucket[1])}"


def parse_bucket_name(name: str) -> tuple[int, int]:
    m = _BUCKET_RE.match(name)
    if not m:
        raise ValueError(f"bucket name {name!r} is not HEIGHTxWIDTH")
    return int(m.group(1)), int(m.group(2))


def check_group_id(group_id: str) -> str:
    """Group ids become folder names on every store, so keep them to a portable alphabet."""
    if not _GROUP_ID_RE.match(group_id):
        raise ValueError(f"group id {group_id!r} must match {_GROUP_ID_RE.pattern}")
    return group_id


def compute_fingerprint(inputs: Mapping[str, Any]) -> str:
    """Stable hash of everything that changes what would be cached (model identity, dtypes, buckets,...).

    Keys are sorted and values serialised canonically, so dict order never changes the fingerprint.
    """
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def describe_mismatch(what: str, cache_side: Any, model_side: Any, cache_path: str) -> CacheMismatchError:
    """One line naming both sides, e.g. 'prompt_embeds width: cache has 2048, model expects 768'."""
    return CacheMismatchError(
        f"cache {cache_path} does not fit the model: {what}: cache has {cache_side}, model expects {model_side}; "
        "re-run the cache job with this model or point cache.path at a matching cache"
    )
