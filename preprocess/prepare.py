"""Per-sample image preparation: decoded bytes in, bucket-sized pixel tensors plus their record out.

One `RawSample` becomes one `Prepared` per configured resolution (and one more per resolution when
flips are cached). The crop is planned on the ORIGINAL size, so `original_size` is always the size
before any upscaling: the model must never learn that an upscaled image was natively that sharp.
Runs in worker threads ahead of the encoders (PIL and torch release the GIL for the heavy parts), or in
worker processes (`prepare_pool.py`), which get the pixels as uint8 and leave the float conversion to
the job's process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from latentforge.preprocess.buckets import CropPlan, assign_bucket, needs_upscale, plan_crop
from latentforge.shared.cache_format import UPSCALE_METHODS
from latentforge.shared.config import Config

from .captions import caption_variants
from .conditioning import ControlMaker, decode_sidecar
from .images import SkipSample, content_hash, decode_image, hflip, resize_and_crop, to_tensor
from .sources import RawSample
from .upscale import Upscaler


@dataclass
class Prepared:
    """A bucket-sized image ready for the VAE, with everything the cache records beside its latent."""

    key: str
    caption: str
    bucket: tuple[int, int]
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]; (H, W, 3) uint8 (np.ndarray) out of a worker process
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    content_hash: bytes
    upscale_method: str
    captions: tuple[str, ...] = ()  # every caption variant (the first is `caption`) when cache.caption_variants > 1
    control: np.ndarray | None = None  # (C, H, W) uint8 control image when `cache.conditioning` is on


class Preparer:
    """Turns raw samples into `Prepared` items following the config's bucket, crop and upscale rules."""

    def __init__(self, config: Config, buckets_by_resolution: dict[int, tuple[tuple[int, int], ...]],
                 upscaler: Upscaler | None, *, uint8_pixels: bool = False) -> None:
        """`uint8_pixels`: leave `Prepared.pixels` as `(H, W, 3)` uint8 (what a worker process sends back)."""
        self.config = config
        self.pixels = (lambda im: np.array(im, dtype=np.uint8)) if uint8_pixels else to_tensor
        self.buckets = buckets_by_resolution
        self.upscaler = upscaler
        self.control = ControlMaker(config.cache.conditioning) if config.cache.conditioning.kind != "none" else None

    def __call__(self, raw: RawSample) -> list[Prepared]:
        cfg = self.config
        img = decode_image(raw.image, name=raw.key, max_pixels=cfg.cache.max_pixels)
        width, height = img.size
        if min(height, width) < cfg.buckets.min_resolution:
            raise SkipSample("too_small", f"{height}x{width} is below buckets.min_resolution={cfg.buckets.min_resolution}")
        digest = content_hash(raw.image)
        n = cfg.cache.caption_variants
        captions = caption_variants(raw.caption, raw.metadata or {}, cfg.data.sources[raw.source_index], n, raw.key) if n > 1 else ()
        sidecar = None
        if cfg.cache.conditioning.kind == "sidecar":
            sidecar = decode_sidecar(raw.sidecar, raw.key, cfg.cache.conditioning.sidecar, (height, width),
                                     cfg.cache.max_pixels)
        out: list[Prepared] = []
        for resolution, buckets in self.buckets.items():
            bucket = assign_bucket(height, width, buckets)
            plan = plan_crop(height, width, bucket, cfg.buckets.crop, key=f"{raw.key}@{resolution}", seed=0)
            source, method = img, "none"
            if plan.scale > 1.0:
                method = "lanczos"
                if self.upscaler is not None and cfg.upscale.enabled and needs_upscale(height, width, bucket, cfg.upscale.threshold):
                    source, method = self.upscaler.upscale(img, plan.resized)
            pixels = resize_and_crop(source, plan.resized, plan.crop_top_left, plan.target)
            out.append(Prepared(raw.key, raw.caption, bucket, self.pixels(pixels), (height, width), plan.crop_top_left,
                                digest, method, captions, self._control(pixels, sidecar, plan, False)))
            if cfg.cache.flip:
                flipped, mirrored = plan.flip(), hflip(pixels)
                out.append(Prepared(f"{raw.key}#flip", raw.caption, bucket, self.pixels(mirrored), (height, width),
                                    flipped.crop_top_left, digest, method, captions,
                                    self._control(mirrored, sidecar, plan, True)))
        return out

    def _control(self, crop: Image.Image, sidecar: Image.Image | None, plan: CropPlan, flip: bool) -> np.ndarray | None:
        """The control image of a crop, cut with the image's own (unflipped) plan, then flipped like it."""
        if self.control is None:
            return None
        return self.control(crop, sidecar, plan.resized, plan.crop_top_left, flip)


def method_code(method: str) -> int:
    return UPSCALE_METHODS[method]
