"""`latentforge inspect CACHE`: what a cache holds, pictures of it, and a full integrity check.

A tool over the shared cache format only (`cache_format`, `cache_reader`, `buckets`): it never imports
the cache job or the trainer, so it runs on a machine that has neither set up.

* The summary comes from `cache.json` and the committed groups' manifests (sizes, bucket counts, skip
  reasons), plus the cached `upscale_method` field and `CACHE/summary.json` when the job wrote one.
* `buckets.png` is a bar chart of samples per bucket; `grid-<HxW>.png` shows a few samples of each
  bucket decoded with the model's VAE, placed inside the outline of the cover-resized image so the crop
  that was cached (and the part that was cut away) is visible. Captions are not cached, so panels show
  the sample key, the original size and the crop.
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

from latentforge.shared.file_hash import sha256_file

EXIT_PROBLEMS = 1
EXIT_USAGE = 2
DEFAULT_PER_BUCKET = 8
CELL = 288  # longest side of the picture area of one grid panel, pixels
_PAD = 8
_TEXT_LINES = 3
_LINE_H = 16
_BG = (250, 250, 250)
_FG = (20, 20, 20)
_CUT = (200, 200, 200)  # the part of the resized image that was cropped away
_CROP = (0, 90, 255)  # the crop that was cached (blue: decoded noise of a random VAE is often red)
_BAR = (70, 110, 190)


class InspectError(RuntimeError):
    """A usage problem the command reports in one line (exit 2)."""


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
                                   "(default: the cache's model when cache.json names a hub id)")


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
            parts.append(f"{part}: {entry['hub_id']}@{entry.get('revision', 'main')}{variant}")
        elif "files" in entry:
            weights = [f"{name} {digest[:12]}" for name, digest in sorted(entry["files"].items())
                       if name.endswith((".safetensors", ".bin"))]
            parts.append(f"{part}: local folder, sha256 " + ", ".join(weights))
    return "; ".join(parts) or json.dumps(ident, sort_keys=True)[:200]


def format_summary(s: dict[str, Any], spec: Any) -> str:
    lines = [f"cache {s['cache']}",
             f"  format {s['format_version']}, family {s['family']}, fingerprint {s['fingerprint']}",
             f"  model {s['model']}",
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


# ---- pictures --------------------------------------------------------------------------------------------
def _font(size: int = 13) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def draw_bucket_histogram(buckets: dict[str, int], path: Path, title: str) -> Path:
    """Horizontal bars, one per bucket (tall to wide), labelled HxW, with a small shape glyph and the count."""
    from PIL import Image, ImageDraw

    from latentforge.shared.cache_format import parse_bucket_name

    font, small = _font(14), _font(12)
    row_h, top, label_w, bar_w = 24, 44, 150, 460
    width = label_w + bar_w + 90
    height = top + row_h * max(len(buckets), 1) + 16
    img = Image.new("RGB", (width, height), _BG)
    d = ImageDraw.Draw(img)
    d.text((10, 12), title, fill=_FG, font=font)
    peak = max(buckets.values(), default=0) or 1
    for i, (name, n) in enumerate(buckets.items()):
        y = top + i * row_h
        h, w = parse_bucket_name(name)
        s = 16 / max(h, w)  # glyph: the bucket's shape, 16 px on its long side
        gw, gh = max(2, round(w * s)), max(2, round(h * s))
        gx, gy = 10 + (16 - gw) // 2, y + (row_h - gh) // 2
        d.rectangle([gx, gy, gx + gw - 1, gy + gh - 1], outline=_FG)
        d.text((34, y + 4), name, fill=_FG, font=small)
        length = round(bar_w * n / peak)
        if length:
            d.rectangle([label_w, y + 4, label_w + length, y + row_h - 4], fill=_BAR)
        d.text((label_w + length + 6, y + 4), str(n), fill=_FG, font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def resolve_vae(spec: Any, model: str | None) -> tuple[str, str | None, list[str]]:
    """(pretrained path or hub id, subfolder, notes) of the VAE that decodes the grids.

    Raises `InspectError` (one line) when neither --model nor cache.json names a loadable model: a cache
    made from a local folder records the model by weight hashes, not by path.
    """
    ident = spec.fingerprint_inputs.get("model") if isinstance(spec.fingerprint_inputs, dict) else None
    vae_ident = ident.get("vae", {}) if isinstance(ident, dict) else {}
    if model is None:
        if isinstance(vae_ident, dict) and "hub_id" in vae_ident:
            return vae_ident["hub_id"], "vae", [f"VAE from the cache's model {vae_ident['hub_id']}"]
        raise InspectError(
            "cache.json records its model only by weight hashes (it was made from a local folder), so the VAE "
            "that decodes the grids is unknown: pass --model MODEL_FOLDER (or --per-bucket 0 for no grids)")
    p = Path(model)
    if (p / "vae" / "config.json").is_file():
        folder, sub = p / "vae", "vae"
    elif (p / "config.json").is_file():
        folder, sub = p, None
    elif p.exists():
        raise InspectError(f"--model {model}: neither vae/config.json nor config.json there; "
                           "pass a diffusers pipeline folder or a VAE folder")
    else:
        return model, "vae", [f"VAE from {model} (not a local folder: treated as a hub id)"]
    notes = []
    recorded = {Path(k).name: v for k, v in vae_ident.get("files", {}).items()
                if k.endswith((".safetensors", ".bin"))} if isinstance(vae_ident, dict) else {}
    if recorded:
        local = {f.name: f for f in folder.iterdir() if f.is_file() and f.name in recorded}
        same = local and all(sha256_file(f) == recorded[name] for name, f in local.items())
        notes.append("VAE weights match the cache's fingerprint" if same else
                     f"warning: the VAE in {model} is not the one this cache was made with (weight hashes differ); "
                     "the grids may not show what was cached")
    return str(p), sub, notes


def load_vae(source: str, subfolder: str | None, family: str) -> Any:
    import diffusers

    from latentforge.shared.families import family_facts

    cls_name = family_facts(family).vae_class
    config = Path(source) / (subfolder or "") / "config.json"
    if config.is_file():
        cls_name = json.loads(config.read_text()).get("_class_name", cls_name)
    import torch

    try:
        vae = getattr(diffusers, cls_name).from_pretrained(source, subfolder=subfolder, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise InspectError(f"could not load the VAE from {source} ({exc.__class__.__name__}: "
                           f"{str(exc).splitlines()[0][:160]}); pass --model MODEL_FOLDER") from None
    return vae.eval()


def decode_latents(vae: Any, latents: Any) -> Any:
    """Native-space latents (N, C, h, w) -> uint8 images (N, H, W, 3). The cache stores latents unscaled."""
    import torch

    with torch.no_grad():
        images = vae.decode(latents.to(torch.float32)).sample
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def pick_rows(count: int, n: int) -> list[int]:
    """Up to `n` rows spread evenly over a bucket (deterministic, first and last included)."""
    import numpy as np

    if count <= 0 or n <= 0:
        return []
    return sorted({int(r) for r in np.linspace(0, count - 1, min(n, count)).round()})


def _resized(bucket: tuple[int, int], original: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int, float]:
    """(height, width) of the cover-resized image a sample was cropped from, and the panel's drawing scale."""
    from latentforge.preprocess.buckets import plan_crop

    th, tw = bucket
    try:
        rh, rw = plan_crop(original[0], original[1], bucket, "center").resized
    except ValueError:  # a non-positive recorded size: show the crop alone (--verify reports it)
        rh, rw = th, tw
    rh, rw = max(rh, crop[0] + th), max(rw, crop[1] + tw)  # a crop outside the image still shows whole
    return rh, rw, min(CELL / max(rh, rw), 2.0)


def _panel(image: Any, bucket: tuple[int, int], original: tuple[int, int], crop: tuple[int, int],
           method: str, key: str, font: Any, area_h: int) -> Any:
    """One sample: the cover-resized image's outline (grey), the decoded crop pasted where it was cut
    (blue box), and the sample's key, original size and crop below. The picture area is CELL x area_h."""
    from PIL import Image, ImageDraw

    th, tw = bucket
    top, left = crop
    rh, rw, s = _resized(bucket, original, crop)
    panel = Image.new("RGB", (CELL + 2 * _PAD, area_h + 2 * _PAD + _TEXT_LINES * _LINE_H), _BG)
    d = ImageDraw.Draw(panel)
    ox = _PAD + (CELL - round(rw * s)) // 2
    oy = _PAD + (area_h - round(rh * s)) // 2
    d.rectangle([ox, oy, ox + round(rw * s) - 1, oy + round(rh * s) - 1], fill=_CUT, outline=(120, 120, 120))
    cx, cy = ox + round(left * s), oy + round(top * s)
    cw, ch = max(1, round(tw * s)), max(1, round(th * s))
    panel.paste(Image.fromarray(image).resize((cw, ch), Image.Resampling.LANCZOS), (cx, cy))
    d.rectangle([cx - 2, cy - 2, cx + cw + 1, cy + ch + 1], outline=_CROP, width=2)
    ty = area_h + 2 * _PAD - 2
    key = key if len(key) <= 40 else key[:18] + "..." + key[-19:]
    d.text((_PAD, ty), key, fill=_FG, font=font)
    d.text((_PAD, ty + _LINE_H), f"original {original[0]}x{original[1]} -> resized {rh}x{rw}", fill=_FG, font=font)
    up = "" if method == "none" else f", upscaled: {method}"
    d.text((_PAD, ty + 2 * _LINE_H), f"crop {th}x{tw} at top {top}, left {left}{up}", fill=_FG, font=font)
    return panel


def draw_bucket_grid(reader: Any, bucket: tuple[int, int], rows: list[int], vae: Any, path: Path) -> Path:
    """`grid-<HxW>.png`: the chosen rows of a bucket decoded with `vae`, crop geometry drawn on them."""
    from PIL import Image, ImageDraw

    from latentforge.shared.cache_format import UPSCALE_METHODS, bucket_name

    names = {code: name for name, code in UPSCALE_METHODS.items()}
    have = {f.name for f in reader.spec.fields}
    wanted = [f for f in ("latent_mean", "original_size", "crop_top_left", "upscale_method", "key") if f in have]
    batch = reader.read_rows(bucket, rows, fields=wanted)
    images = decode_latents(vae, batch["latent_mean"])
    font = _font(12)
    samples = []
    for i, row in enumerate(rows):
        original = tuple(int(v) for v in batch["original_size"][i]) if "original_size" in batch else bucket
        crop = tuple(int(v) for v in batch["crop_top_left"][i]) if "crop_top_left" in batch else (0, 0)
        method = names.get(int(batch["upscale_method"][i]), "?") if "upscale_method" in batch else "none"
        key = batch["key"][i] if "key" in batch else f"row {row}"
        samples.append((images[i], bucket, original, crop, method, key))
    # Panels as tall as the tallest resized image needs, so wide buckets do not waste a square each.
    area_h = max(round(rh * s) for rh, _, s in (_resized(bucket, x[2], x[3]) for x in samples))
    panels = [_panel(*x, font, area_h) for x in samples]
    cols = min(4, len(panels))
    grid_rows = -(-len(panels) // cols)
    pw, ph = panels[0].size
    header = 30
    grid = Image.new("RGB", (cols * pw, header + grid_rows * ph), _BG)
    name = bucket_name(bucket)
    total = reader.bucket_counts()[bucket]
    ImageDraw.Draw(grid).text(
        (_PAD, 8), f"bucket {name}: {len(rows)} of {total} samples decoded with the VAE; blue box = the cached crop, "
        "grey = the rest of the resized image", fill=_FG, font=_font(14))
    for i, panel in enumerate(panels):
        grid.paste(panel, ((i % cols) * pw, header + (i // cols) * ph))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def default_out(url: str) -> Path:
    if "://" in url and not url.startswith("file://"):
        return Path(f"inspect-{url.rstrip('/').rsplit('/', 1)[-1] or 'cache'}")
    return Path(url.removeprefix("file://")) / "inspect"


def run_inspect(cache: str, *, out: str | None = None, verify: bool = False, per_bucket: int = DEFAULT_PER_BUCKET,
                model: str | None = None, echo: Any = print) -> int:
    """Print the summary, write the PNGs, optionally verify. Returns the exit code (1: problems found)."""
    from latentforge.shared.cache_format import bucket_name
    from latentforge.shared.cache_reader import CacheReader

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
            source, subfolder, notes = vae_source
            for note in notes:
                echo(note)
            vae = load_vae(source, subfolder, reader.spec.family)
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
    try:
        return run_inspect(args.cache, out=args.out, verify=args.verify, per_bucket=args.per_bucket, model=args.model)
    except InspectError as exc:
        print(f"latentforge inspect: {exc}", file=sys.stderr)
        return EXIT_USAGE
