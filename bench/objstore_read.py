"""Benchmark: training from a cache on an object store, against the same cache on the local disk.

The cache (SDXL shapes, `bench.common.write_cache`, blosc-lz4) is copied to an S3-compatible server on
loopback (moto, `devkit/object_store.py`) that waits `latency` before answering each request, on its
own thread per request, as a remote store does (20 ms and 50 ms: the range measured for S3/R2 from
another region or a busy bucket). One DataLoader worker's work is timed: `CachedBatches` (the
trainer's dataset) reading random micro-batches of one bucket, with the read-ahead a worker gets for a
remote cache (`train.read_ahead`, default 16), and with none, for comparison. Shard indexes are
fetched during a warm-up pass, as a training run does once per worker.

Figure `objstore_vs_local_20ms`: remote samples/s at 20 ms / local samples/s, per worker. What limits
it: requests per micro-batch (one round of merged ranges, all in flight together) times latency over the
read-ahead depth, and on this 2-core machine, moto's own CPU cost per request (it is a Python server
sharing the cores with the reader).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import SDXL_BUCKET, SampleSource, cli, row, sdxl_spec, write_cache

SIZES = {
    "full": {"samples": 1024, "micro": 4, "batches": 96, "ahead": 16, "latencies": (0.02, 0.05)},
    "smoke": {"samples": 16, "micro": 2, "batches": 4, "ahead": 4, "latencies": (0.02,)},
}
GOAL = 0.5


def _plan(n: int, micro: int, batches: int, seed: int) -> list[Any]:
    from latentforge.train.sampler import MicroBatch

    rng = np.random.default_rng(seed)
    return [MicroBatch(SDXL_BUCKET, tuple(int(i) for i in rng.choice(n, micro, replace=False)), step, 0)
            for step in range(batches)]


def worker_samples_per_s(url: str, opts: dict[str, Any], n: int, cfg: dict[str, Any], ahead: int,
                         seed: int, read_through: tuple[str, int] | None = None) -> float:
    """One worker's samples/s through `CachedBatches`, after a warm-up pass over every shard index
    (and, with `read_through`, once the shard files touched in it have been copied)."""
    from latentforge.train.data import CachedBatches
    from latentforge.train.read_ahead import ReadAheadSampler

    dataset = CachedBatches(url, opts, {SDXL_BUCKET: np.arange(n)}, ahead, read_through)
    # Warm-up: open the cache and touch every shard (indexes kept), as the first steps of a run do.
    dataset[_plan(n, min(n, 64), 1, seed + 1)[0]]
    copies = dataset.reader()._rows.read_through
    if copies is not None:  # the epoch-2 state: wait for the copies queued by the warm-up pass
        deadline = time.monotonic() + 300
        while copies._queued and time.monotonic() < deadline:
            time.sleep(0.05)
        dataset[_plan(n, min(n, 64), 1, seed + 1)[0]]
    plan = _plan(n, cfg["micro"], cfg["batches"], seed)
    items = list(ReadAheadSampler(plan, 1, ahead)) if ahead else plan
    t = time.perf_counter()
    for item in items:
        dataset[item]
    elapsed = time.perf_counter() - t
    if dataset._ahead is not None:
        dataset._ahead.close()
    dataset.reader().close()
    return cfg["micro"] * len(plan) / elapsed


def run(size: str, workdir: Path) -> dict[str, Any]:
    from latentforge.devkit.object_store import loopback_s3, upload_tree

    cfg = SIZES[size]
    n = cfg["samples"]
    cache = workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    write_cache(cache, sdxl_spec("blosc-lz4"), SampleSource("random"), n, rows_per_group=min(n, 512))
    # moto accepts any credentials; fixed ones keep a user's real keys away from the loopback server.
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    os.environ.pop("AWS_PROFILE", None)
    local = worker_samples_per_s(str(cache), {}, n, cfg, 0, seed=1)
    remote: dict[str, dict[str, float]] = {}
    with loopback_s3() as server:
        upload_tree(server.endpoint, str(cache), "s3://bench/cache")
        opts = {"endpoint_url": server.endpoint}
        for latency in cfg["latencies"]:
            server.latency_s = latency
            ms = f"{latency * 1e3:.0f}ms"
            server.reset_stats()
            with_ahead = worker_samples_per_s("s3://bench/cache", opts, n, cfg, cfg["ahead"], seed=2)
            stats = server.reset_stats()
            without = worker_samples_per_s("s3://bench/cache", opts, n, cfg, 0, seed=3)
            copies = worker_samples_per_s("s3://bench/cache", opts, n, cfg, cfg["ahead"], seed=4,
                                          read_through=(str(workdir / f"copies-{ms}"), 100 << 30))
            shutil.rmtree(workdir / f"copies-{ms}", ignore_errors=True)
            remote[ms] = {"samples_per_s": with_ahead, "no_read_ahead_samples_per_s": without,
                          "read_through_samples_per_s": copies, "read_through_vs_local": copies / local,
                          "vs_local": with_ahead / local, "gets_per_micro_batch": len(stats.gets) / cfg["batches"],
                          "max_in_flight": stats.max_in_flight}
    shutil.rmtree(cache, ignore_errors=True)
    table = [row("local cache, one worker, samples/s", local, "samples/s", "", None,
                 f"micro-batch {cfg['micro']}, {n} samples, blosc-lz4, SDXL shapes")]
    for ms, r in remote.items():
        goal = ms == "20ms"
        table.append(row(f"object store at {ms} per request vs local, per worker", r["vs_local"], "x",
                         f">= {GOAL}x" if goal else "", (r["vs_local"] >= GOAL) if goal else None,
                         f"{r['samples_per_s']:.0f} samples/s with read-ahead {cfg['ahead']}, "
                         f"{r['no_read_ahead_samples_per_s']:.0f} without; {r['gets_per_micro_batch']:.1f} GETs per "
                         f"micro-batch, up to {r['max_in_flight']} in flight"))
        table.append(row(f"  with train.read_through_dir, shard files copied (epoch 2 on), {ms}", r["read_through_vs_local"],
                         "x", "", None, f"{r['read_through_samples_per_s']:.0f} samples/s"))
    return {"name": "objstore_read", "table": table, "config": dict(cfg), "local_samples_per_s": local, "remote": remote,
            "summary": {"objstore_vs_local_20ms": remote.get("20ms", {}).get("vs_local"),
                        "objstore_read_through_vs_local_20ms": remote.get("20ms", {}).get("read_through_vs_local")}}


if __name__ == "__main__":
    raise SystemExit(cli(run, "objstore_read"))
