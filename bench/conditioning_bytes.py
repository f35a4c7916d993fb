"""Bytes per sample that `cache.conditioning` adds at 1024x1024, per kind, on real photos.

Each photo of scikit-image's data set is cover-resized and centre-cropped to 1024x1024 by the cache job's
own code (`plan_crop`, `resize_and_crop`), its control image made by the cache job's `ControlMaker`, and
each row compressed as the cache stores it: one chunk per row with `cache.codec` (uint8 rows: Blosc level 5
without shuffle, or zstd level 3, as `preprocess/cache_writer.py` sets them), plus the 16 bytes of its
shard-index entry. `sidecar` is measured on a
stand-in depth map (the photo's luminance blurred by a 16-pixel Gaussian: smooth like real depth maps).
The photos are smaller than 1024 and enlarged, so they hold fewer edges than native 1024 photos: canny
figures are a lower bound for busy images.

    python -m bench.conditioning_bytes      # prints a table and writes bench-results/conditioning_bytes.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numcodecs
import numpy as np
from PIL import Image, ImageFilter

from latentforge.preprocess.buckets import plan_crop
from latentforge.preprocess.conditioning import ControlMaker
from latentforge.preprocess.images import resize_and_crop
from latentforge.shared.config_schema import ConditioningConfig

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "motorcycle_left", "hubble_deep_field")
SIDE = 1024
INDEX_BYTES = 16  # (offset, nbytes) uint64 per row in the shard index
LATENT_RAW = 4 * (SIDE // 8) ** 2 * 2  # SDXL / SD 1.x latent mean, bf16


def _photos() -> list[Image.Image]:
    from skimage import data

    out = []
    for name in PHOTOS:
        try:
            arr = getattr(data, name)()
        except Exception:  # a photo that needs a download (offline machine): leave it out
            continue
        out.append(Image.fromarray(arr).convert("RGB"))
    return out


CODECS = {"blosc-lz4": numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.NOSHUFFLE),
          "blosc-zstd": numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.NOSHUFFLE),
          "zstd": numcodecs.Zstd(level=3)}


def measure(codec_name: str = "blosc-lz4") -> dict[str, dict[str, float]]:
    """Per kind: raw and stored bytes per sample at 1024x1024 (mean over the photos) and the ratio."""
    codec = CODECS[codec_name]
    results: dict[str, dict[str, float]] = {}
    photos = _photos()
    for kind in ("canny", "image", "sidecar"):
        maker = ControlMaker(ConditioningConfig(kind=kind))
        sizes, raw = [], 0
        for img in photos:
            plan = plan_crop(img.height, img.width, (SIDE, SIDE), "center")
            crop = resize_and_crop(img, plan.resized, plan.crop_top_left, plan.target)
            depth = img.convert("L").filter(ImageFilter.GaussianBlur(16)).convert("RGB") if kind == "sidecar" else None
            control = maker(crop, depth, plan.resized, plan.crop_top_left, False)
            raw = control.nbytes
            sizes.append(len(codec.encode(np.ascontiguousarray(control))) + INDEX_BYTES)
        stored = float(np.mean(sizes))
        results[kind] = {"raw_bytes": raw, "stored_bytes_mean": round(stored), "stored_bytes_max": max(sizes),
                         "ratio": round(raw / stored, 2), "photos": len(sizes),
                         "vs_latent_raw": round(stored / LATENT_RAW, 2)}
    results["inpaint"] = dict(results["image"])  # the same stored crop; masks are drawn at train time
    return results


def main() -> int:
    results = {name: measure(name) for name in CODECS}
    print(f"conditioning bytes per sample at {SIDE}x{SIDE} (latent mean, raw bf16: {LATENT_RAW} B)")
    for name, kinds in results.items():
        for kind, r in kinds.items():
            print(f"  {name:10s} {kind:8s} raw {r['raw_bytes']:>8d} B  stored {r['stored_bytes_mean']:>8d} B "
                  f"(max {r['stored_bytes_max']})  x{r['ratio']} smaller, {r['vs_latent_raw']} x the raw latent, "
                  f"{r['photos']} photos")
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    (out / "conditioning_bytes.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
