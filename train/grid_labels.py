"""Labels on validation grids: each panel's prompt above it, each row's name and step on its left.

A validation grid is a row of equal-width panels, one per validation prompt (`validation.image_grid`).
`label_row` adds a caption strip above the panels and a name strip on the left; `stack_rows` puts
labelled rows one above the other (a later base-model / EMA row, or `latentforge compare`'s two runs).
Pure functions on HxWx3 uint8 arrays; PIL draws the text with its default font.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .loss_curve import font

PROMPT_CHARS = 40  # a panel shows this many characters of its prompt
CAPTION_H = 22  # pixels of the strip above the panels
NAME_W = 110  # pixels of the strip left of the panels
BG, FG, RULE = (255, 255, 255), (20, 20, 20), (200, 200, 200)


def shorten(text: str, limit: int = PROMPT_CHARS) -> str:
    """`text` on one line, cut to `limit` characters with a trailing "..." when longer."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:max(0, limit - 3)].rstrip() + "..."


def _fit(draw: object, text: str, width: int, fnt: object) -> str:
    """`text` shortened further until it fits `width` pixels (narrow panels of tiny models)."""
    while text and draw.textlength(text, font=fnt) > width:  # type: ignore[attr-defined]
        text = shorten(text, len(text) - 1) if len(text) > 4 else text[:-1]
    return text


def label_row(grid: np.ndarray, prompts: Sequence[str], name: str, step: int | None) -> np.ndarray:
    """`grid` (HxWx3 uint8, len(prompts) panels side by side, equal widths) with its labels drawn around it.

    Above each panel: its prompt, shortened to PROMPT_CHARS (and to the panel's width). On the left: `name`
    and "step N". Returns a new (CAPTION_H + H) x (NAME_W + W) x 3 uint8 array.
    """
    from PIL import Image, ImageDraw

    if grid.ndim != 3 or grid.shape[2] != 3 or grid.dtype != np.uint8:
        raise ValueError(f"label_row wants an HxWx3 uint8 grid, got {grid.shape} {grid.dtype}")
    h, w = grid.shape[:2]
    n = max(1, len(prompts))
    if w % n:
        raise ValueError(f"grid width {w} does not split into {n} equal panels (one per prompt)")
    panel_w = w // n
    canvas = Image.new("RGB", (NAME_W + w, CAPTION_H + h), BG)
    canvas.paste(Image.fromarray(grid), (NAME_W, CAPTION_H))
    d = ImageDraw.Draw(canvas)
    small = font(11)
    for i, prompt in enumerate(prompts):
        x = NAME_W + i * panel_w
        d.text((x + 3, CAPTION_H // 2), _fit(d, shorten(prompt), panel_w - 6, small), fill=FG, font=small, anchor="lm")
        if i:
            d.line([(x, 0), (x, CAPTION_H - 1)], fill=RULE)
    d.text((6, CAPTION_H + 4), _fit(d, name, NAME_W - 10, font(13)), fill=FG, font=font(13))
    if step is not None:
        d.text((6, CAPTION_H + 22), f"step {step}", fill=FG, font=small)
    d.line([(0, 0), (NAME_W + w, 0)], fill=RULE)  # separates rows once stacked
    return np.asarray(canvas)


def name_strip(image: np.ndarray, name: str) -> np.ndarray:
    """`image` with a NAME_W strip on its left holding `name` (for rows that already carry their own labels)."""
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    canvas = Image.new("RGB", (NAME_W + w, h), BG)
    canvas.paste(Image.fromarray(image), (NAME_W, 0))
    d = ImageDraw.Draw(canvas)
    d.text((6, 6), _fit(d, name, NAME_W - 10, font(13)), fill=FG, font=font(13))
    return np.asarray(canvas)


def stack_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Rows one above the other, left-aligned, narrower ones padded on the right with the background."""
    if not rows:
        raise ValueError("stack_rows needs at least one row")
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=BG[0]) for r in rows]
    return np.concatenate(padded, axis=0)
