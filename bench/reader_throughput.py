"""Benchmark 2: cached-loader throughput against the raw limit and the per-file layouts peers use.

Reads random batches of one bucket (SDXL 1024x1024 rows: latent 4x128x128, prompt embeds 77x2048, pooled
1280, bfloat16 = 449,024 B/sample) from the same samples stored five ways, all written by the benchmark
(the layouts are in `reader_layouts.py`):

- our cache through `CacheReader.read_rows(bucket, rows, fields)` (the fields the trainer reads);
- raw: one `.npy` memmap per field, rows copied out with numpy fancy indexing (the page-cache copy limit,
  as `../shared/notes/read_anchor.py` measures it, but batched);
- `.npz` per sample (kohya sd-scripts style) and `.pt` per sample (SimpleTuner style), stacked into a batch.

Warm: in each round the batches about to be timed are first read once, untimed, by every contender, so
their bytes are in the page cache; then each contender is timed on them in turn (raw and the layout
interleaved, new random batches every round); the ratio is of medians over rounds. Cold: the layout's
files are evicted from the page cache with fsync + POSIX_FADV_DONTNEED (no root needed, nothing else
evicted) before one timed pass.
Per-codec figures use a smaller cache per codec (same data, same reads).
"""

from __future__ import annotations

import cProfile
import io
import math
import os
import pstats
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import RAW_BYTES, SDXL_BUCKET, SampleSource, cli, drop_page_cache, median, row
from .reader_layouts import FIELDS, SHARD_ROWS, Cache, Npz, Pt, Raw

SIZES = {
    # n_main: samples in the raw/npz/pt/default-codec layouts; n_codec: per-codec caches.
    "full": {"n_main": 10_000, "n_codec": 1_000, "batch": 16, "round_samples": 1024, "rounds": 3,
             "single_rows": 512, "cold_samples": 512},
    "smoke": {"n_main": 48, "n_codec": 32, "batch": 8, "round_samples": 16, "rounds": 1,
              "single_rows": 8, "cold_samples": 8},
}
CODECS = ("blosc-lz4", "blosc-zstd", "zstd", "none")
DEFAULT_CODEC = "blosc-lz4"


# ---- timing -------------------------------------------------------------------------------------
def batches(n: int, samples: int, batch: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(n, size=batch, replace=False) for _ in range(max(1, samples // batch))]


def reader_fn(layout: Any, plan: list[np.ndarray]):
    def go() -> None:
        for rows in plan:
            layout.read(rows)
    return go


def samples_per_s(seconds: list[float], plan: list[np.ndarray]) -> float:
    return sum(len(r) for r in plan) / median(seconds)


def warm_rounds(contenders: dict[str, Any], n: int, cfg: dict, seed: int) -> tuple[dict[str, list[float]], list[np.ndarray]]:
    """Interleaved warm timing: each round draws new random batches, reads them once untimed with every
    contender (so exactly the bytes about to be read are in the page cache), then times each in turn.

    Warming per round rather than once per layout matters on this machine: the VM's DAMON reclaim pages
    out page cache that has not been touched for about a minute, so a 4.5 GB layout read once up front
    is partly on disk again by the time it is timed."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    plan: list[np.ndarray] = []
    for r in range(cfg["rounds"]):
        plan = batches(n, cfg["round_samples"], cfg["batch"], seed * 1000 + r)
        for lay in contenders.values():
            reader_fn(lay, plan)()
        for name, lay in contenders.items():
            t = time.perf_counter()
            reader_fn(lay, plan)()
            times[name].append(time.perf_counter() - t)
    return times, plan


def compare_warm(raw: Raw, other: Any, n: int, cfg: dict, seed: int) -> tuple[float, float]:
    """(raw samples/s, other samples/s), warm, interleaved rounds over the same random batches."""
    t, plan = warm_rounds({"raw": raw, "other": other}, n, cfg, seed)
    return samples_per_s(t["raw"], plan), samples_per_s(t["other"], plan)


def cold(layout: Any, n: int, cfg: dict, seed: int) -> float | None:
    plan = batches(n, cfg["cold_samples"], cfg["batch"], seed)
    if not drop_page_cache(layout.files()):
        return None
    t = time.perf_counter()
    reader_fn(layout, plan)()
    return sum(len(r) for r in plan) / (time.perf_counter() - t)


def profile_reads(cache: Cache, n: int, cfg: dict) -> dict[str, Any]:
    """cProfile of warm batched reads, plus the time split into pread, decode and the rest."""
    plan = batches(n, cfg["round_samples"], cfg["batch"], 99)
    reader_fn(cache, plan)()  # warm: the cold measurement before this evicted the files
    prof = cProfile.Profile()
    prof.enable()
    reader_fn(cache, plan)()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values())
    top = sorted(((v[2], f"{Path(k[0]).name}:{k[1]}({k[2]})") for k, v in stats.items()), reverse=True)[:8]
    return {"samples": sum(len(r) for r in plan), "total_s": round(total, 4),
            "top_tottime": [{"function": name, "seconds": round(s, 4), "share": round(s / total, 3)} for s, name in top],
            "text": out.getvalue()[-4000:]}


def decode_split(cache: Cache, n: int, cfg: dict) -> dict[str, float]:
    """Seconds per sample for: read_rows; os.pread of the same bytes; decode from memory of those bytes."""
    import numcodecs

    reader = cache.reader
    plan = batches(n, cfg["round_samples"], cfg["batch"], 7)
    reader_fn(cache, plan)()  # warm
    rows = np.concatenate(plan)
    # The byte ranges read_rows would fetch, via the reader's own index helpers.
    name = "1024x1024"
    gidx, local = reader.locate(SDXL_BUCKET, rows)
    ranges = []
    per_row = [reader.spec.field(f) for f in FIELDS if reader.spec.field(f).per_row(SDXL_BUCKET, 8)]
    for spec in per_row:
        for gi, lr in zip(gidx, local, strict=True):
            ra = reader._rows._row_array(reader._bucket_groups[name][gi], name, spec)
            shard, within = divmod(int(lr), ra.shard_rows)
            off, nb = reader._rows._shard_index(ra, shard)[within]
            ranges.append((reader.storage.path(ra.shard_file(shard)), int(off), int(nb), ra))
    fds: dict[str, int] = {}
    t = time.perf_counter()
    blobs = []
    for path, off, nb, _ in ranges:
        fd = fds.get(path) or fds.setdefault(path, os.open(path, os.O_RDONLY))
        blobs.append(os.pread(fd, nb, off))
    t_pread = time.perf_counter() - t
    for fd in fds.values():
        os.close(fd)
    t = time.perf_counter()
    for blob, (_, _, _, ra) in zip(blobs, ranges, strict=True):
        out = np.empty(ra.row_shape, ra.dtype)
        if ra.decoder is None:
            out[...] = np.frombuffer(blob, ra.dtype).reshape(ra.row_shape)
        elif isinstance(ra.decoder, numcodecs.Blosc):
            ra.decoder.decode(blob, out=out)
        else:
            out[...] = np.frombuffer(ra.decoder.decode(blob), ra.dtype).reshape(ra.row_shape)
    t_decode = time.perf_counter() - t
    # The codec's limit: the same chunks, already in memory, decompressed on one thread into buffers
    # allocated once (what read_rows does into its batch buffer), best of 3 like read_rows below.
    targets = [np.empty(ra.row_shape, ra.dtype) for _, _, _, ra in ranges]
    t_codec = math.inf
    for _ in range(3):
        t = time.perf_counter()
        for blob, (_, _, _, ra), target in zip(blobs, ranges, targets, strict=True):
            if ra.decoder is None:
                target[...] = np.frombuffer(blob, ra.dtype).reshape(ra.row_shape)
            elif isinstance(ra.decoder, numcodecs.Blosc):
                ra.decoder.decode(blob, out=target)
            else:
                target[...] = np.frombuffer(ra.decoder.decode(blob), ra.dtype).reshape(ra.row_shape)
        t_codec = min(t_codec, time.perf_counter() - t)
    t_all = math.inf
    for _ in range(3):
        t = time.perf_counter()
        reader_fn(cache, plan)()
        t_all = min(t_all, time.perf_counter() - t)
    k = len(rows)
    return {"read_rows_ms_per_sample": 1e3 * t_all / k, "pread_ms_per_sample": 1e3 * t_pread / k,
            "decode_ms_per_sample": 1e3 * t_decode / k, "codec_ms_per_sample": 1e3 * t_codec / k,
            "loader_vs_codec": t_codec / t_all,
            "other_ms_per_sample": 1e3 * max(0.0, t_all - t_pread - t_decode) / k}


# ---- the benchmark ------------------------------------------------------------------------------
def run(size: str, workdir: Path) -> dict[str, Any]:
    cfg = dict(SIZES[size])
    notes: list[str] = []
    free = shutil.disk_usage(workdir).free
    need_per_sample = RAW_BYTES * 4.2  # raw + npz + pt + default-codec cache
    budget = free - 8 * 2**30 - cfg["n_codec"] * RAW_BYTES * (len(CODECS) + 1)
    if cfg["n_main"] * need_per_sample > budget:
        cfg["n_main"] = max(1000, int(budget / need_per_sample) // 1000 * 1000)
        notes.append(f"disk: {free / 2**30:.0f} GiB free, so {cfg['n_main']} samples per layout instead of 10,000")
    n, nc = cfg["n_main"], cfg["n_codec"]
    source = SampleSource("random")
    raw = Raw(workdir / "raw")
    main_cache = Cache(workdir / f"cache-{DEFAULT_CODEC}", DEFAULT_CODEC)
    layouts = [main_cache, Npz(workdir / "npz"), Pt(workdir / "pt")]
    writes: dict[str, float] = {}
    try:
        for lay in [raw, *layouts]:
            shutil.rmtree(lay.root, ignore_errors=True)
            writes[lay.name] = n / lay.write(source, n)
        for lay in [raw, *layouts]:
            lay.open()
        warm: dict[str, dict[str, float]] = {}
        for i, lay in enumerate(layouts):
            r, o = compare_warm(raw, lay, n, cfg, seed=i)
            warm[lay.name] = {"samples_per_s": o, "raw_samples_per_s": r, "vs_raw": o / r}
        raw_warm = median(v["raw_samples_per_s"] for v in warm.values())
        cold_figs = {lay.name: cold(lay, n, cfg, seed=10 + i) for i, lay in enumerate([raw, *layouts])}
        if cold_figs[raw.name] is None:
            notes.append("cold reads: this platform has no posix_fadvise; cold figures skipped")
        else:
            notes.append("cold: files evicted with POSIX_FADV_DONTNEED (guest page cache only; a VM host may still cache the disk)")
        prof = profile_reads(main_cache, n, cfg)
        try:
            split = decode_split(main_cache, n, cfg)
        except Exception as exc:  # noqa: BLE001 - uses private reader helpers that may change
            split = {"error": f"{type(exc).__name__}: {exc}"}
        main_bytes = main_cache.bytes_per_sample(n)
    finally:
        if not os.environ.get("LATENTFORGE_BENCH_KEEP"):
            for lay in [raw, *layouts]:
                shutil.rmtree(lay.root, ignore_errors=True)

    # Per codec: a smaller cache each, compared with the raw layout of the same samples.
    raw_c = Raw(workdir / "raw-codec")
    codec_rows: dict[str, dict[str, float]] = {}
    try:
        shutil.rmtree(raw_c.root, ignore_errors=True)
        raw_c.write(source, nc)
        raw_c.open()
        variants = [(c, "random") for c in CODECS] + [(DEFAULT_CODEC, "structured")]
        for j, (codec, kind) in enumerate(variants):
            cache = Cache(workdir / f"codec-{codec}-{kind}", codec, kind)
            write_s = cache.write(SampleSource(kind), nc)
            cache.open()
            r, o = compare_warm(raw_c, cache, nc, cfg, seed=100 + j)
            t1, single = warm_rounds({"raw": raw_c, "cache": cache}, nc,
                                     {**cfg, "round_samples": cfg["single_rows"], "batch": 1}, 200 + j)
            codec_rows[cache.name] = {
                "codec": codec, "data": kind, "bytes_vs_raw": cache.bytes_per_sample(nc) / RAW_BYTES,
                "batch_samples_per_s": o, "batch_vs_raw": o / r,
                "single_row_reads_per_s": samples_per_s(t1["cache"], single),
                "single_row_vs_raw": median(t1["raw"]) / median(t1["cache"]),
                "writes_per_s": nc / write_s,
            }
            if not os.environ.get("LATENTFORGE_BENCH_KEEP"):
                shutil.rmtree(cache.root, ignore_errors=True)
    finally:
        if not os.environ.get("LATENTFORGE_BENCH_KEEP"):
            shutil.rmtree(raw_c.root, ignore_errors=True)

    ours = warm[main_cache.name]
    per_file = [warm[lay.name]["samples_per_s"] for lay in layouts[1:]]
    npz_name, pt_name = layouts[1].name, layouts[2].name
    vs_npz = ours["samples_per_s"] / warm[npz_name]["samples_per_s"]
    vs_pt = ours["samples_per_s"] / warm[pt_name]["samples_per_s"]
    b = cfg["batch"]
    table = [
        row(f"loader vs raw memmap, warm, {b}-row random batches ({DEFAULT_CODEC})", ours["vs_raw"], "x", ">= 0.5x",
            ours["vs_raw"] >= 0.5, f"{ours['samples_per_s']:.0f} vs {ours['raw_samples_per_s']:.0f} samples/s, {n} samples"),
        row("loader vs .npz per sample, warm", vs_npz, "x", ">= 1x", vs_npz >= 1,
            f"{warm[npz_name]['samples_per_s']:.0f} samples/s for .npz"),
        row("loader vs .pt per sample, warm", vs_pt, "x", ">= 1x", vs_pt >= 1,
            f"{warm[pt_name]['samples_per_s']:.0f} samples/s for .pt"),
    ]
    if cold_figs[raw.name]:
        c_ours = cold_figs[main_cache.name]
        table.append(row("loader vs raw memmap, cold (page cache dropped)", c_ours / cold_figs[raw.name], "x", ">= 0.5x",
                         c_ours / cold_figs[raw.name] >= 0.5, f"{c_ours:.0f} vs {cold_figs[raw.name]:.0f} samples/s"))
        best = max(cold_figs[npz_name], cold_figs[pt_name])
        table.append(row("loader vs the faster per-file layout, cold", c_ours / best, "x", ">= 1x", c_ours / best >= 1,
                         f".npz {cold_figs[npz_name]:.0f}, .pt {cold_figs[pt_name]:.0f} samples/s"))
    for name, c in codec_rows.items():
        table.append(row(f"  {name}: batch vs raw ({nc} samples)", c["batch_vs_raw"], "x", "", None,
                         f"{c['batch_samples_per_s']:.0f} samples/s batched, {c['single_row_reads_per_s']:.0f} single rows/s, "
                         f"{c['bytes_vs_raw']:.3f}x bytes, {c['writes_per_s']:.0f} writes/s"))
    vs_codec = split.get("loader_vs_codec")
    if vs_codec is not None:
        table.insert(3, row("loader vs single-thread decompression of the same chunks (the codec's limit)", vs_codec,
                            "x", ">= 0.9x", vs_codec >= 0.9,
                            f"{split['read_rows_ms_per_sample']:.3f} vs {split['codec_ms_per_sample']:.3f} ms per sample, "
                            f"best of 3, warm, {DEFAULT_CODEC}"))
    summary = {"loader_vs_raw": ours["vs_raw"], "loader_vs_npz": vs_npz, "loader_vs_pt": vs_pt,
               "loader_vs_codec": vs_codec}
    return {
        "name": "reader_throughput", "table": table, "summary": summary, "notes": notes,
        "config": {**cfg, "codec": DEFAULT_CODEC, "shard_rows": SHARD_ROWS, "raw_bytes_per_sample": RAW_BYTES,
                   "cache_bytes_per_sample": main_bytes},
        "warm": warm, "raw_warm_samples_per_s": raw_warm, "cold": cold_figs, "writes_per_s": writes,
        "per_codec": codec_rows, "profile": prof, "time_split": split,
        "never_below_per_file": ours["samples_per_s"] >= max(per_file),
    }


if __name__ == "__main__":
    raise SystemExit(cli(run, "reader_throughput"))
