"""The pictures of `latentforge inspect`: the bucket histogram and the per-bucket grids of decoded samples.

`buckets.png` is a bar chart of samples per bucket; `grid-<HxW>.png` shows a few samples of each bucket
decoded with the model's VAE, placed inside the outline of the cover-resized image so the crop that was
cached (and the part that was cut away) is visible. Captions are not cached, so panels show the sample
key, the original size and the crop. PIL and numpy load when a picture is drawn, not at import (the
`latentforge` parser imports the inspect command for every command).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .inspect_vae import decode_latents

CELL = 288  # longest side of the picture area of one grid panel, pixels
_PAD = 8
_TEXT_LINES = 3
_LINE_H = 16
_BG = (250, 250, 250)
_FG = (20, 20, 20)
_CUT = (200, 200, 200)  # the part of the resized image that was cropped away
_CROP = (0, 90, 255)  # the crop that was cached (blue: decoded noise of a random VAE is often red)
_BAR = (70, 110, 190)


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
