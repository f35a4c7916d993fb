"""One rank of the cache job: claim an input shard, read, prepare, encode, write, commit; repeat.

Distribution: every rank lists the same shards in the same order (largest first, so the long ones do
not end up last). With several ranks (torchrun), a shard is claimed through an atomic counter in the
launcher's TCP store: no collective in the hot path, and a fast rank simply claims more shards. Each
shard becomes one cache group, committed atomically; a re-run skips groups committed with the same
fingerprint and input identity, so a crash loses at most the shards in flight. The output of a shard
depends only on the shard and the config, so one rank or many give the same cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from latentforge.preprocess.buckets import buckets_by_resolution, generate_bucket_set
from latentforge.preprocess.cache_writer import CacheWriter
from latentforge.preprocess.overlap import WriteBehind, ordered_map, timed_reads, waited
from latentforge.shared.cache_fingerprint import (
    UPSCALE_WEIGHT_SETTINGS,
    compute_fingerprint,
    fingerprint_inputs,
)
from latentforge.shared.cache_format import CacheSpec, GroupManifest, SourceOrigin
from latentforge.shared.config import Config, ConfigError, SourceConfig, load_config
from latentforge.shared.entry import add_run_args, run_guarded
from latentforge.shared.families import cached_fields, text_field_names, with_caption_variants
from latentforge.shared.file_hash import sha256_file
from latentforge.shared.preflight import check_model_paths

from .caption_memo import CaptionMemo
from .captions import encode_variants, variant_settings
from .dedupe import dedupe_across_shards, duplicate_owners_unchanged
from .determinism import pin_deterministic, restored_backends
from .distributed import shard_claims
from .encoders import load_latent_encoder, model_identity
from .families import load_text_encoder
from .generate import generate_class_images, generate_sources
from .images import SkipSample
from .model_source import pinned_config, resolve_model_sources
from .prepare import Prepared, Preparer, method_code
from .prepare_pool import PreparePool
from .report import ShardStats, print_summary, write_summary
from .source_checks import SkipCounter
from .sources import ShardRef, iter_shard, list_shards
from .upscale import Upscaler

log = logging.getLogger("latentforge.cache")
PIPELINE_VERSION = 1  # bump when image preparation changes what is cached for the same inputs


class CacheJob:
    """Everything one rank needs: config, models, writer, and the loop over claimed shards."""

    def __init__(self, config: Config, rank: int = 0, world: int = 1, overwrite: bool = False) -> None:
        self.config, self.rank, self.world = config, rank, world
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if config.cache.deterministic:
            pin_deterministic(self.device)  # no oneDNN, one CPU thread, deterministic cuDNN (determinism.py)
        # Hub revisions resolve to commits once, first: every encoder loads the commit the fingerprint records.
        self.sources = resolve_model_sources(config)
        pinned = pinned_config(config, self.sources)
        try:
            self.vae = load_latent_encoder(pinned, self.device, self.sources)
        except OSError as exc:
            raise _load_error("model.vae" if config.model.vae else "model.pretrained",
                              config.model.vae or config.model.pretrained, "VAE", exc) from None
        try:
            self.text = load_text_encoder(pinned, self.device)
        except OSError as exc:
            raise _load_error("model.pretrained", config.model.pretrained, "text encoders", exc) from None
        self.captions = CaptionMemo(self.text.encode)  # each distinct caption of a shard encoded once
        self.resolutions = buckets_by_resolution(config.buckets.resolutions, config.buckets.step,
                                                 config.buckets.min_aspect, config.buckets.max_aspect,
                                                 config.buckets.aspect_ratios)
        self.upscaler = Upscaler.from_config(config.upscale, self.device) if config.upscale.enabled else None
        self.spec = self._build_spec()
        self.writer = CacheWriter(config.cache.path, self.spec, dict(config.cache.storage_options), overwrite=overwrite)
        self.preparer = Preparer(config, self.resolutions, self.upscaler)
        # Worker processes for preparation; an upscale model keeps it on threads (the model is on this device).
        procs = config.cache.prepare_processes if self.upscaler is None or not self.upscaler.uses_model else 0
        self.prepare_pool = PreparePool(config, self.resolutions, procs) if procs else None
        if self.prepare_pool is not None:
            self.prepare_pool.start()  # boots while the writer opens; `run` waits before the first shard
        self.overwrite = overwrite
        self.failed_shards: list[str] = []

    def _build_spec(self) -> CacheSpec:
        cfg = self.config
        upscale = cfg.upscale.model_dump()
        # The upscaler weights count by content, not by where they are.
        weights = {k: sha256_file(upscale[k]) if upscale[k] and os.path.isfile(upscale[k]) else None
                   for k in UPSCALE_WEIGHT_SETTINGS}
        inputs = fingerprint_inputs(pipeline_version=PIPELINE_VERSION, family=cfg.model.family,
                                    model=model_identity(cfg, self.sources), cache=cfg.cache.model_dump(),
                                    buckets=cfg.buckets.model_dump(), upscale=upscale, upscale_weights=weights)
        control = None if cfg.cache.conditioning.kind == "none" else cfg.cache.conditioning.kind
        fields = cached_fields(cfg.model.family, latent_channels=self.vae.latent_channels, latent_mode=cfg.cache.latent_mode,
                               store_dtype=cfg.cache.store_dtype, text_tokens=self.text.tokens,
                               text_dim=self.text.text_dim, pooled_dim=self.text.pooled_dim, conditioning=control)
        fields = with_caption_variants(fields, cfg.model.family, cfg.cache.caption_variants)
        return CacheSpec(
            family=cfg.model.family, fingerprint=compute_fingerprint(inputs), fields=fields,
            buckets=generate_bucket_set(cfg.buckets.resolutions, cfg.buckets.step, cfg.buckets.min_aspect, cfg.buckets.max_aspect,
                                        cfg.buckets.aspect_ratios),
            latent_channels=self.vae.latent_channels, vae_downsample=self.vae.downsample,
            scaling_factor=self.vae.scaling_factor, shift_factor=self.vae.shift_factor,
            latent_mode=cfg.cache.latent_mode, store_dtype=cfg.cache.store_dtype, codec=cfg.cache.codec,
            shard_rows=cfg.cache.shard_rows, fingerprint_inputs=inputs, model_location=self.sources.location(),
            conditioning=control,
        )

    # ---- prompts --------------------------------------------------------------------------------
    def cache_prompts(self) -> None:
        """The empty prompt (caption dropout at train time) and the validation prompts."""
        prompts = list(self.config.data.validation_prompts)
        names = text_field_names(self.config.model.family)
        marker = "prompts/commit.json"
        store = self.writer.storage
        if not self.overwrite and store.exists(marker):
            doc = json.loads(store.read_text(marker))
            if doc.get("fingerprint") == self.spec.fingerprint and doc.get("prompts") == prompts:
                return
        enc = self.text.encode(["", *prompts])
        empty = {k: enc[k][:1] for k in names}
        validation = {k: enc[k][1:] for k in names}
        self.writer.write_prompts(empty, prompts, validation, marker={"fingerprint": self.spec.fingerprint, "prompts": prompts})

    # ---- shards ---------------------------------------------------------------------------------
    def source_hash(self, ref: ShardRef, source: SourceConfig) -> str:
        """Input identity plus the per-source settings that change which samples a shard yields."""
        doc = {"identity": ref.identity_hash, "caption_field": source.caption_field,
               "filters": [f.model_dump() for f in source.filters], **variant_settings(source, self.config.cache.caption_variants)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def cache_shard(self, ref: ShardRef, source: SourceConfig) -> GroupManifest | None:
        """Read, prepare, encode and commit one input shard as one group."""
        cfg = self.config
        self.captions.reset()  # a shard's rows depend on that shard alone
        skips = SkipCounter(max_examples=1000)
        stats = ShardStats(rank=self.rank)
        reader = iter_shard(ref, source, skips, cfg.cache.missing_caption, sidecar_name(cfg))
        group = self.writer.group(ref.group_id, {"url": ref.display_url, "kind": ref.kind},
                                  self.source_hash(ref, source),
                                  origin=SourceOrigin.of(ref.source_index, source.type, source.path))
        t_read = time.perf_counter()
        writes = WriteBehind()  # compress and write a batch while the encoder computes the next
        try:
            self._prepare_encode_write(reader, group, writes, stats, skips)
        finally:
            writes.close()
        stats.add("write", writes.written)
        stats.add("write_wait", writes.waited)
        if reader.error == "shard_unreadable":
            # Possibly transient (network, permissions): leave it uncommitted so the next run retries it.
            group.abort()
            return None
        t = time.perf_counter()
        group.flush()
        stats.add("write", time.perf_counter() - t)
        stats.add("total", time.perf_counter() - t_read)
        # Samples the reader dropped (no caption, bad json, ...) were read too: `seen` counts every
        # sample, so skipped / seen is a true fraction (cache.max_skip_fraction).
        stats.seen += reader.skipped_samples
        stats.skipped = sum(skips.counts.values())
        return group.commit(skipped=skips.as_dict(), stats={**stats.as_dict(), "input_content_hash": reader.content_hash})

    def _timed_prepare(self, raw: Any) -> tuple[list[Prepared] | SkipSample, float]:
        t = time.perf_counter()
        try:
            return self.preparer(raw), time.perf_counter() - t
        except SkipSample as exc:
            return exc, time.perf_counter() - t

    def _prepared(self, raws: Iterable[Any]) -> Iterator[tuple[Any, list[Prepared] | SkipSample, float]]:
        """`(raw, items or SkipSample, seconds)` in input order, prepared ahead of the encoder on worker
        processes (`cache.prepare_processes`) or threads (`cache.workers`)."""
        workers = self.config.cache.workers
        if self.prepare_pool is not None:  # as many samples ahead as the threads would have
            yield from self.prepare_pool.map(raws, ahead=4 * max(workers, self.prepare_pool.processes))
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prepare") as pool:
            for raw, future in ordered_map(pool, self._timed_prepare, raws, ahead=4 * workers):
                yield raw, *future.result()

    def _prepare_encode_write(self, reader: Any, group: Any, writes: WriteBehind, stats: ShardStats,
                              skips: SkipCounter) -> None:
        """Prepare samples ahead of the encoder (`_prepared`), encode full bucket batches, hand their rows
        to the write thread."""
        cfg = self.config
        pending: dict[tuple[int, int], list[Prepared]] = {}
        for raw, result, seconds in waited(self._prepared(timed_reads(reader, stats)), stats):
            stats.add("prepare", seconds)
            stats.seen += 1
            if isinstance(result, SkipSample):
                skips.skip(result.reason, f"{raw.key}: {result.detail}")
                continue
            for item in result:
                stats.count_upscale(item.upscale_method)
                batch = pending.setdefault(item.bucket, [])
                batch.append(item)
                if len(batch) >= cfg.cache.batch_size:
                    self._encode_and_add(group, item.bucket, pending.pop(item.bucket), stats, skips, writes)
        for bucket in sorted(pending):
            self._encode_and_add(group, bucket, pending[bucket], stats, skips, writes)

    def _encode_and_add(self, group: Any, bucket: tuple[int, int], items: list[Prepared], stats: ShardStats,
                        skips: SkipCounter, writes: WriteBehind) -> None:
        try:
            rows = self._encode(items, stats)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            if len(items) == 1:
                skips.skip("encoder_error", f"{items[0].key}: {exc.__class__.__name__}: {str(exc)[:200]}")
                return
            for item in items:  # find the one sample that fails; keep the rest
                self._encode_and_add(group, bucket, [item], stats, skips, writes)
            return
        writes.submit(group.add, bucket, rows)

    def _encode(self, items: list[Prepared], stats: ShardStats) -> dict[str, Any]:
        t = time.perf_counter()
        latents = self.vae.encode(torch.stack([p.pixels for p in items]))
        stats.add("vae", time.perf_counter() - t)
        t = time.perf_counter()
        text = self.captions.encode([p.caption for p in items])
        stats.add("text", time.perf_counter() - t)
        rows: dict[str, Any] = {"latent_mean": latents["latent_mean"]}
        if self.config.cache.latent_mode == "dist":
            rows["latent_std"] = latents["latent_std"]
        rows.update(text)
        rows.update(encode_variants(self.captions.encode, [p.captions for p in items],
                                    text_field_names(self.config.model.family)))
        rows["original_size"] = np.array([p.original_size for p in items], np.int32)
        rows["crop_top_left"] = np.array([p.crop_top_left for p in items], np.int32)
        rows["target_size"] = np.array([p.bucket for p in items], np.int32)
        rows["content_hash"] = np.frombuffer(b"".join(p.content_hash for p in items), np.uint8).reshape(len(items), 16)
        rows["key"] = [p.key for p in items]
        rows["upscale_method"] = np.array([method_code(p.upscale_method) for p in items], np.uint8)
        if self.spec.conditioning:
            rows["conditioning"] = np.stack([p.control for p in items])
        return rows

    # ---- the loop -------------------------------------------------------------------------------
    def run(self, claim: Callable[[], int], shards: list[ShardRef] | None = None) -> list[ShardStats | GroupManifest]:
        """Process shards handed out by `claim` (the next index into the shared shard order)."""
        sources = self.config.data.sources
        shards = list_input_shards(self.config) if shards is None else shards
        committed = {} if self.overwrite else self.writer.committed()
        current = {ref.group_id: self.source_hash(ref, sources[ref.source_index]) for ref in shards}
        done: list[Any] = []
        from tqdm import tqdm

        bar = tqdm(total=len(shards), desc=f"cache rank {self.rank}", unit="shard", position=self.rank, disable=None)
        try:
            if self.prepare_pool is not None:
                self.prepare_pool.wait_ready()
            while (index := claim()) < len(shards):
                ref = shards[index]
                source = sources[ref.source_index]
                # Done only if it also records this source as now written: the trainer finds sources by path.
                if (self.writer.is_done(ref.group_id, current[ref.group_id], committed)
                        and committed[ref.group_id].origin == SourceOrigin.of(ref.source_index, source.type, source.path)
                        and duplicate_owners_unchanged(committed[ref.group_id], current)):
                    bar.update(1)
                    continue
                manifest = self.cache_shard(ref, source)
                bar.update(1)
                if manifest is None:
                    self.failed_shards.append(ref.display_url)
                    continue
                done.append(manifest)
                _fault_point(len(done))
                bar.set_postfix(samples=manifest.num_samples, skipped=sum(v["count"] for v in manifest.skipped.values()))
        finally:
            if self.prepare_pool is not None:  # on an error too: no worker process outlives the job
                self.prepare_pool.close()
        bar.close()
        return done


def list_input_shards(config: Config) -> list[ShardRef]:
    """Every input shard, in the order ranks claim them (largest first). A source that cannot be listed
    is a config error (one line naming data.sources[i]), raised before anything is written."""
    try:
        refs = list_shards(config.data.sources, sidecar_name(config))
    except ValueError as exc:
        raise ConfigError(f"config error: {exc}") from None
    return sorted(refs, key=lambda r: (-int(r.identity.get("size") or 0), r.group_id))


def sidecar_name(config: Config) -> str | None:
    """The sidecar maps' name part (`KEY.<name>.png`) when the cache stores sidecar control images."""
    return config.cache.conditioning.sidecar if config.cache.conditioning.kind == "sidecar" else None


def _load_error(key: str, value: str, what: str, exc: BaseException) -> ConfigError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return ConfigError(f"config error: {key}: cannot load the {what} from {value!r} ({first})")


def _fault_point(commits: int) -> None:
    """Fault-injection hook for the crash tests: SIGKILL this process after N committed shards."""
    limit = os.environ.get("LATENTFORGE_FAULT_KILL_AFTER_COMMITS")
    if limit and commits >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)


def run_cache(config: Config, overwrite: bool = False) -> int:
    """Run this process's share of the cache job; rank 0 writes the summary. Returns an exit code."""
    with restored_backends():
        return _run_cache(config, overwrite)


def _run_cache(config: Config, overwrite: bool) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # Everything that can be checked without loading a model or writing a byte, first.
    check_model_paths(config)
    generating = generate_sources(config)
    shards = None if generating else list_input_shards(config)
    _quiet_libraries()
    rank, world, claim, barrier = shard_claims()
    if generating:  # class images first (each rank its share), then every rank lists the completed folders
        local = int(os.environ.get("LOCAL_RANK", "0"))
        generate_class_images(config, rank, world, torch.device(f"cuda:{local}") if torch.cuda.is_available()
                              else torch.device("cpu"))
        barrier()
        shards = list_input_shards(config)
    t0, started = time.perf_counter(), time.time()
    job = CacheJob(config, rank, world, overwrite)
    if rank == 0:
        job.cache_prompts()
    done = job.run(claim, shards)
    log.info("rank %d: %d shards cached in %.1f s", rank, len(done), time.perf_counter() - t0)
    for url in job.failed_shards:
        log.warning("rank %d: shard %s could not be read; not committed, the next run retries it", rank, url)
    barrier()
    if rank != 0:
        return 0
    dedupe_across_shards(job.writer, config.cache.storage_options)
    removed = job.writer.remove_litter(before=started)
    if removed:
        log.info("removed %d leftovers of interrupted writes from earlier runs", removed)
    summary = write_summary(job.writer, config, elapsed=time.perf_counter() - t0, world=world)
    print_summary(summary)
    seen = summary["samples_seen"]
    if seen and summary["skipped_total"] / seen > config.cache.max_skip_fraction:
        print(f"cache: {summary['skipped_total']} of {seen} samples skipped, above cache.max_skip_fraction="
              f"{config.cache.max_skip_fraction}; the committed work is kept", file=sys.stderr)
        return 1
    return 0


def _quiet_libraries() -> None:
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        dlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def cli_entry(args: argparse.Namespace) -> int:
    """`latentforge cache --config FILE [overrides] [--overwrite]`."""
    config = load_config(args.config, args.overrides)
    return run_cache(config, overwrite=args.overwrite)


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of `latentforge cache` and `python -m latentforge.preprocess`."""
    add_run_args(p)
    p.add_argument("--overwrite", action="store_true", help="recompute every shard, even those already committed")


def main(argv: list[str] | None = None) -> int:
    """torchrun entry: `torchrun --nproc_per_node N -m latentforge.preprocess --config FILE ...`."""
    parser = argparse.ArgumentParser(prog="python -m latentforge.preprocess", description="the cache job")
    configure(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return run_guarded("cache", cli_entry, args)
