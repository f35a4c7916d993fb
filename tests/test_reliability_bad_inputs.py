"""Guarantee 3: bad inputs are skipped with a named reason and the job finishes; summary.json counts
every reason exactly; odd-but-valid images (CMYK, 16-bit, grayscale, palette + transparency, EXIF
rotation, 1:20 aspect) are cached; a key in two shards of a source is cached once, whatever the order
the shards are processed in. All inputs are generated here. See docs/reliability.md."""

from __future__ import annotations

import io
import json
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reliability_support import DEMO, assert_same_cache, snapshot, write_tar

from latentforge.preprocess import job as job_module
from latentforge.preprocess.images import content_hash
from latentforge.preprocess.job import run_cache
from latentforge.shared.cache_reader import CacheReader
from latentforge.shared.config import load_config


# ----------------------------------------------------------------------------------------- inputs
def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth, photo-like content (a gradient plus blobs), so JPEG behaves as on real images."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    img = np.stack([(xx / max(w, 1)) * 200, (yy / max(h, 1)) * 200, np.full((h, w), 90.0)], -1)
    for _ in range(3):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 40)
        img[((yy - cy) ** 2 + (xx - cx) ** 2) < r * r] += rng.uniform(-60, 60, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(h: int = 96, w: int = 128, seed: int = 0) -> bytes:
    return _encode(Image.fromarray(_photo(h, w, seed)), "JPEG", quality=90)


def cmyk_jpeg() -> bytes:
    return _encode(Image.fromarray(_photo(96, 128, 1)).convert("CMYK"), "JPEG", quality=90)


def png16() -> bytes:
    a = (np.linspace(0, 65535, 96 * 112).reshape(96, 112)).astype(np.uint16)
    img = Image.fromarray(a)
    assert img.mode.startswith("I;16")
    return _encode(img, "PNG")


def gray_jpeg() -> bytes:
    return _encode(Image.fromarray(_photo(100, 80, 2)).convert("L"), "JPEG", quality=90)


def palette_png() -> bytes:
    img = Image.fromarray(_photo(120, 80, 3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _encode(img, "PNG", transparency=0)


def exif_rotated_jpeg() -> bytes:
    """Stored 128 wide x 80 high, EXIF orientation 6: upright it is 80 wide x 128 high."""
    img = Image.fromarray(_photo(80, 128, 4))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(img, "JPEG", quality=90, exif=exif.tobytes())


def tall_png() -> bytes:
    """1:20: 64 wide (= buckets.min_resolution) x 1280 high."""
    return _encode(Image.fromarray(_photo(1280, 64, 5)), "PNG")


def one_pixel_png() -> bytes:
    return _encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG")


def bomb_png(side: int = 14_000) -> bytes:
    """A 24 KB PNG that decodes to 196 megapixels (1-bit, all black): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = (b"\x00" + b"\x00" * ((side + 7) // 8)) * side
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def sample(key: str, image: bytes | None, ext: str = "jpg", caption: bytes | None = b"a photo",
           meta: bytes | None = None) -> list[tuple[str, bytes]]:
    out = [(f"{key}.{ext}", image)] if image is not None else []
    if meta is not None:
        out.append((f"{key}.json", meta))
    if caption is not None:
        out.append((f"{key}.txt", caption))
    return out


SHARED_KEY = "shared/0001"


def build_inputs(root: Path) -> dict:
    """Tar shards and a folder with every kind of bad input; returns what the cache must hold."""
    wds = root / "wds"
    write_tar(wds / "a-valid.tar", [
        *sample("cmyk", cmyk_jpeg()), *sample("png16", png16(), "png"), *sample("gray", gray_jpeg()),
        *sample("palette", palette_png(), "png"), *sample("exif", exif_rotated_jpeg()),
        *sample("tall", tall_png(), "png", caption=b"a tall tower"),
    ])
    good = jpeg()
    write_tar(wds / "b-bad.tar", [
        *sample("trunc", good[: len(good) // 2]),                      # truncated JPEG
        *sample("empty", b""),                                          # 0-byte file
        *sample("textimg", b"this is not a picture\n"),                # text with an image extension
        *sample("one", one_pixel_png(), "png"),                         # 1x1 < buckets.min_resolution
        *sample("bomb", bomb_png(), "png"),                             # decompression bomb
        *sample("rep", jpeg(seed=7)),                                   # kept: first of a repeated key
        *sample("nocap", jpeg(seed=8), caption=None, meta=b'{"url": "x"}'),  # no caption anywhere
        *sample("badutf8", jpeg(seed=9), caption=b"caf\xe9 \xff"),     # caption not UTF-8
        *sample("badjson", jpeg(seed=10), meta=b"{not json"),           # json that is not json
        *sample("rep", jpeg(seed=11)),                                  # same key again in this shard
        ("noimg.txt", b"a caption without an image"),                  # no image member
    ])
    truncated = write_tar(wds / "c-truncated.tar", [*sample("t0", jpeg(seed=12)), *sample("t1", jpeg(seed=13)),
                                                    *sample("t2", jpeg(seed=14))])
    with tarfile.open(truncated) as tar:
        cut = tar.getmember("t2.jpg").offset_data + 300  # inside t2's image: a tar with a truncated member
    truncated.write_bytes(truncated.read_bytes()[:cut])
    (wds / "d-notatar.tar").write_bytes(b"<html>404 not found</html>\n" * 40)
    shared_a, shared_b = jpeg(seed=20), jpeg(seed=21)
    write_tar(wds / "e-dup.tar", [*sample(SHARED_KEY, shared_a), *sample("e-own", jpeg(seed=22))])
    write_tar(wds / "f-dup.tar", [*sample("f-own", jpeg(seed=23)), *sample(SHARED_KEY, shared_b)])

    folder = root / "folder"
    folder.mkdir(parents=True)
    files = {"ok.jpg": jpeg(seed=30), "ok.txt": b"a folder photo", "empty.jpg": b"", "empty.txt": b"x",
             "notimage.png": b"plain text", "notimage.txt": b"x", "nocap.jpg": jpeg(seed=31),
             "badjson.jpg": jpeg(seed=32), "badjson.json": b"[1, 2", "badjson.txt": b"x",
             "twin.jpg": jpeg(seed=33), "twin.png": _encode(Image.fromarray(_photo(96, 96, 34)), "PNG"),
             "twin.txt": b"two files, one key"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {
        "keys": {"cmyk", "png16", "gray", "palette", "exif", "tall", "rep", "t0", "t1", SHARED_KEY, "e-own", "f-own",
                 "ok", "twin"},
        "skips": {"truncated": 1, "empty_file": 2, "not_an_image": 2, "too_small": 1, "too_many_pixels": 1,
                  "no_caption": 2, "caption_not_utf8": 1, "bad_json": 2, "no_image": 1,
                  # in b-bad.tar; shared/0001 in f-dup.tar (e-dup.tar keeps it); twin.png (twin.jpg's shard keeps it)
                  "duplicate_key": 3,
                  "truncated_tar": 1, "not_a_tar": 1},
        # every sample read: 6 + 11 + 2 (before the cut) + 4 in the tars, 7 images in the folder
        "seen": 6 + 11 + 2 + 4 + 7,
        "shared_hash": content_hash(shared_a),
        "twin_hash": content_hash(files["twin.jpg"]),
    }


def config_args(model: Path, root: Path, cache: Path) -> list[str]:
    sources = (f"data.sources=[{{type: webdataset, path: '{root}/wds/*.tar'}}, "
               f"{{type: folder, path: '{root}/folder', shard_size: 1}}]")
    return [f"model.pretrained={model}", sources, f"cache.path={cache}", f"train.output_dir={cache.parent / 'run'}",
            "cache.max_skip_fraction=1.0"]


def cache_keys_and_rows(cache: Path) -> dict[str, dict]:
    reader = CacheReader(str(cache))
    out = {}
    for bucket, n in reader.bucket_counts().items():
        rows = reader.read_rows(bucket, range(n), fields=["key", "original_size", "target_size", "content_hash"])
        for i, key in enumerate(rows["key"]):
            out[key] = {"original_size": tuple(rows["original_size"][i].tolist()), "bucket": bucket,
                        "content_hash": bytes(rows["content_hash"][i].numpy().tobytes())}
    reader.close()
    return out


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("bad-inputs")
    return root, build_inputs(root)


@pytest.mark.slow
def test_every_bad_input_has_a_named_reason_and_exact_counts(tiny_sdxl, bad_inputs, tmp_path):
    root, expected = bad_inputs
    cache = tmp_path / "cache"
    assert run_cache(load_config(DEMO, config_args(tiny_sdxl, root, cache))) == 0  # the job finishes
    summary = json.loads((cache / "summary.json").read_text())
    assert summary["skip_reasons"] == expected["skips"]
    assert summary["samples_seen"] == expected["seen"]
    assert summary["samples"] == len(expected["keys"])
    rows = cache_keys_and_rows(cache)
    assert set(rows) == expected["keys"]
    # Valid odd images: upright EXIF size, the 1:20 image in the tallest bucket, the first copy of a key kept.
    assert rows["exif"]["original_size"] == (128, 80)
    assert rows["tall"]["original_size"] == (1280, 64)
    tallest = min(CacheReader(str(cache)).spec.buckets, key=lambda b: b[1] / b[0])
    assert rows["tall"]["bucket"] == tallest
    assert rows[SHARED_KEY]["content_hash"] == expected["shared_hash"]
    assert rows["twin"]["content_hash"] == expected["twin_hash"]
    # The rewritten group names who kept the key, and the example says so.
    manifest = json.loads((cache / "shards" / "s0-f-dup" / "commit.json").read_text())
    assert manifest["skipped"]["duplicate_key"]["count"] == 1
    assert "s0-e-dup" in manifest["stats"]["duplicate_of"]
    assert any("s0-e-dup" in e for e in manifest["skipped"]["duplicate_key"]["examples"])
    assert CacheReader(str(cache)).verify(checksums=True) == []


@pytest.mark.slow
def test_duplicate_keys_give_the_same_cache_in_any_shard_order_and_follow_input_changes(tiny_sdxl, bad_inputs,
                                                                                        tmp_path, monkeypatch):
    root = tmp_path / "inputs"
    shutil.copytree(bad_inputs[0], root)
    forward, backward = tmp_path / "forward", tmp_path / "backward"
    assert run_cache(load_config(DEMO, config_args(tiny_sdxl, root, forward))) == 0
    listed = job_module.list_input_shards
    monkeypatch.setattr(job_module, "list_input_shards", lambda config: list(reversed(listed(config))))
    assert run_cache(load_config(DEMO, config_args(tiny_sdxl, root, backward))) == 0
    assert_same_cache(snapshot(backward), snapshot(forward), "reversed shard order")
    monkeypatch.undo()

    # The shard that kept the key loses it: the other shard must hold it now, exactly as a fresh run would.
    write_tar(root / "wds" / "e-dup.tar", sample("e-own", jpeg(seed=22)))
    assert run_cache(load_config(DEMO, config_args(tiny_sdxl, root, forward))) == 0
    fresh = tmp_path / "fresh"
    assert run_cache(load_config(DEMO, config_args(tiny_sdxl, root, fresh))) == 0
    assert_same_cache(snapshot(forward), snapshot(fresh), "after the owner changed")
    assert cache_keys_and_rows(forward)[SHARED_KEY]["content_hash"] != bad_inputs[1]["shared_hash"]
    assert "duplicate_key" not in json.loads((forward / "shards" / "s0-f-dup" / "commit.json").read_text())["skipped"]
