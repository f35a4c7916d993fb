"""Control images for ControlNet training, made in the cache job beside each latent (`cache.conditioning`).

The control image of a sample goes through exactly the crop, resize and flip of its image, so it lines
up with the latent pixel for pixel: `canny` runs on the prepared crop itself, `image` and `inpaint`
store the crop, and a `sidecar` map (the user's depth map, pose, segmentation...) is resized to the
image's resize size and cut at the image's crop. Stored as uint8 (C, H, W) at the bucket size.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from latentforge.shared.config_schema import ConditioningConfig

from .images import SkipSample, decode_image, hflip, resize_and_crop

# A sidecar whose aspect ratio differs from its image's by more than this is not the same picture.
SIDECAR_ASPECT_TOLERANCE = 0.02


def canny_edges(img: Image.Image, low: float, high: float, sigma: float, resize: int | None = None) -> np.ndarray:
    """Canny edges of an RGB image as a (1, H, W) uint8 map, 255 on edges: scikit-image's `canny` on the
    greyscale image, thresholds in 0-255 gradient units as with OpenCV's Canny (scikit-image scales them
    by the uint8 range), after a Gaussian of `sigma` pixels.

    `resize`: as Stable Cascade's `CannyFilter(resize=224)` (Stability-AI/StableCascade `modules/controlnet.py`):
    the image squashed to resize x resize and the edges enlarged back to (H, W), both with torch's bilinear
    `interpolate` (no antialiasing), so the stored map is soft (0-255) rather than binary."""
    from skimage.feature import canny  # imported here: importing scikit-image takes seconds

    if resize is None:
        grey = np.asarray(img.convert("L"), dtype=np.uint8)
        edges = canny(grey, sigma=sigma, low_threshold=low, high_threshold=high)
        return (edges.astype(np.uint8) * 255)[None]
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(rgb_planes(img)).float()[None] / 255.0
    small = F.interpolate(x, size=(resize, resize), mode="bilinear")
    rgb = small[0].mul(255).permute(1, 2, 0).numpy().astype(np.uint8)  # truncated to uint8, as the original
    grey = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint8)
    edges = torch.from_numpy(canny(grey, sigma=sigma, low_threshold=low, high_threshold=high).astype(np.float32))
    big = F.interpolate(edges[None, None], size=(img.height, img.width), mode="bilinear")
    return big[0].mul(255).round().clamp(0, 255).to(torch.uint8).numpy()


def rgb_planes(img: Image.Image) -> np.ndarray:
    """An RGB image as (3, H, W) uint8."""
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))


def decode_sidecar(data: bytes | None, key: str, name: str, image_size: tuple[int, int], max_pixels: int) -> Image.Image:
    """The sidecar map of sample `key` as RGB; `SkipSample` when it is missing (`no_sidecar`), cannot be
    decoded (`bad_sidecar`) or is not the same picture as the image (`sidecar_size_mismatch`: another
    aspect ratio; another resolution at the same aspect is fine, it is resized like the image)."""
    if data is None:
        raise SkipSample("no_sidecar", f"{key}: no {key}.{name}.<png|jpg|...> beside the image")
    try:
        side = decode_image(data, name=f"{key}.{name}", max_pixels=max_pixels)
    except SkipSample as exc:
        raise SkipSample("bad_sidecar", exc.detail) from None
    h, w = image_size
    sw, sh = side.size
    if abs((sh / sw) / (h / w) - 1.0) > SIDECAR_ASPECT_TOLERANCE:
        raise SkipSample("sidecar_size_mismatch", f"{key}.{name}: {sh}x{sw} is not the aspect of the image's {h}x{w}")
    return side


class ControlMaker:
    """Makes the stored control image of one prepared crop (and of its flip) for one configured kind."""

    def __init__(self, cfg: ConditioningConfig) -> None:
        self.cfg = cfg

    def __call__(self, crop: Image.Image, sidecar: Image.Image | None, resized: tuple[int, int],
                 crop_top_left: tuple[int, int], flip: bool) -> np.ndarray:
        """The control of `crop` (the prepared image, already flipped when `flip`): for a sidecar, the map
        resized to `resized` and cut at `crop_top_left` (the image's own plan), then flipped the same way."""
        kind = self.cfg.kind
        if kind == "canny":
            return canny_edges(crop, self.cfg.canny_low, self.cfg.canny_high, self.cfg.canny_sigma, self.cfg.canny_resize)
        if kind in ("image", "inpaint"):
            return rgb_planes(crop)
        if kind == "sidecar":
            if sidecar is None:
                raise ValueError("a sidecar control needs the decoded sidecar")
            target = (crop.height, crop.width)
            cut = resize_and_crop(sidecar, resized, crop_top_left, target)
            return rgb_planes(hflip(cut) if flip else cut)
        raise ValueError(f"cache.conditioning.kind {kind!r} makes no control image")
