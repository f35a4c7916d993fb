"""`OUTPUT/loss_curve.png`: training loss (and held-out loss) against step, drawn with PIL alone.

For people without TensorBoard open. The trainer writes one JSON line per optimizer step to
`OUTPUT/train_log.jsonl` (step, loss, lr, epoch) and one per validation to `OUTPUT/val_log.jsonl`
(step, val_loss); `write_loss_curve` reads both and redraws the PNG. The maths of the plot (ticks and the
value-to-pixel map) are pure functions, so the tests check the drawing through them. No matplotlib: it is
not a dependency, and a line chart with axes, ticks and a legend is a few dozen lines of `ImageDraw`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRAIN_LOG = "train_log.jsonl"
VAL_LOG = "val_log.jsonl"
CURVE_FILE = "loss_curve.png"
WIDTH, HEIGHT = 720, 420
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 40, 50
BG, FG, GRID = (255, 255, 255), (20, 20, 20), (225, 225, 225)
# Colour of each series in order: blue, orange, green, red (the usual plotting palette, readable in grey too).
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))

Series = tuple[Sequence[float], Sequence[float]]  # (steps, values)


def font(size: int = 13) -> Any:
    """PIL's default font at `size` (a scalable font from Pillow 10.1; the bitmap font before)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def read_jsonl(path: Path, key: str) -> Series:
    """(steps, values) of the lines of `path` that carry `key`, in step order; a missing file gives empty lists.

    A resumed run appends again from its checkpoint's step, so a step logged twice keeps its last value.
    A line cut short by a crash (the last one, unterminated) is skipped rather than failing the plot.
    """
    by_step: dict[float, float] = {}
    if not path.is_file():
        return [], []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        value = row.get(key) if isinstance(row, dict) else None
        if isinstance(value, int | float) and math.isfinite(value) and "step" in row:
            by_step[float(row["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def run_curves(run_dir: Path) -> dict[str, Series]:
    """The series of one run folder: "loss" from train_log.jsonl, "val loss" from val_log.jsonl when present."""
    curves = {"loss": read_jsonl(run_dir / TRAIN_LOG, "loss")}
    val = read_jsonl(run_dir / VAL_LOG, "val_loss")
    if val[0]:
        curves["val loss"] = val
    return curves


def nice_ticks(lo: float, hi: float, count: int = 5, *, integer: bool = False) -> list[float]:
    """About `count` round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi].

    `integer` keeps the spacing at 1 or more (steps are whole numbers: no tick at step 1.2).
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range must be finite, got [{lo}, {hi}]")
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    if integer:
        step = max(step, 1)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


@dataclass(frozen=True)
class Axis:
    """Maps data values in [lo, hi] linearly onto pixels [p0, p1] (p1 < p0 for a y axis: up is smaller y)."""

    lo: float
    hi: float
    p0: float
    p1: float

    def to_pixel(self, value: float) -> float:
        """The pixel coordinate of `value`; a flat range maps everything to the middle."""
        if self.hi == self.lo:
            return (self.p0 + self.p1) / 2
        return self.p0 + (value - self.lo) / (self.hi - self.lo) * (self.p1 - self.p0)


def axes_for(curves: Mapping[str, Series], size: tuple[int, int] = (WIDTH, HEIGHT)) -> tuple[Axis, Axis]:
    """The x (step) and y (loss) axes that hold every point of `curves`, padded 5% in y."""
    xs = [x for steps, _ in curves.values() for x in steps]
    ys = [y for _, values in curves.values() for y in values]
    if not xs:
        xs, ys = [0.0, 1.0], [0.0, 1.0]
    pad = (max(ys) - min(ys)) * 0.05 or abs(max(ys)) * 0.05 or 1.0
    w, h = size
    x_axis = Axis(min(xs), max(xs), MARGIN_LEFT, w - MARGIN_RIGHT)
    y_axis = Axis(min(ys) - pad, max(ys) + pad, h - MARGIN_BOTTOM, MARGIN_TOP)
    return x_axis, y_axis


def _label(value: float) -> str:
    return f"{value:.4g}"


def draw_curves(curves: Mapping[str, Series], path: Path, title: str, size: tuple[int, int] = (WIDTH, HEIGHT)) -> Path:
    """Draw each named (steps, values) series as a line on shared axes, with ticks, a legend and `title`.

    A series of one point is drawn as a dot. Returns `path` (PNG; parent folders are made).
    """
    from PIL import Image, ImageDraw

    w, h = size
    x_axis, y_axis = axes_for(curves, size)
    img = Image.new("RGB", size, BG)
    d = ImageDraw.Draw(img)
    small = font(12)
    left, right, top, bottom = MARGIN_LEFT, w - MARGIN_RIGHT, MARGIN_TOP, h - MARGIN_BOTTOM
    for tick in nice_ticks(y_axis.lo, y_axis.hi):
        y = y_axis.to_pixel(tick)
        d.line([(left, y), (right, y)], fill=GRID)
        d.line([(left - 4, y), (left, y)], fill=FG)
        d.text((left - 6, y), _label(tick), fill=FG, font=small, anchor="rm")
    for tick in nice_ticks(x_axis.lo, x_axis.hi, 6, integer=True):
        x = x_axis.to_pixel(tick)
        d.line([(x, top), (x, bottom)], fill=GRID)
        d.line([(x, bottom), (x, bottom + 4)], fill=FG)
        d.text((x, bottom + 6), _label(tick), fill=FG, font=small, anchor="mt")
    d.rectangle([left, top, right, bottom], outline=FG)
    d.text((w / 2, 8), title, fill=FG, font=font(14), anchor="mt")
    d.text(((left + right) / 2, h - 6), "step", fill=FG, font=small, anchor="mb")
    d.text((6, (top + bottom) / 2), "loss", fill=FG, font=small, anchor="lm")
    legend_x = right - 40 - max((d.textlength(name, font=small) for name in curves), default=0)
    for i, (name, (steps, values)) in enumerate(curves.items()):
        colour = PALETTE[i % len(PALETTE)]
        points = [(x_axis.to_pixel(x), y_axis.to_pixel(y)) for x, y in zip(steps, values, strict=True)]
        if len(points) > 1:
            d.line(points, fill=colour, width=2)
        for x, y in points if len(points) <= 50 else ():  # markers while they stay readable
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        ly = top + 8 + 18 * i  # legend, top right inside the plot
        d.line([(legend_x, ly + 6), (legend_x + 24, ly + 6)], fill=colour, width=3)
        d.text((legend_x + 30, ly), name, fill=FG, font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def write_loss_curve(run_dir: Path) -> Path | None:
    """Redraw `run_dir/loss_curve.png` from the run's logs; None while no step is logged yet."""
    curves = run_curves(run_dir)
    if not curves["loss"][0]:
        return None
    return draw_curves(curves, run_dir / CURVE_FILE, f"{run_dir.name}: loss per step")


def append_val_loss(run_dir: Path, step: int, loss: float) -> None:
    """One line of `run_dir/val_log.jsonl`: the held-out loss at `step` (main rank only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / VAL_LOG, "a") as f:
        f.write(json.dumps({"step": step, "val_loss": loss}) + "\n")
