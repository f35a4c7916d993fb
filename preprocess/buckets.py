"""Aspect-ratio buckets and crop maths: the one place both stages get them from.

Everything here is pure integer/float arithmetic (no PIL, no torch) so the cache job, the trainer and
the tests agree to the pixel. Sizes are always (height, width) tuples; aspect ratio is width / height.

Bucket rule: for every height h (a multiple of `step`) take the largest width w (a multiple of `step`)
with h * w <= resolution**2, add (h, w) and its transpose (w, h), keep those whose aspect lies in
[min_aspect, max_aspect], and always keep the square. Areas therefore never exceed the target (so memory
per batch is bounded by the square's) and fall short of it by less than step * max(h, w).

Compared with SDXL (Podell et al. 2023): the commonly quoted SDXL buckets at 1024 (1024x1024, 1152x896,
1216x832, 1344x768, 1536x640 and their transposes) all come out of this rule exactly. Ours is a superset:
it also has the in-between shapes (e.g. 960x1088, 1472x704, 1600x640, 2048x512), so fewer images lose
content to cropping.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from latentforge.shared.config_schema import parse_ratio

Size = tuple[int, int]

# Aspect bounds come from YAML floats (0.33, 4.0); a bucket exactly on a bound must not fall out of the
# set because of float rounding in w / h.
_ASPECT_EPS = 1e-9


def _aspect_in_range(height: int, width: int, min_aspect: float, max_aspect: float) -> bool:
    aspect = width / height
    return min_aspect * (1 - _ASPECT_EPS) <= aspect <= max_aspect * (1 + _ASPECT_EPS)


def _aspect_key(size: Size) -> tuple[Fraction, int]:
    # Exact fractions so the order never depends on float rounding; equal aspects: smaller first.
    return Fraction(size[1], size[0]), size[0]


def ratio_buckets(resolution: int, step: int, ratios: Sequence[str | float]) -> tuple[Size, ...]:
    """Buckets from an explicit list of aspect ratios w / h, as Stable Cascade's `Bucketeer` makes them.

    Each ratio r and its reciprocal (Bucketeer's `reverse_list`) give (h, w) = (floor(sqrt(A / r) / step) * step,
    floor(sqrt(A * r) / step) * step) with A = resolution**2 (`core/data/bucketeer.py`, density = image_size**2,
    factor = 32), so the seed's `multi_aspect_ratio: [1/1, 1/2, ...]` can be written as it is.
    """
    target = resolution * resolution
    found: set[Size] = set()
    for value in ratios:
        r = parse_ratio(value)
        for q in (r, 1 / r):
            h = int((target / float(q)) ** 0.5 // step * step)
            w = int((target * float(q)) ** 0.5 // step * step)
            if h >= step and w >= step:
                found.add((h, w))
    return tuple(sorted(found, key=_aspect_key))


def generate_buckets(resolution: int, step: int, min_aspect: float, max_aspect: float,
                     ratios: Sequence[str | float] | None = None) -> tuple[Size, ...]:
    """Buckets (h, w) for one resolution, sorted by aspect ratio w / h (see the module docstring).

    With `ratios` (buckets.aspect_ratios) the buckets are exactly those ratios' (`ratio_buckets`)."""
    if ratios:
        return ratio_buckets(resolution, step, ratios)
    if step <= 0 or resolution < step or resolution % step:
        raise ValueError(f"resolution ({resolution}) must be a positive multiple of step ({step})")
    if not 0 < min_aspect <= max_aspect:
        raise ValueError(f"need 0 < min_aspect ({min_aspect}) <= max_aspect ({max_aspect})")
    target = resolution * resolution
    # Past this height neither (h, w) nor (w, h) can be in range: w / h <= target / h**2 and
    # h / w >= h**2 / target. Bounding the loop keeps small steps (8) cheap.
    limit = target * max(max_aspect, 1 / min_aspect) * (1 + _ASPECT_EPS)
    found: set[Size] = {(resolution, resolution)}  # the square is the fallback; always present
    h = step
    while h * h <= limit:
        w = (target // h) // step * step
        if w < step:
            break
        for size in ((h, w), (w, h)):
            if _aspect_in_range(*size, min_aspect, max_aspect):
                found.add(size)
        h += step
    return tuple(sorted(found, key=_aspect_key))


def generate_bucket_set(
    resolutions: Sequence[int], step: int, min_aspect: float, max_aspect: float,
    ratios: Sequence[str | float] | None = None,
) -> tuple[Size, ...]:
    """The union of `generate_buckets` over several resolutions, unique and sorted by aspect ratio."""
    found: set[Size] = set()
    for resolution in resolutions:
        found.update(generate_buckets(resolution, step, min_aspect, max_aspect, ratios))
    return tuple(sorted(found, key=_aspect_key))


def buckets_by_resolution(
    resolutions: Sequence[int], step: int, min_aspect: float, max_aspect: float,
    ratios: Sequence[str | float] | None = None,
) -> dict[int, tuple[Size, ...]]:
    """Map each resolution to its own buckets; `assign_bucket` should be given one of these values."""
    return {r: generate_buckets(r, step, min_aspect, max_aspect, ratios) for r in resolutions}


def assign_bucket(height: int, width: int, buckets: Sequence[Size]) -> Size:
    """The bucket with the nearest log aspect ratio |log(w/h) - log(bw/bh)|.

    Ties go to the larger area, then the smaller height, so the choice never depends on list order.
    Raises ValueError for non-positive sizes or an empty bucket list.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if not buckets:
        raise ValueError("no buckets to assign to")

    def key(bucket: Size) -> tuple[Fraction, int, int]:
        bh, bw = bucket
        if bh <= 0 or bw <= 0:
            raise ValueError(f"bucket sides must be positive, got {bh}x{bw}")
        # |log(a) - log(b)| is monotone in max(a/b, b/a); comparing that exact fraction means ties
        # (e.g. an aspect exactly halfway in log space) really are ties, not float noise.
        p, q = width * bh, height * bw
        return Fraction(max(p, q), min(p, q)), -bh * bw, bh

    return min(buckets, key=key)


def cover_scale(height: int, width: int, bucket: Size) -> float:
    """The resize factor that makes the image just cover the bucket: max(bh / h, bw / w)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    return max(bucket[0] / height, bucket[1] / width)


def needs_upscale(height: int, width: int, bucket: Size, threshold: float) -> bool:
    """True when covering the bucket needs a scale factor above `threshold` (1.0: any enlargement)."""
    if threshold < 1.0:
        raise ValueError(f"upscale threshold must be >= 1.0, got {threshold}")
    return cover_scale(height, width, bucket) > threshold


@dataclass(frozen=True)
class CropPlan:
    """How one image becomes one bucket: cover-resize to `resized`, then crop `target` at `crop_top_left`."""

    resized: Size  # (h, w) after the cover-resize; both sides >= target
    crop_top_left: Size  # (top, left) of the crop window inside `resized`
    target: Size  # (h, w) of the bucket
    scale: float  # the cover scale factor applied to the original image

    @property
    def box(self) -> tuple[int, int, int, int]:
        """The crop window as (left, top, right, bottom), the order PIL's Image.crop takes."""
        top, left = self.crop_top_left
        return left, top, left + self.target[1], top + self.target[0]

    def flip(self) -> CropPlan:
        """The plan for the horizontally flipped image: the same pixels, mirrored."""
        top, left = self.crop_top_left
        # Mirroring maps column x to resized_w - 1 - x, so the window's left edge lands here.
        return CropPlan(self.resized, (top, self.resized[1] - left - self.target[1]), self.target, self.scale)


def flip(plan: CropPlan) -> CropPlan:
    """Function form of `CropPlan.flip`."""
    return plan.flip()


def _stable_offsets(key: str, seed: int, excess_h: int, excess_w: int) -> Size:
    # blake2b, not hash(): str hashes are salted per process, and every worker and every rerun must
    # crop a given sample identically (the cache is resumable and sharded across machines).
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=16, person=b"latentforge-crop").digest()
    top = int.from_bytes(digest[:8], "big") % (excess_h + 1)
    left = int.from_bytes(digest[8:], "big") % (excess_w + 1)
    return top, left


def plan_crop(
    height: int,
    width: int,
    bucket: Size,
    mode: Literal["center", "random"],
    key: str = "",
    seed: int = 0,
) -> CropPlan:
    """Plan a cover-resize then crop of a (height, width) image into `bucket`.

    The limiting side is resized to exactly the bucket side; the other is rounded (half up) and never
    below the bucket side. `center` takes floor(excess / 2); `random` picks an offset from a stable
    hash of (seed, key), so the same sample gets the same crop in any process.
    """
    bh, bw = bucket
    if bh <= 0 or bw <= 0:
        raise ValueError(f"bucket sides must be positive, got {bh}x{bw}")
    scale = cover_scale(height, width, bucket)
    # Integer arithmetic for the resized sides: the limiting side must equal the bucket exactly,
    # and h * (bh / h) in floats can land a hair below bh.
    if bh * width >= bw * height:  # height limits (bh / h >= bw / w)
        rh, rw = bh, max(bw, (2 * width * bh + height) // (2 * height))
    else:
        rh, rw = max(bh, (2 * height * bw + width) // (2 * width)), bw
    excess_h, excess_w = rh - bh, rw - bw
    if mode == "center":
        offset = (excess_h // 2, excess_w // 2)
    elif mode == "random":
        offset = _stable_offsets(key, seed, excess_h, excess_w)
    else:
        raise ValueError(f"crop mode must be 'center' or 'random', got {mode!r}")
    return CropPlan((rh, rw), offset, (bh, bw), scale)


def sdxl_time_ids(original_size: Size, crop_top_left: Size, target_size: Size) -> tuple[int, ...]:
    """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    The same order diffusers' SDXL pipeline uses for add_time_ids
    (original_size + crops_coords_top_left + target_size). `original_size` is the image before any
    upscale or resize, so the model learns how much real detail the source had.
    """
    return tuple(int(v) for v in (*original_size, *crop_top_left, *target_size))


def latent_size(bucket: Size, downsample: int) -> Size:
    """Latent (h, w) of a bucket for a VAE that downsamples by `downsample`; sides must divide evenly."""
    bh, bw = bucket
    if downsample <= 0 or bh % downsample or bw % downsample:
        raise ValueError(f"bucket {bh}x{bw} is not divisible by the VAE downsample factor {downsample}")
    return bh // downsample, bw // downsample
