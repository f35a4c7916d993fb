"""What the user sees at the end of a cache job, also written as `CACHE/summary.json`.

The summary is built from the committed group manifests, not from in-memory counters, so it describes
the whole cache (all ranks, earlier resumed runs included) and can never count work that was lost.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from latentforge.preprocess.cache_writer import CacheWriter
from latentforge.shared.config import Config
from latentforge.shared.families import ALT_SUFFIX

# write: on the write thread; prepare: on workers; *_wait: the encoder's thread blocked on them
PHASES = ("read", "prepare", "prepare_wait", "vae", "text", "write", "write_wait", "total")


@dataclass
class ShardStats:
    """Seconds per phase, samples seen and upscale paths for one shard, and the rank that cached it (stored in
    its manifest)."""

    seconds: dict[str, float] = field(default_factory=dict)
    upscale: Counter = field(default_factory=Counter)
    seen: int = 0
    skipped: int = 0
    rank: int = 0

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def count_upscale(self, method: str) -> None:
        self.upscale[method] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": {k: round(v, 4) for k, v in self.seconds.items()}, "upscale": dict(self.upscale),
                "seen": self.seen, "finished_at": time.time(), "peak_host_mb": peak_host_mb(), "rank": self.rank}


def peak_host_mb() -> float:
    """Peak resident host memory of this process so far plus the peaks of its live child processes (the
    image preparation workers, `cache.prepare_processes`), MB: what one cache rank needs of host RAM."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    own = peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
    return round(own + _children_peak_kib() / 1024, 1)


def _children_peak_kib() -> int:
    """Sum of VmHWM (peak resident KiB) over this process's live descendants; 0 where /proc is missing."""
    import os

    total, frontier, seen = 0, [os.getpid()], set()
    while frontier:
        pid = frontier.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            for kid in kids:
                if kid in seen:
                    continue
                seen.add(kid)
                frontier.append(kid)
                try:
                    with open(f"/proc/{kid}/status") as f:
                        total += next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
                except OSError:
                    pass
    return total


def build_summary(writer: CacheWriter, config: Config, elapsed: float, world: int) -> dict[str, Any]:
    """Totals over every committed group with this cache's fingerprint."""
    groups = [m for m in writer.committed().values() if m.fingerprint == writer.spec.fingerprint]
    buckets: Counter = Counter()
    skips: Counter = Counter()
    upscale: Counter = Counter()
    seconds: Counter = Counter()
    seen = size = alt = 0
    peak_by_rank: dict[int, float] = {}
    for m in groups:
        if "peak_host_mb" in m.stats:  # a rank's peak so far at each commit, its models' loading included
            rank = int(m.stats.get("rank", 0))  # manifests written before ranks were recorded count as rank 0
            peak_by_rank[rank] = max(peak_by_rank.get(rank, 0.0), float(m.stats["peak_host_mb"]))
        buckets.update(m.bucket_counts)
        skips.update({reason: entry["count"] for reason, entry in m.skipped.items()})
        upscale.update(m.stats.get("upscale", {}))
        seconds.update(m.stats.get("seconds", {}))
        seen += int(m.stats.get("seen", 0))
        size += sum(m.files.values())
        # Files are "<bucket>/<field>/...": what the caption variants' `*_alt` fields cost on disk.
        alt += sum(n for f, n in m.files.items() if f.split("/")[1:2] and f.split("/")[1].endswith(ALT_SUFFIX))
    samples = sum(buckets.values())
    return {
        "cache": writer.storage.url,
        "fingerprint": writer.spec.fingerprint,
        "groups": len(groups),
        "samples": samples,
        "samples_seen": seen,
        "skipped_total": sum(skips.values()),
        "buckets": dict(sorted(buckets.items(), key=lambda kv: -kv[1])),
        "skip_reasons": dict(skips.most_common()),
        "upscale": dict(upscale.most_common()),
        "seconds_by_phase": {p: round(seconds.get(p, 0.0), 2) for p in PHASES},
        "bytes_on_disk": size,
        "bytes_per_sample": round(size / samples) if samples else 0,
        "caption_variants": {"per_sample": config.cache.caption_variants, "bytes_on_disk": alt,
                             "bytes_per_sample": round(alt / samples) if samples else 0},
        "wall_seconds": round(elapsed, 2),
        "processes": world,
        "peak_host_mb_per_rank": max(peak_by_rank.values(), default=0.0),  # the largest over the ranks
        "peak_host_mb_by_rank": {str(r): peak_by_rank[r] for r in sorted(peak_by_rank)},
        "images_per_second": round(seen / elapsed, 2) if elapsed > 0 else 0.0,
    }


def write_summary(writer: CacheWriter, config: Config, elapsed: float, world: int) -> dict[str, Any]:
    summary = build_summary(writer, config, elapsed, world)
    writer.storage.write_text_atomic("summary.json", json.dumps(summary, indent=2))
    return summary


def print_summary(s: dict[str, Any]) -> None:
    """A short human report; the JSON beside the cache has everything."""
    print(f"cache {s['cache']}: {s['samples']} samples in {s['groups']} groups, {len(s['buckets'])} buckets; "
          f"{s['skipped_total']} skipped of {s['samples_seen']} read")
    print("  buckets: " + ", ".join(f"{b}={n}" for b, n in s["buckets"].items()))
    if s["skip_reasons"]:
        print("  skipped: " + ", ".join(f"{r}={n}" for r, n in s["skip_reasons"].items()))
    if s["upscale"]:
        print("  resize path: " + ", ".join(f"{m}={n}" for m, n in s["upscale"].items()))
    print("  seconds (summed over shards): " + ", ".join(f"{p} {v}" for p, v in s["seconds_by_phase"].items()))
    if s.get("peak_host_mb_per_rank"):
        ranks = s.get("peak_host_mb_by_rank", {})
        each = f" ({', '.join(f'rank {r} {mb:.0f}' for r, mb in ranks.items())})" if len(ranks) > 1 else ""
        print(f"  peak host memory per rank: {s['peak_host_mb_per_rank']:.0f} MB{each}")
    variants = s["caption_variants"]
    if variants["per_sample"] > 1:
        print(f"  {variants['per_sample']} captions per sample: the extra ones take {variants['bytes_on_disk'] / 1e6:.1f} MB, "
              f"{variants['bytes_per_sample']} bytes/sample")
    print(f"  {s['bytes_on_disk'] / 1e6:.1f} MB on disk, {s['bytes_per_sample']} bytes/sample; "
          f"{s['wall_seconds']} s wall, {s['processes']} process(es)")
