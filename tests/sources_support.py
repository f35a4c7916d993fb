"""Helpers of the input-shard tests (`test_sources.py`: listing, `test_sources_reading.py`: streaming):
tiny tars and folders built in the test, and a reader that does what the cache job does."""

from __future__ import annotations

import functools
import hashlib
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from latentforge.preprocess.sources import RawSample, SkipCounter, iter_shard, list_shards
from latentforge.shared.config import SourceConfig

SECRET = "lf-test-SECRET-wJalrXUtnFEMI-K7MDENG"


@functools.cache
def jpeg(shade: int = 128) -> bytes:
    """A tiny JPEG (8x6), one per shade."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (shade, 64, 32)).save(buf, "JPEG")
    return buf.getvalue()


def sample(key: str, caption: str | None = "a photo", meta: dict[str, Any] | None = None,
           image: bytes | None = None, ext: str = "jpg") -> list[tuple[str, bytes]]:
    """The tar members of one webdataset sample: image, optional json metadata, optional .txt caption."""
    out = [(f"{key}.{ext}", image if image is not None else jpeg())]
    if meta is not None:
        out.append((f"{key}.json", json.dumps(meta).encode()))
    if caption is not None:
        out.append((f"{key}.txt", caption.encode()))
    return out


def make_source(path: Path | str, **kw: Any) -> SourceConfig:
    """A source config for `path` (a webdataset unless `type=` says otherwise)."""
    return SourceConfig(type=kw.pop("type", "webdataset"), path=str(path), **kw)


def read_all(sources: list[SourceConfig], stats: SkipCounter | None = None) -> tuple[list[RawSample], SkipCounter]:
    """What a cache job does: every shard of every source, one counter, never stopping on bad data."""
    stats = stats if stats is not None else SkipCounter()
    samples: list[RawSample] = []
    for ref in list_shards(sources):
        samples.extend(iter_shard(ref, sources[ref.source_index], stats))
    return samples, stats


def b2(data: bytes) -> str:
    """blake2b-256 hex, the content hash shards report."""
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def make_folder(root: Path) -> None:
    """An image folder with nested images, .txt/.json sidecars, one uncaptioned image and files to ignore."""
    (root / "sub/deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for i, rel in enumerate(["b.jpg", "a.png", "sub/c.JPG", "sub/deeper/d.webp", "sub/e.jpeg", "f.jpg", "g.jpg"]):
        ext = rel.rsplit(".", 1)[1].lower()
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
        buf = io.BytesIO()
        Image.new("RGB", (4 + i, 4), (i * 30, 0, 0)).save(buf, fmt)
        (root / rel).write_bytes(buf.getvalue())
        stem = rel.rsplit(".", 1)[0]
        if rel == "sub/e.jpeg":
            (root / f"{stem}.json").write_text(json.dumps({"caption": "from json", "score": 5}))
        elif rel != "g.jpg":
            (root / f"{stem}.txt").write_text(f"caption of {stem}\n")
    (root / "notes.md").write_text("not an image")
    (root / ".hidden/x.jpg").write_bytes(jpeg())
    (root / "._b.jpg").write_bytes(b"macOS resource fork")


def good_members(n: int) -> list[tuple[str, bytes]]:
    """n valid captioned samples with keys 000000000, 000000001, ..."""
    return [m for i in range(n) for m in sample(f"{i:09d}", caption=f"caption {i}")]
