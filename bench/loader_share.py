"""Benchmark 1: the share of training step time spent waiting for data, through the trainer's real data path.

Data path: `train.data.CachedBatches` + `GlobalBucketSchedule`/`MicroBatchSampler` + `build_loader`
(DataLoader worker processes, prefetch) reading a cache written with `CacheWriter` in SDXL's shapes
(latent 4x128x128, prompt embeds 77x2048, pooled 1280, bfloat16, default codec). Model: `Trainer` (ZeRO-2,
the real `train_step`) around a ~0.9 M-parameter UNet that takes those tensors as they are
(`bench.models.sdxl_shaped_unet`), in float32 because this CPU has no bfloat16 arithmetic (a bf16 matmul
runs ~60x slower than fp32 here); the tensors stay bf16 on disk and in the batches. The step runs on one
torch thread, standing in for the GPU, and leaves the second core to the DataLoader workers (on a shared
2-core machine two OpenMP threads also stall for seconds whenever another process takes a core).

The loop is `Trainer.train`'s own, minus logging and checkpoints: `next(batches)` (timed: the wait), then
`train_step`, then `schedule.advance`. Loader share = sum of waits / sum of step times, after warm-up
steps (worker start-up is reported apart). Side by side, in alternating segments: the same steps with
micro-batches already in memory (no loader, no workers), which shows what the workers' CPU use costs the
step on a 2-core machine, and the loader alone (no model), which shows its headroom.
"""

from __future__ import annotations

import itertools
import shutil
import time
from pathlib import Path
from typing import Any

from latentforge.train.data import CachedBatches

from .common import ROOT, SampleSource, cli, median, row, sdxl_spec, write_cache

SIZES = {
    "full": {"samples": 1024, "micro": 4, "threads": 1, "warmup": 4, "steps": 24, "rounds": 2, "workers": 2, "prefetch": 4,
             "capacity_batches": 48, "handover_calls": 20, "kinds": ("random", "structured"), "remote_read_ahead": 16},
    "smoke": {"samples": 16, "micro": 2, "threads": 1, "warmup": 1, "steps": 2, "rounds": 1, "workers": 1, "prefetch": 2,
              "capacity_batches": 2, "handover_calls": 2, "kinds": ("random",), "remote_read_ahead": 2},
}
# Needed per GPU by SDXL at 1024x1024 on an H100 (../shared/notes/performance-anchors.md: 6-15 samples/s).
H100_SAMPLES_PER_S = 15.0


def trainer_config(model: Path, cache: Path, out: Path, cfg: dict[str, Any]) -> Any:
    from latentforge.shared.config import load_config

    return load_config(ROOT / "configs" / "demo.yaml", [
        f"model.pretrained={model}", f"cache.path={cache}", f"train.output_dir={out}",
        f"train.micro_batch_size={cfg['micro']}", "train.gradient_accumulation_steps=1",
        f"train.num_workers={cfg['workers']}", f"train.prefetch_factor={cfg['prefetch']}",
        "train.validation_every=0", "train.held_out_fraction=0", "train.ema.enabled=false",
        "train.max_steps=1000000", "train.checkpoint_every=1000000", "train.log_every=1000000",
        "deepspeed={zero_optimization: {stage: 2}, bf16: {enabled: false}}",
    ])


def loader_segment(trainer: Any, url: str, cfg: dict[str, Any], train: bool = True, steps: int | None = None,
                   opts: dict[str, Any] | None = None, read_ahead: int = 0, window: Any = None) -> dict[str, Any]:
    """Steps through the real loader: per-step wait and total seconds after warm-up; worker start-up time.
    `window` (a `ShardWindow`): the shard-window order and its reads and prefetch (whole files for one
    worker, each worker's own rows for several), as the trainer sets them up for a cache on an object store."""
    from latentforge.train.data import build_loader, shard_window_reads
    from latentforge.train.sampler import GlobalBucketSchedule, MicroBatchSampler

    reads = shard_window_reads(window, cfg["micro"], cfg["micro"], 1, cfg.get("workers", 0), read_ahead)
    schedule = (GlobalBucketSchedule(trainer.samples.bucket_sizes, cfg["micro"], trainer.config.train.seed, window)
                if window is not None else trainer.schedule)
    state = schedule.initial_state() if window is not None else trainer.state
    dataset = CachedBatches(url, opts or {}, trainer.samples.train_rows, reads.read_ahead,
                            whole_shards=reads.whole_shards, ahead_rows=reads.ahead_rows)
    sampler = MicroBatchSampler(schedule, state, 0, 1, cfg["micro"])
    loader = build_loader(dataset, sampler, trainer.config, reads.horizon)
    steps = cfg["steps"] if steps is None else steps
    waits, totals = [], []
    t_start = time.perf_counter()
    batches = iter(loader)
    first = None
    for i in range(cfg["warmup"] + steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        if first is None:
            first = t1 - t_start
        if train:
            trainer.train_step(batch)
            if window is None:
                trainer.state = trainer.schedule.advance(trainer.state)
        t2 = time.perf_counter()
        if i >= cfg["warmup"]:
            waits.append(t1 - t0)
            totals.append(t2 - t0)
    del batches  # shuts the workers down before the next segment
    return {"waits": waits, "totals": totals, "first_batch_s": first}


class PerFieldBatches(CachedBatches):
    """The layout `read_rows` returned before it built every batch in one buffer: one storage per field,
    in ordinary memory. Kept here as the side-by-side reference for the hand-over figure."""

    def __getitem__(self, mb: Any) -> dict[str, Any]:
        import torch

        batch = super().__getitem__(mb)
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}


def receive_cost(trainer: Any, url: str, dataset_cls: Any, cfg: dict[str, Any], calls: int) -> list[float]:
    """Seconds `next()` takes in the main process when the workers have the batch ready (queue full)."""
    from latentforge.train.data import build_loader
    from latentforge.train.sampler import MicroBatchSampler

    dataset = dataset_cls(url, {}, trainer.samples.train_rows)
    loader = build_loader(dataset, MicroBatchSampler(trainer.schedule, trainer.state, 0, 1, cfg["micro"]), trainer.config)
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    out = []
    for _ in range(calls):
        time.sleep(0.1)  # let the workers refill the queue: what is left is the hand-over itself
        t = time.perf_counter()
        next(batches)
        out.append(time.perf_counter() - t)
    del batches
    return out


def memory_segment(trainer: Any, url: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The same kind of steps with micro-batches read beforehand (main process, outside the timing)."""
    from latentforge.train.sampler import MicroBatchSampler

    dataset = CachedBatches(url, {}, trainer.samples.train_rows)
    sampler = MicroBatchSampler(trainer.schedule, trainer.state, 0, 1, cfg["micro"])
    ready = [dataset[mb] for mb in itertools.islice(iter(sampler), cfg["warmup"] + cfg["steps"])]
    totals = []
    for i, batch in enumerate(ready):
        t0 = time.perf_counter()
        trainer.train_step(batch)
        trainer.state = trainer.schedule.advance(trainer.state)
        if i >= cfg["warmup"]:
            totals.append(time.perf_counter() - t0)
    return {"totals": totals}


def run(size: str, workdir: Path) -> dict[str, Any]:
    import torch

    from latentforge.train.trainer import Trainer

    from . import models

    cfg = SIZES[size]
    n = cfg["samples"]
    torch.set_num_threads(cfg["threads"])
    caches = {}
    write_s = {}
    for kind in cfg["kinds"]:
        path = workdir / f"cache-{kind}"
        shutil.rmtree(path, ignore_errors=True)
        write_s[kind] = write_cache(path, sdxl_spec("blosc-lz4"), SampleSource(kind), n, rows_per_group=min(n, 512))
        caches[kind] = path
    model = models.pipeline_folder(workdir, workdir / "model", unet_model=models.sdxl_shaped_unet(), keep_text=False)
    out = workdir / "run"
    shutil.rmtree(out, ignore_errors=True)
    trainer = Trainer(trainer_config(model, caches["random"], out, cfg))
    results: dict[str, dict[str, list]] = {k: {"waits": [], "totals": [], "memory": [], "first": []} for k in caches}
    for _ in range(cfg["rounds"]):
        for kind, path in caches.items():
            seg = loader_segment(trainer, str(path), cfg)
            results[kind]["waits"] += seg["waits"]
            results[kind]["totals"] += seg["totals"]
            results[kind]["first"].append(seg["first_batch_s"])
            results[kind]["memory"] += memory_segment(trainer, str(path), cfg)["totals"]
    handover: dict[str, list[float]] = {"shipped": [], "per_field": []}
    for _ in range(cfg["rounds"]):
        handover["shipped"] += receive_cost(trainer, str(caches["random"]), CachedBatches, cfg, cfg["handover_calls"])
        handover["per_field"] += receive_cost(trainer, str(caches["random"]), PerFieldBatches, cfg, cfg["handover_calls"])
    capacity = {}
    for kind, path in caches.items():
        seg = loader_segment(trainer, str(path), {**cfg, "warmup": 2}, train=False, steps=cfg["capacity_batches"])
        capacity[kind] = cfg["micro"] * len(seg["totals"]) / sum(seg["totals"])

    # The same steps reading the random cache from an object store that answers each request after 20 ms
    # (loopback moto, `devkit/object_store.py`), as the trainer reads a remote cache by default: read-ahead,
    # shard-window order (window of 2 shard files), each worker's reads as the trainer sets them up.
    import os

    from latentforge.devkit.object_store import loopback_s3, upload_tree
    from latentforge.train.data import shard_window_for

    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    os.environ.pop("AWS_PROFILE", None)
    with loopback_s3(process=True) as server:
        upload_tree(server.endpoint, str(caches["random"]), "s3://bench/cache")
        server.latency_s = 0.02
        window = shard_window_for(trainer.cache, trainer.samples.train_rows, 2)
        remote = loader_segment(trainer, "s3://bench/cache", cfg, opts={"endpoint_url": server.endpoint},
                                read_ahead=cfg["remote_read_ahead"], window=window)
    remote_share = sum(remote["waits"]) / sum(remote["totals"])

    figs: dict[str, dict[str, float]] = {}
    for kind, r in results.items():
        share = sum(r["waits"]) / sum(r["totals"])
        step_loader, step_mem = median(r["totals"]), median(r["memory"])
        figs[kind] = {
            "loader_share": share, "step_s_with_loader": step_loader, "step_s_in_memory": step_mem,
            "step_time_vs_in_memory": step_loader / step_mem, "samples_per_s_training": cfg["micro"] / step_loader,
            "loader_only_samples_per_s": capacity[kind], "median_wait_ms": 1e3 * median(r["waits"]),
            "max_wait_ms": 1e3 * max(r["waits"]), "worker_start_s": median(r["first"]), "steps_timed": len(r["totals"]),
        }
    rnd, st = figs["random"], figs.get("structured")
    table = [
        row("loader share of step time (random-normal data)", 100 * rnd["loader_share"], "%", "<= 2 %",
            rnd["loader_share"] <= 0.02,
            f"{rnd['steps_timed']} steps, micro-batch {cfg['micro']}, {cfg['workers']} workers; median wait "
            f"{rnd['median_wait_ms']:.2f} ms, max {rnd['max_wait_ms']:.1f} ms, step {rnd['step_s_with_loader']:.3f} s"),
        row("loader share of step time, cache on an object store at 20 ms per request", 100 * remote_share, "%",
            "<= 2 %", remote_share <= 0.02,
            f"{len(remote['totals'])} steps, {cfg['workers']} workers, read-ahead {cfg['remote_read_ahead']}, shard-window "
            f"order (2 files), {'whole files' if cfg['workers'] <= 1 else 'each worker its own rows'}; median wait "
            f"{1e3 * median(remote['waits']):.2f} ms, max {1e3 * max(remote['waits']):.1f} ms, worker start "
            f"{remote['first_batch_s']:.1f} s"),
        row("  step time with loader / with batches in memory (random)", rnd["step_time_vs_in_memory"], "x", "", None,
            f"{rnd['step_s_with_loader']:.3f} vs {rnd['step_s_in_memory']:.3f} s median step (the 2 workers run on "
            "the same 2 cores as the step)"),
        row("  loader alone, samples/s (random)", rnd["loader_only_samples_per_s"], "samples/s", "", None,
            f"{rnd['loader_only_samples_per_s'] / H100_SAMPLES_PER_S:.0f}x the ~{H100_SAMPLES_PER_S:.0f} samples/s an H100 trains SDXL at"),
        row("  hand-over of a ready micro-batch to the main process (one shared-memory buffer per batch)",
            1e3 * median(handover["shipped"]), "ms", "", None,
            f"median of {len(handover['shipped'])} next() calls with the prefetch queue full"),
        row("  same, one ordinary storage per field (the layout before)", 1e3 * median(handover["per_field"]), "ms",
            "", None, f"{median(handover['per_field']) / median(handover['shipped']):.2f}x the shipped hand-over"),
    ]
    if st is not None:
        table[1:1] = [row("loader share of step time (structured data)", 100 * st["loader_share"], "%", "<= 2 %",
                          st["loader_share"] <= 0.02,
                          f"median wait {st['median_wait_ms']:.2f} ms, max {st['max_wait_ms']:.1f} ms")]
        table.insert(4, row("  loader alone, samples/s (structured)", st["loader_only_samples_per_s"], "samples/s", "", None, ""))
    return {
        "name": "loader_share", "table": table,
        "summary": {"loader_share": rnd["loader_share"], "loader_share_objstore_20ms": remote_share},
        "config": {**cfg, "codec": "blosc-lz4", "model_params": sum(p.numel() for p in trainer.engine.module.parameters()),
                   "torch_threads": torch.get_num_threads(), "dtype": "float32 compute, bfloat16 cache",
                   "cache_writes_per_s": {k: n / v for k, v in write_s.items()}},
        "figures": figs,
        "handover_s": handover,
        "raw": {k: {"waits": r["waits"], "totals": r["totals"], "memory": r["memory"]} for k, r in results.items()},
    }


if __name__ == "__main__":
    raise SystemExit(cli(run, "loader_share"))
