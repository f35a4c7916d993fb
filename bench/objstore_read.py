"""Benchmark: training from a cache on an object store, against the same cache on the local disk.

The cache (SDXL shapes, `bench.common.write_cache`, blosc-lz4, random data) is copied to an S3-compatible
server on loopback (moto, `devkit/object_store.py`) running in its own process, which waits `latency` before
answering each request, on its own thread per request, as a remote store does (20 ms and 50 ms: the range
measured for S3/R2 from another region or a busy bucket). One DataLoader worker's work is timed:
`CachedBatches` (the trainer's dataset) reading one epoch of micro-batches of one bucket as the trainer does
for a remote cache: the shard-window order (`train.shuffle: shard_window`), read as
`train.data.shard_window_reads` sets it up (one reader: whole shard files kept in memory, the coming
windows' prefetched, read-ahead 2; one of several readers: only its own rows, fetched ahead, read-ahead 16).
The rate is taken from the end of the first window (the steady state); for the one reader, of its second
epoch in the same process (this cache's epoch is 4 windows, a real one hundreds: receive buffers are
reused from the fourth window on), the first epoch's rate given apart. Beside it: the global order (random rows, one ranged GET
per row, shard indexes fetched in a warm-up pass as a worker does once) with and without read-ahead, and
with `train.read_through_dir` copies warm; CPU per sample of the worker and of the store; bytes fetched.

Figure `objstore_vs_local_20ms`: remote samples/s at 20 ms (shard-window order, one reader) / local
samples/s (global order), per worker. What limits it: CPU per byte received on the reader's cores
(docs/benchmarks.md, "Object store").
"""

from __future__ import annotations

import gc
import itertools
import os
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .common import SDXL_BUCKET, SampleSource, cli, row, sdxl_spec, write_cache

SIZES = {
    "full": {"samples": 2048, "micro": 4, "batches": 96, "ahead": 16, "latencies": (0.02, 0.05), "window_shards": 2,
             "readers": 4},
    "smoke": {"samples": 16, "micro": 2, "batches": 4, "ahead": 4, "latencies": (0.02,), "window_shards": 2,
              "readers": 2},
}
GOAL = 0.5


def _plan(n: int, micro: int, batches: int, seed: int) -> list[Any]:
    """`batches` micro-batches of random rows: the global order's reads (one worker, one rank)."""
    from latentforge.train.sampler import MicroBatch

    rng = np.random.default_rng(seed)
    return [MicroBatch(SDXL_BUCKET, tuple(int(i) for i in rng.choice(n, micro, replace=False)), step, 0)
            for step in range(batches)]


def window_plan(cache: str, n: int, micro: int, shards: int, seed: int, readers: int = 1,
                ahead: int = 0) -> tuple[list[Any], Any, int]:
    """One epoch of the shard-window order (`train.shuffle: shard_window`) for the first of `readers`
    ranks (one worker each), and how it reads as the trainer sets it (`train.data.shard_window_reads`:
    whole shard files kept per field, rows held ahead per field, prefetch horizon, read-ahead), and the
    micro-batches of a window."""
    from latentforge.shared.cache_reader import CacheReader
    from latentforge.train.data import shard_window_for, shard_window_reads
    from latentforge.train.sampler import GlobalBucketSchedule

    reader = CacheReader(cache)
    window = shard_window_for(reader, {SDXL_BUCKET: np.arange(n)}, shards)
    reader.close()
    sched = GlobalBucketSchedule({SDXL_BUCKET: n}, micro * readers, seed, window)
    plan = list(itertools.islice(sched.micro_batches(sched.initial_state(), 0, readers, micro), sched.steps_per_epoch))
    return (plan, shard_window_reads(window, micro * readers, micro, readers, 0, ahead),
            window.horizon(micro * readers, micro, readers, 0))


class Pass(NamedTuple):
    """One timed pass: samples/s, what the store saw, seconds to the first batch, CPU seconds of this (the
    worker's) process and of the store's process (None where it cannot be read)."""

    samples_per_s: float
    stats: Any
    first_batch_s: float
    worker_cpu_s: float
    store_cpu_s: float | None


def worker_samples_per_s(url: str, opts: dict[str, Any], n: int, plan: list[Any], ahead: int,
                         read_through: tuple[str, int] | None = None, whole_shards: int = 0,
                         server: Any = None, horizon: int = 0, ahead_rows: int = 0, first_window: int = 0) -> Pass:
    """One worker's samples/s through `CachedBatches` over `plan`. Ranged reads first take a warm-up pass
    over every shard index (and, with `read_through`, wait until the shard files touched in it have been
    copied), as a worker does once; shard-window reads (`whole_shards`, `ahead_rows`) take none: the
    timed pass pays for every byte it reads, and its rate is taken from the end of the first window
    (the steady state: each window's reads fetched while the one before is served), the time to the
    first batch returned apart."""
    from latentforge.train.data import CachedBatches
    from latentforge.train.read_ahead import ReadAheadSampler

    dataset = CachedBatches(url, opts, {SDXL_BUCKET: np.arange(n)}, ahead, read_through, whole_shards=whole_shards,
                            ahead_rows=ahead_rows)
    windowed = bool(whole_shards or ahead_rows)
    if windowed:  # open the cache and load the small fields (read whole, once per worker)
        reader = dataset.reader()
        small = [f.spec.name for f in reader._layout(SDXL_BUCKET, None) if f.tensor and not f.per_row]
        reader.read_rows(SDXL_BUCKET, np.arange(n), fields=small)
    else:  # open the cache and touch every shard (indexes kept), as the first steps of a run do
        dataset[_plan(n, min(n, 64), 1, 99)[0]]
    copies = dataset.reader()._rows.read_through
    if copies is not None:  # the epoch-2 state: wait for the copies queued by the warm-up pass
        deadline = time.monotonic() + 300
        while copies._queued and time.monotonic() < deadline:
            time.sleep(0.05)
        dataset[_plan(n, min(n, 64), 1, 99)[0]]
    items = list(ReadAheadSampler(plan, 1, ahead, horizon)) if ahead or horizon else plan
    if server is not None:
        server.reset_stats()
    # Micro-batches of the first window, fetched with nothing to overlap (an epoch too short for a steady
    # state, the smoke size, is timed whole).
    skip = min(first_window, len(items) - 1) if windowed and len(items) >= 2 * first_window else 0
    store_clock = getattr(server, "cpu_seconds", None)
    store_cpu = store_clock() if store_clock is not None else None
    cpu = time.process_time()
    t = start = time.perf_counter()
    for i, item in enumerate(items):
        dataset[item]
        if i + 1 == skip:
            start = time.perf_counter()
    end = time.perf_counter()
    worker_cpu = time.process_time() - cpu
    store_used = store_clock() - store_cpu if store_clock is not None and store_cpu is not None else None
    if dataset._ahead is not None:
        dataset._ahead.close()
    dataset.reader().close()
    timed = sum(len(mb.items) for mb in plan[skip:])
    return Pass(timed / (end - start), server.reset_stats() if server is not None else None, start - t,
                worker_cpu, store_used)


def run(size: str, workdir: Path) -> dict[str, Any]:
    from latentforge.devkit.object_store import loopback_s3, upload_tree

    cfg = SIZES[size]
    n, micro = cfg["samples"], cfg["micro"]
    cache = workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    write_cache(cache, sdxl_spec("blosc-lz4"), SampleSource("random"), n, rows_per_group=min(n, 512))
    # moto accepts any credentials; fixed ones keep a user's real keys away from the loopback server.
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    os.environ.pop("AWS_PROFILE", None)
    # Local: the global order (train.shuffle: auto on a local disk), one epoch of micro-batches.
    local_pass = worker_samples_per_s(str(cache), {}, n, _plan(n, micro, n // micro, 1), 0)
    local, local_cpu_per_sample = local_pass.samples_per_s, local_pass.worker_cpu_s / n
    local_window_plan, local_reads, _ = window_plan(str(cache), n, micro, cfg["window_shards"], 5)
    local_window = worker_samples_per_s(str(cache), {}, n, local_window_plan, 0).samples_per_s
    readers = cfg["readers"]
    remote: dict[str, dict[str, float]] = {}
    with loopback_s3(process=True) as server:
        upload_tree(server.endpoint, str(cache), "s3://bench/cache")
        opts = {"endpoint_url": server.endpoint}
        for latency in cfg["latencies"]:
            server.latency_s = latency
            ms = f"{latency * 1e3:.0f}ms"
            # This cache's epoch is 4 windows, too short for a real epoch's steady state (hundreds of windows),
            # in which the worker's receive buffers (`shared/recv_buffers.py`) are reused from the fourth on:
            # a first epoch warms them (its rate reported apart), the next, in the same process, is timed.
            plan, reads, first = window_plan(str(cache), n, micro, cfg["window_shards"], 8, 1, cfg["ahead"])
            cold = worker_samples_per_s("s3://bench/cache", opts, n, plan, reads.read_ahead,
                                        whole_shards=reads.whole_shards, server=server, horizon=reads.horizon,
                                        first_window=first)
            gc.collect()  # the first epoch's reader is gone: its buffers are free to be reused
            plan, reads, first = window_plan(str(cache), n, micro, cfg["window_shards"], 2, 1, cfg["ahead"])
            whole_pass = worker_samples_per_s("s3://bench/cache", opts, n, plan, reads.read_ahead,
                                              whole_shards=reads.whole_shards, server=server, horizon=reads.horizon,
                                              first_window=first)
            window, wstats, wstart = whole_pass.samples_per_s, whole_pass.stats, whole_pass.first_batch_s
            # One of `readers` ranks: only its own rows, fetched ahead (no whole files: no repeated bytes).
            rplan, rreads, rfirst = window_plan(str(cache), n, micro, cfg["window_shards"], 7, readers, cfg["ahead"])
            shared, rstats, rstart, _, _ = worker_samples_per_s("s3://bench/cache", opts, n, rplan, rreads.read_ahead,
                                                                server=server, horizon=rreads.horizon,
                                                                ahead_rows=rreads.ahead_rows, first_window=rfirst)
            ranged = _plan(n, micro, cfg["batches"], 3)
            global_order, gstats, *_ = worker_samples_per_s("s3://bench/cache", opts, n, ranged, cfg["ahead"],
                                                            server=server)
            without = worker_samples_per_s("s3://bench/cache", opts, n, _plan(n, micro, cfg["batches"], 4), 0).samples_per_s
            copies = worker_samples_per_s("s3://bench/cache", opts, n, _plan(n, micro, cfg["batches"], 6), cfg["ahead"],
                                          read_through=(str(workdir / f"copies-{ms}"), 100 << 30)).samples_per_s
            shutil.rmtree(workdir / f"copies-{ms}", ignore_errors=True)
            per_sample = sum(len(mb.items) for mb in plan)
            per_sample_cpu = whole_pass.worker_cpu_s / per_sample
            remote[ms] = {"samples_per_s": window, "vs_local": window / local, "first_batch_s": wstart,
                          "whole_shards": reads.whole_shards, "read_ahead": reads.read_ahead,
                          "cold_samples_per_s": cold.samples_per_s,
                          "cold_worker_cpu_ms_per_sample": 1e3 * cold.worker_cpu_s / per_sample,
                          "worker_cpu_ms_per_sample": 1e3 * per_sample_cpu,
                          "worker_cpu_vs_local": per_sample_cpu / local_cpu_per_sample,
                          "store_cpu_ms_per_sample": (1e3 * whole_pass.store_cpu_s / per_sample
                                                      if whole_pass.store_cpu_s is not None else None),
                          "bytes_per_sample": wstats.range_bytes / per_sample,
                          "gets_per_micro_batch": len(wstats.gets) / len(plan), "max_in_flight": wstats.max_in_flight,
                          "readers": readers, "rows_samples_per_s": shared, "rows_vs_local": shared / local,
                          "rows_first_batch_s": rstart,
                          "rows_bytes_per_sample": rstats.range_bytes / sum(len(mb.items) for mb in rplan),
                          "rows_gets_per_micro_batch": len(rstats.gets) / len(rplan),
                          "global_order_samples_per_s": global_order, "global_order_vs_local": global_order / local,
                          "global_order_gets_per_micro_batch": len(gstats.gets) / len(ranged),
                          "global_order_max_in_flight": gstats.max_in_flight,
                          "no_read_ahead_samples_per_s": without,
                          "read_through_samples_per_s": copies, "read_through_vs_local": copies / local}
    shutil.rmtree(cache, ignore_errors=True)
    table = [row("local cache, one worker, samples/s", local, "samples/s", "", None,
                 f"global order, micro-batch {micro}, {n} samples, blosc-lz4, SDXL shapes; shard-window order "
                 f"{local_window:.0f} samples/s")]
    for ms, r in remote.items():
        goal = ms == "20ms"
        table.append(row(f"object store at {ms} per request vs local, per worker (shard-window order)", r["vs_local"], "x",
                         f">= {GOAL}x" if goal else "", (r["vs_local"] >= GOAL) if goal else None,
                         f"{r['samples_per_s']:.0f} samples/s from the second window on, receive buffers warm (first epoch, "
                         f"cold: {r['cold_samples_per_s']:.0f}; first batch after "
                         f"{r['first_batch_s']:.1f} s), window {cfg['window_shards']} shard files, whole files (up to "
                         f"{r['whole_shards']} per field kept), read-ahead {r['read_ahead']}; {r['gets_per_micro_batch']:.2f} GETs per micro-batch, "
                         f"{r['bytes_per_sample'] / 1e3:.0f} kB fetched per sample read"))
        table.append(row(f"  worker CPU per sample read, {ms}, vs the local read's", r["worker_cpu_vs_local"], "x", "", None,
                         f"{r['worker_cpu_ms_per_sample']:.3f} ms vs {1e3 * local_cpu_per_sample:.3f} ms (all the "
                         f"worker's threads: the S3 client's receive, decode); the store's process "
                         + (f"{r['store_cpu_ms_per_sample']:.3f} ms" if r["store_cpu_ms_per_sample"] is not None else "n/a")))
        table.append(row(f"  one of {readers} readers, its own rows fetched ahead, {ms}", r["rows_vs_local"], "x", "", None,
                         f"{r['rows_samples_per_s']:.0f} samples/s (first batch after {r['rows_first_batch_s']:.1f} s); "
                         f"{r['rows_gets_per_micro_batch']:.1f} GETs per micro-batch, "
                         f"{r['rows_bytes_per_sample'] / 1e3:.0f} kB fetched per sample read (whole files: "
                         f"{readers}x the cache per epoch)"))
        table.append(row(f"  global order, ranged reads, {ms}", r["global_order_vs_local"], "x", "", None,
                         f"{r['global_order_samples_per_s']:.0f} samples/s with read-ahead {cfg['ahead']}, "
                         f"{r['no_read_ahead_samples_per_s']:.0f} without; {r['global_order_gets_per_micro_batch']:.1f} "
                         f"GETs per micro-batch, up to {r['global_order_max_in_flight']} in flight"))
        table.append(row(f"  global order with train.read_through_dir, shard files copied (epoch 2 on), {ms}",
                         r["read_through_vs_local"], "x", "", None, f"{r['read_through_samples_per_s']:.0f} samples/s"))
    return {"name": "objstore_read", "table": table, "config": dict(cfg), "local_samples_per_s": local,
            "local_cpu_ms_per_sample": 1e3 * local_cpu_per_sample,
            "local_shard_window_samples_per_s": local_window, "whole_shards": local_reads.whole_shards, "remote": remote,
            "summary": {"objstore_vs_local_20ms": remote.get("20ms", {}).get("vs_local"),
                        "objstore_read_through_vs_local_20ms": remote.get("20ms", {}).get("read_through_vs_local")}}


if __name__ == "__main__":
    raise SystemExit(cli(run, "objstore_read"))
