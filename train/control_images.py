"""Control images at train time: cached uint8 conditioning in, the ControlNet's input out. Pure functions.

What each `cache.conditioning` kind becomes (values in [0, 1], 3 channels, as diffusers' ControlNet
pipelines feed them):
- `canny`, `sidecar`: the cached map as it is (one-channel edges repeated to RGB);
- `image`: the crop shrunk by `degrade_factor` (area average) and enlarged back (bilinear): the blurred
  input of tile and super-resolution control;
- `inpaint`: the crop with a freshly drawn mask set to -1, the convention of diffusers' inpainting
  ControlNets (`make_inpaint_condition`). Masks (rectangles, brush strokes, outpainting borders) come
  from the step's seeded generator, so every epoch sees new masks and a resumed run draws the same ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MASKED = -1.0  # value of masked pixels in an inpainting control image


def to_unit_rgb(conditioning: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) uint8 -> (B, 3, H, W) float32 in [0, 1]; one channel is repeated to three."""
    x = conditioning.float() / 255.0
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def degrade(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Shrink by `factor` (area average, what a camera at lower resolution sees) and enlarge back
    (bilinear) to the same size. A factor of 1 returns `x`."""
    if factor <= 1:
        return x
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, h // factor), max(1, w // factor)), mode="area")
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def _uniform(generator: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _rectangle(h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """One rectangle covering 10-50% of each side."""
    mh, mw = max(1, int(h * _uniform(g, 0.1, 0.5))), max(1, int(w * _uniform(g, 0.1, 0.5)))
    top, left = int(_uniform(g) * (h - mh + 1)), int(_uniform(g) * (w - mw + 1))
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[top:top + mh, left:left + mw] = True
    return mask


def _strokes(h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """1-3 brush strokes: random walks of 2-5 straight segments, each a capsule of random width."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    side = min(h, w)
    for _ in range(1 + int(_uniform(g) * 3)):
        radius = max(1.0, side * _uniform(g, 0.02, 0.08))
        y, x = _uniform(g) * h, _uniform(g) * w
        for _ in range(2 + int(_uniform(g) * 4)):
            angle, length = _uniform(g, 0, 2 * math.pi), side * _uniform(g, 0.1, 0.4)
            y2 = min(max(y + length * math.sin(angle), 0.0), h - 1.0)
            x2 = min(max(x + length * math.cos(angle), 0.0), w - 1.0)
            # Distance of every pixel near the segment (y, x)-(y2, x2) to it: only its bounding box, since
            # a full 1024x1024 grid per segment would cost the training step time.
            top, bottom = max(0, int(min(y, y2) - radius)), min(h, int(max(y, y2) + radius) + 2)
            left, right = max(0, int(min(x, x2) - radius)), min(w, int(max(x, x2) + radius) + 2)
            ys = torch.arange(top, bottom, dtype=torch.float32)[:, None]
            xs = torch.arange(left, right, dtype=torch.float32)[None, :]
            dy, dx = y2 - y, x2 - x
            t = (((ys - y) * dy + (xs - x) * dx) / max(dy * dy + dx * dx, 1e-6)).clamp(0, 1)
            mask[top:bottom, left:right] |= (ys - (y + t * dy)) ** 2 + (xs - (x + t * dx)) ** 2 <= radius * radius
            y, x = y2, x2
    return mask


def _border(h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """Outpainting: everything outside a kept window, which touches at most three sides (10-40% cut)."""
    cuts = [int(_uniform(g, 0.1, 0.4) * s) if _uniform(g) < 0.5 else 0 for s in (h, h, w, w)]
    if not any(cuts):
        cuts[int(_uniform(g) * 4) % 4] = max(1, int((h if _uniform(g) < 0.5 else w) * 0.25))
    top, bottom, left, right = cuts
    mask = torch.ones(h, w, dtype=torch.bool)
    mask[top:h - bottom, left:w - right] = False
    return mask


def draw_masks(n: int, h: int, w: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 1, h, w) bool inpainting masks, True = to be painted: per sample a rectangle, brush strokes or
    an outpainting border (a third each), all drawn from `generator`."""
    makers = (_rectangle, _strokes, _border)
    return torch.stack([makers[int(_uniform(generator) * 3) % 3](h, w, generator) for _ in range(n)])[:, None]


def control_input(kind: str, conditioning: torch.Tensor, generator: torch.Generator, degrade_factor: int) -> torch.Tensor:
    """The ControlNet input (B, 3, H, W) float32 of a batch's cached `conditioning` for `kind`."""
    x = to_unit_rgb(conditioning)
    if kind == "image":
        return degrade(x, degrade_factor)
    if kind == "inpaint":
        masks = draw_masks(x.shape[0], x.shape[2], x.shape[3], generator)
        return x.masked_fill(masks.to(x.device), MASKED)
    return x
