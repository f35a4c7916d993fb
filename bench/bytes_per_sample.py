"""Benchmark 5: bytes on disk per cached sample against the raw fp16/bf16 tensor bytes, per codec, with the
CPU cost of compressing and decompressing.

The four codecs the cache supports are measured end to end: a real cache is written with `CacheWriter`
(every byte counts: shard indexes, small fields, keys, JSON, commit manifests) and `du` is divided by the
sample count. Other codec settings we tried are measured at chunk level (one chunk per big-field row, as
the cache stores them) and marked as such. Speeds are single-threaded (blosc threads = 1) MB/s of raw
tensor bytes, so codecs compare on CPU cost; both data kinds of `bench.common` are reported.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np

from .common import RAW_BYTES, SampleSource, cli, du, median, row, sdxl_spec, write_cache

SIZES = {
    "full": {"rows": 256, "speed_rows": 32, "repeats": 3, "dedup_rows": 1024, "dedup_shard_rows": 256},
    "smoke": {"rows": 16, "speed_rows": 4, "repeats": 1, "dedup_rows": 32, "dedup_shard_rows": 8},
}
SHARED_BY = 8  # images per caption, on average, in the embeddings-stored-once figure


class SharedCaptions:
    """`source` with each caption's text fields shared by `SHARED_BY` samples: sample i takes the text
    fields of sample `caption[i]` and its own latent. `order`: 'adjacent' (a caption's samples next to
    each other, as DreamBooth instance/class sources and templated sets come) or 'random' (spread over
    the group)."""

    def __init__(self, source: SampleSource, n: int, order: str, seed: int = 0) -> None:
        self.source, self.shapes = source, source.shapes
        ids = np.arange(n) // SHARED_BY
        self.caption = ids if order == "adjacent" else np.random.default_rng(seed).permutation(ids)

    def sample(self, i: int) -> dict[str, np.ndarray]:
        own, text = self.source.sample(i), self.source.sample(int(self.caption[i]))
        return {k: (own[k] if k == "latent_mean" else text[k]) for k in self.shapes}

    def batch(self, start: int, stop: int) -> dict[str, np.ndarray]:
        rows = [self.sample(i) for i in range(start, stop)]
        return {name: np.stack([r[name] for r in rows]) for name in self.shapes}


def dedup_figures(cfg: dict[str, Any], workdir: Path) -> dict[str, float]:
    """Bytes per sample vs raw for a group whose captions are each shared by `SHARED_BY` samples, in both
    orders; the cache stores identical embedding chunks of a shard file once."""
    n, out = cfg["dedup_rows"], {}
    for order in ("adjacent", "random"):
        path = workdir / f"dedup-{order}"
        shutil.rmtree(path, ignore_errors=True)
        source = SharedCaptions(SampleSource("random"), n, order)
        write_cache(path, sdxl_spec(DEFAULT_CODEC, shard_rows=cfg["dedup_shard_rows"]), source, n, rows_per_group=n,
                    prompts=False)
        out[order] = du(path) / n / RAW_BYTES
        shutil.rmtree(path, ignore_errors=True)
    return out
CACHE_CODECS = ("blosc-lz4", "blosc-zstd", "zstd", "none")
DEFAULT_CODEC = "blosc-lz4"


def _codec(name: str) -> Any:
    """The numcodecs codec the cache writes for `name` (same settings as `shared/cache_writer.py`), plus extras."""
    table = {
        "blosc-lz4": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE),
        "blosc-zstd": numcodecs.Blosc("zstd", 5, numcodecs.Blosc.SHUFFLE),
        "zstd": numcodecs.Zstd(level=3),
        "none": None,
        # Tried, not offered by the cache: bit-shuffle, other levels, lz4 without a shuffle.
        "blosc-lz4 bitshuffle": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.BITSHUFFLE),
        "blosc-lz4 clevel 1": numcodecs.Blosc("lz4", 1, numcodecs.Blosc.SHUFFLE),
        "blosc-zstd clevel 1": numcodecs.Blosc("zstd", 1, numcodecs.Blosc.SHUFFLE),
        "blosc-zstd bitshuffle": numcodecs.Blosc("zstd", 5, numcodecs.Blosc.BITSHUFFLE),
        "zstd level 1": numcodecs.Zstd(level=1),
        "lz4 (no shuffle)": numcodecs.LZ4(),
    }
    return table[name]


def chunk_figures(name: str, rows: list[dict[str, np.ndarray]], repeats: int) -> dict[str, float]:
    """Compressed size ratio of the big-field chunks and single-thread compress/decompress MB/s."""
    codec = _codec(name)
    chunks = [np.ascontiguousarray(v) for r in rows for k, v in r.items() if v.nbytes >= 4096]
    raw = sum(c.nbytes for c in chunks)
    if codec is None:
        return {"chunk_ratio": 1.0, "compress_mb_s": float("inf"), "decompress_mb_s": float("inf")}
    # Blosc needs typesize 2 to shuffle 16-bit floats; numcodecs takes it from the array's itemsize.
    enc, dec = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        blobs = [codec.encode(c) for c in chunks]
        enc.append(time.perf_counter() - t)
        outs = [np.empty_like(c) for c in chunks]
        t = time.perf_counter()
        for b, o in zip(blobs, outs, strict=True):
            if isinstance(codec, numcodecs.Blosc):
                codec.decode(b, out=o)
            else:
                o[...] = np.frombuffer(codec.decode(b), o.dtype).reshape(o.shape)
        dec.append(time.perf_counter() - t)
    assert all(np.array_equal(o, c) for o, c in zip(outs, chunks, strict=True))
    size = sum(len(b) for b in blobs)
    return {"chunk_ratio": size / raw, "compress_mb_s": raw / median(enc) / 1e6, "decompress_mb_s": raw / median(dec) / 1e6}


def run(size: str, workdir: Path) -> dict[str, Any]:
    cfg = SIZES[size]
    n = cfg["rows"]
    threads = numcodecs.blosc.get_nthreads()
    numcodecs.blosc.set_nthreads(1)
    results: dict[str, dict[str, Any]] = {}
    try:
        for kind in ("random", "structured"):
            source = SampleSource(kind).memoized(n)
            rows = [source.sample(i) for i in range(cfg["speed_rows"])]
            for name in (*CACHE_CODECS, "blosc-lz4 bitshuffle", "blosc-lz4 clevel 1", "blosc-zstd clevel 1",
                         "blosc-zstd bitshuffle", "zstd level 1", "lz4 (no shuffle)"):
                fig = chunk_figures(name, rows, cfg["repeats"])
                entry: dict[str, Any] = {"codec": name, "data": kind, **fig}
                if name in CACHE_CODECS:
                    path = workdir / f"{kind}-{name}"
                    shutil.rmtree(path, ignore_errors=True)
                    seconds = write_cache(path, sdxl_spec(name, shard_rows=256), source, n, rows_per_group=n, prompts=False)
                    entry["bytes_per_sample"] = du(path) / n
                    entry["bytes_vs_raw"] = entry["bytes_per_sample"] / RAW_BYTES
                    entry["cache_writes_per_s"] = n / seconds
                    shutil.rmtree(path, ignore_errors=True)
                results[f"{name} / {kind}"] = entry
    finally:
        numcodecs.blosc.set_nthreads(threads)
    default = results[f"{DEFAULT_CODEC} / random"]
    dedup = dedup_figures(cfg, workdir)
    table = [row(f"bytes per sample vs raw fp16 ({DEFAULT_CODEC}, random-normal data)", default["bytes_vs_raw"], "x",
                 "<= 0.9x", default["bytes_vs_raw"] <= 0.9,
                 f"{default['bytes_per_sample']:,.0f} of {RAW_BYTES:,} B; {n} samples written by CacheWriter; compress "
                 f"{default['compress_mb_s']:,.0f} MB/s, decompress {default['decompress_mb_s']:,.0f} MB/s (1 thread)")]
    for key, e in results.items():
        if key == f"{DEFAULT_CODEC} / random":
            continue
        ratio = e.get("bytes_vs_raw", e["chunk_ratio"])
        how = "cache on disk" if "bytes_vs_raw" in e else "chunk-level, not offered"
        speed = ("" if e["codec"] == "none" else
                 f"compress {e['compress_mb_s']:,.0f} MB/s, decompress {e['decompress_mb_s']:,.0f} MB/s (1 thread)")
        table.append(row(f"  bytes vs raw: {key}", ratio, "x", "", None, f"{how}; {speed}"))
    table.insert(1, row(f"bytes per sample vs raw, each caption shared by {SHARED_BY} samples (adjacent)",
                        dedup["adjacent"], "x", "", None,
                        f"{cfg['dedup_rows']} samples in one group, shards of {cfg['dedup_shard_rows']} rows; "
                        f"the same captions spread at random over the group: {dedup['random']:.3f}x (identical "
                        "embedding chunks are stored once per shard file)"))
    return {"name": "bytes_per_sample", "table": table,
            "summary": {"bytes_vs_raw": default["bytes_vs_raw"], "bytes_dedup_vs_raw": dedup["adjacent"]},
            "dedup": dedup,
            "config": {**cfg, "raw_bytes_per_sample": RAW_BYTES, "shard_rows": 256}, "codecs": results}


if __name__ == "__main__":
    raise SystemExit(cli(run, "bytes_per_sample"))
