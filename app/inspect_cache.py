"""`latentforge inspect CACHE`: what a cache holds, pictures of it, and a full integrity check.

A tool over the shared cache format only (`cache_format`, `cache_reader`, `buckets`): it never imports
the cache job or the trainer, so it runs on a machine that has neither set up.

* The summary comes from `cache.json` and the committed groups' manifests (sizes, bucket counts, skip
  reasons), plus the cached `upscale_method` field and `CACHE/summary.json` when the job wrote one.
* `buckets.png` and the `grid-<HxW>.png` of decoded samples are drawn by `inspect_draw.py`, with the VAE
  `inspect_vae.py` finds: `--model`, the hub model the cache records, or the folder cache.json records
  as a location hint when its VAE weight hashes still match the fingerprint.
* `--verify` (in `cache_verify.py`) reads every committed group in full through zarr-python (independent of the
  trainer's reader), checks shapes, dtypes, NaN/Inf, the recorded sizes and the crop geometry, and runs
  `CacheReader.verify(checksums=True)` for file sizes and crc32. Problems print one per line, naming the
  file and the shard (group); the command then exits 1.

Module-level imports stay light (the `latentforge` parser imports `configure` for every command);
numpy/torch/zarr/PIL/diffusers load when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

EXIT_PROBLEMS = 1
EXIT_USAGE = 2
DEFAULT_PER_BUCKET = 8


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache", help="cache folder or fsspec URL (the cache job's cache.path)")
    p.add_argument("--out", help="folder for the PNGs (default: CACHE/inspect; ./inspect-<name> for remote caches)")
    p.add_argument("--verify", action="store_true",
                   help="read every committed group in full and check shapes, dtypes, NaN/Inf, sizes, crops, "
                        "file sizes and crc32; exit 1 on any problem")
    p.add_argument("--per-bucket", type=int, default=DEFAULT_PER_BUCKET, metavar="N",
                   help=f"samples decoded into grid-<HxW>.png per bucket (default {DEFAULT_PER_BUCKET}; 0: no grids, "
                        "no model needed)")
    p.add_argument("--model", help="diffusers pipeline folder (or VAE folder) whose VAE decodes the grids "
                                   "(default: the cache's hub model, or the folder cache.json records when its "
                                   "VAE weights still match)")


# ---- summary ---------------------------------------------------------------------------------------------
def summarize(reader: Any) -> dict[str, Any]:
    """Everything the printed summary shows, as plain data (also what the tests look at)."""
    from latentforge.shared.cache_format import bucket_name

    spec = reader.spec
    skips: Counter = Counter()
    examples: dict[str, list[str]] = {}
    upscale_stats: Counter = Counter()
    by_field: Counter = Counter()
    seen = 0
    for g in reader.groups:
        for reason, entry in g.skipped.items():
            entry = entry if isinstance(entry, dict) else {"count": entry}
            skips[reason] += int(entry.get("count", 0))
            examples.setdefault(reason, []).extend(str(e) for e in entry.get("examples", [])[:3])
        upscale_stats.update(g.stats.get("upscale", {}))
        seen += int(g.stats.get("seen", 0))
        for rel, nbytes in g.files.items():
            parts = rel.split("/")
            by_field[parts[1] if len(parts) > 2 else "(group metadata)"] += int(nbytes)
    counts = reader.bucket_counts()
    samples = reader.num_samples
    total_bytes = sum(by_field.values())
    job_summary = None
    if reader.storage.exists("summary.json"):
        try:
            job_summary = json.loads(reader.storage.read_text("summary.json"))
        except ValueError:
            job_summary = {"error": "summary.json is not valid JSON"}
    return {
        "cache": reader.url,
        "format_version": spec.format_version,
        "family": spec.family,
        "fingerprint": spec.fingerprint,
        "model": describe_model(spec.fingerprint_inputs.get("model")),
        "model_location": describe_location(spec.model_location),
        "samples": samples,
        "groups": len(reader.groups),
        "stale_groups": list(reader.stale_groups),
        "samples_seen": seen,
        "buckets": {bucket_name(b): counts.get(b, 0) for b in _bucket_order(spec.buckets, counts)},
        "fields": [{"name": f.name, "shape": list(f.shape), "dtype": f.dtype, "description": f.description}
                   for f in spec.fields],
        "bytes_total": total_bytes,
        "bytes_per_sample": round(total_bytes / samples) if samples else 0,
        "bytes_per_sample_by_field": {k: round(v / samples) if samples else 0 for k, v in by_field.most_common()},
        "skip_reasons": dict(skips.most_common()),
        "skip_examples": {k: v[:3] for k, v in examples.items()},
        "job_summary": job_summary,
        "upscale": upscale_counts(reader) or dict(upscale_stats.most_common()),
    }


def _bucket_order(spec_buckets: Any, counts: dict[tuple[int, int], int]) -> list[tuple[int, int]]:
    """The spec's buckets in its order (tall to wide), then any committed bucket the spec does not list."""
    order = list(spec_buckets) + sorted(b for b in counts if b not in spec_buckets)
    if len(order) > 48:  # many resolutions: only the buckets that hold samples
        order = [b for b in order if counts.get(b, 0)]
    return order


def upscale_counts(reader: Any) -> dict[str, int]:
    """How samples reached their bucket, counted from the cached `upscale_method` field."""
    import numpy as np

    from latentforge.shared.cache_format import UPSCALE_METHODS

    if "upscale_method" not in {f.name for f in reader.spec.fields}:
        return {}
    names = {code: name for name, code in UPSCALE_METHODS.items()}
    total: Counter = Counter()
    for bucket, n in reader.bucket_counts().items():
        codes = reader.read_rows(bucket, np.arange(n), fields=["upscale_method"])["upscale_method"]
        total.update(names.get(int(c), f"unknown code {int(c)}") for c in codes.reshape(-1).tolist())
    return dict(total.most_common())


def describe_model(ident: Any) -> str:
    """One line naming the model a cache was made with, from `fingerprint_inputs["model"]`."""
    if not isinstance(ident, dict) or not ident:
        return "not recorded"
    parts = []
    for part in ("vae", "text"):
        entry = ident.get(part)
        if not isinstance(entry, dict):
            continue
        if "hub_id" in entry:
            variant = f" ({entry['variant']})" if entry.get("variant") else ""
            commit = f" = commit {entry['commit'][:12]}" if entry.get("commit") else ""
            parts.append(f"{part}: {entry['hub_id']}@{entry.get('revision', 'main')}{commit}{variant}")
        elif "files" in entry:
            weights = [f"{name} {digest[:12]}" for name, digest in sorted(entry["files"].items())
                       if name.endswith((".safetensors", ".bin"))]
            parts.append(f"{part}: local folder, sha256 " + ", ".join(weights))
    return "; ".join(parts) or json.dumps(ident, sort_keys=True)[:200]


def describe_location(location: Any) -> str:
    """One line naming where the model was loaded from (cache.json's hint, not part of the fingerprint)."""
    if not isinstance(location, dict) or not location:
        return "not recorded"
    parts = []
    for name in ("pretrained", "vae"):
        entry = location.get(name)
        if isinstance(entry, dict) and "path" in entry:
            parts.append(f"{name}: {entry['path']}")
        elif isinstance(entry, dict) and "hub_id" in entry:
            parts.append(f"{name}: {entry['hub_id']}@{entry.get('revision')} (commit {str(entry.get('commit'))[:12]})")
    return "; ".join(parts) or "not recorded"


def format_summary(s: dict[str, Any], spec: Any) -> str:
    lines = [f"cache {s['cache']}",
             f"  format {s['format_version']}, family {s['family']}, fingerprint {s['fingerprint']}",
             f"  model {s['model']}",
             f"  loaded from {s['model_location']}",
             f"  latents: {spec.latent_channels} channels, 1/{spec.vae_downsample} of the pixel size, "
             f"scaling_factor {spec.scaling_factor}" + (f", shift_factor {spec.shift_factor}" if spec.shift_factor is not None else "")
             + f", mode {spec.latent_mode}; stored {spec.store_dtype}, codec {spec.codec}, {spec.shard_rows} rows per shard file"]
    stale = f"; {len(s['stale_groups'])} stale groups ignored (other fingerprint)" if s["stale_groups"] else ""
    seen = f" ({s['samples_seen']} inputs seen)" if s["samples_seen"] else ""
    lines.append(f"samples: {s['samples']} in {s['groups']} committed groups{seen}{stale}")
    non_empty = sum(1 for n in s["buckets"].values() if n)
    lines.append(f"buckets: {non_empty} of {len(s['buckets'])} hold samples")
    peak = max(s["buckets"].values(), default=0) or 1
    for name, n in s["buckets"].items():
        lines.append(f"  {name:>11}  {n:>8}  {'#' * round(30 * n / peak)}")
    lines.append(f"fields (per sample; h, w = bucket size / {spec.vae_downsample}):")
    for f in s["fields"]:
        shape = "(" + ", ".join(str(d) for d in f["shape"]) + ("," if len(f["shape"]) == 1 else "") + ")"
        lines.append(f"  {f['name']:<22} {shape:<14} {f['dtype']:<9} {f['description']}")
    lines.append(f"bytes per sample: {s['bytes_per_sample']:,} on disk ({s['bytes_total'] / 1e6:.2f} MB in committed groups)")
    for name, n in s["bytes_per_sample_by_field"].items():
        lines.append(f"  {name:<22} {n:>10,}")
    if s["skip_reasons"]:
        lines.append(f"skipped: {sum(s['skip_reasons'].values())} inputs")
        for reason, n in s["skip_reasons"].items():
            ex = s["skip_examples"].get(reason)
            lines.append(f"  {reason:<22} {n:>8}" + (f"   e.g. {'; '.join(ex)}" if ex else ""))
    else:
        lines.append("skipped: none (per the group manifests)")
    job = s["job_summary"]
    if job and "error" in job:
        lines.append(f"  summary.json: {job['error']}")
    elif job and dict(job.get("skip_reasons", {})) != s["skip_reasons"]:
        reasons = ", ".join(f"{k} {v}" for k, v in job.get("skip_reasons", {}).items()) or "none"
        lines.append(f"  summary.json of the last cache job reports: {reasons} "
                     f"({job.get('samples_seen', '?')} seen, {job.get('samples', '?')} cached)")
    upscale = ", ".join(f"{k} {v}" for k, v in s["upscale"].items()) or "not recorded"
    lines.append(f"upscale paths: {upscale}")
    return "\n".join(lines)


def default_out(url: str) -> Path:
    if "://" in url and not url.startswith("file://"):
        return Path(f"inspect-{url.rstrip('/').rsplit('/', 1)[-1] or 'cache'}")
    return Path(url.removeprefix("file://")) / "inspect"


def run_inspect(cache: str, *, out: str | None = None, verify: bool = False, per_bucket: int = DEFAULT_PER_BUCKET,
                model: str | None = None, echo: Any = print) -> int:
    """Print the summary, write the PNGs, optionally verify. Returns the exit code (1: problems found)."""
    from latentforge.shared.cache_format import bucket_name
    from latentforge.shared.cache_reader import CacheReader

    from .inspect_draw import draw_bucket_grid, draw_bucket_histogram, pick_rows
    from .inspect_vae import load_vae, resolve_vae

    reader = CacheReader(cache)
    try:
        vae_source = None
        if per_bucket > 0 and reader.num_samples:
            vae_source = resolve_vae(reader.spec, model)  # fail before any work when no VAE is known
        summary = summarize(reader)
        echo(format_summary(summary, reader.spec))
        out_dir = Path(out) if out else default_out(reader.url)
        written = [draw_bucket_histogram(summary["buckets"], out_dir / "buckets.png",
                                         f"{summary['samples']} samples in {len(summary['buckets'])} buckets "
                                         f"(cache {summary['fingerprint'][:12]})")]
        if vae_source is not None:
            for note in vae_source.notes:
                echo(note)
            vae = load_vae(vae_source, reader.spec.family)
            for bucket, count in sorted(reader.bucket_counts().items()):
                target = out_dir / f"grid-{bucket_name(bucket)}.png"
                try:
                    written.append(draw_bucket_grid(reader, bucket, pick_rows(count, per_bucket), vae, target))
                except (OSError, ValueError, RuntimeError) as exc:  # a corrupt bucket: say so, keep going
                    echo(f"{target.name}: not drawn ({str(exc).splitlines()[0][:200]})")
        echo(f"wrote {len(written)} PNGs to {out_dir}: " + ", ".join(p.name for p in written))
        if not verify:
            return 0
        from .cache_verify import verify_cache

        problems = verify_cache(reader)
        for line in problems:
            echo(line)
        if problems:
            echo(f"verify: {len(problems)} problem{'s' if len(problems) > 1 else ''} found")
            return EXIT_PROBLEMS
        files = sum(len(g.files) for g in reader.groups)
        echo(f"verify: OK ({reader.num_samples} samples in {len(reader.groups)} groups read in full; "
             f"sizes and crc32 of {files} files checked)")
        return 0
    finally:
        reader.close()


def cli_entry(args: argparse.Namespace) -> int:
    """`latentforge inspect`: run it; a usage problem (`InspectError`) is one stderr line and exit 2."""
    from .inspect_vae import InspectError

    try:
        return run_inspect(args.cache, out=args.out, verify=args.verify, per_bucket=args.per_bucket, model=args.model)
    except InspectError as exc:
        print(f"latentforge inspect: {exc}", file=sys.stderr)
        return EXIT_USAGE
