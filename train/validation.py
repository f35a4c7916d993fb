"""Validation: held-out loss with fixed noise and timesteps, and an image grid from cached prompt embeddings.

The only place in `train/` where a VAE appears, and only its decoder runs: validation images are made
from the validation prompts' cached embeddings (no text encoder), denoised by the model being trained.
Fixed seeds make successive curves and grids comparable. The held-out loss is the training step's own
(`step.forward_loss`). Everything comes in as arguments (model, `StepSetup`, `ValidationData`, metrics):
validation never sees the trainer, so the two cannot import each other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentforge.shared.cache_reader import CacheReader

from .grid_labels import label_row, stack_rows
from .grid_rows import (
    BASE_FILE,
    base_key,
    base_renders_later,
    base_weights,
    ema_weights,
    load_base_row,
    run_folders,
    save_base_row,
)
from .loss_curve import append_val_loss, write_loss_curve
from .metrics import Metrics
from .step import StepSetup, forward_loss

log = logging.getLogger("latentforge.train")
VALIDATION_SEED = 1234
Bucket = tuple[int, int]


@dataclass(frozen=True)
class ValidationData:
    """What validation reads, fixed for a run: the held-out rows and the cached validation prompts."""

    reader: CacheReader  # the run's cache: rows and buckets
    held_out: Mapping[Bucket, Sequence[int]]  # rows per bucket kept out of training
    prompts: list[str]
    embeds: dict[str, torch.Tensor]  # the prompts' cached text fields, one row per prompt
    controls: torch.Tensor | None = None  # ControlNet runs: one control image per prompt, (n, 3, H, W) in [0, 1]


@torch.no_grad()
def held_out_loss(model: Any, setup: StepSetup, reader: CacheReader, rows: Mapping[Bucket, Sequence[int]],
                  micro_batch_size: int) -> float | None:
    """Mean loss over the held-out `rows`, with noise and timesteps drawn from a fixed seed each time.

    The loss is `step.forward_loss`, the training step's own, in its evaluation mode.
    """
    if not rows:
        return None
    g = torch.Generator(device="cpu").manual_seed(VALIDATION_SEED)
    total, count = 0.0, 0
    for bucket, bucket_rows in sorted(rows.items()):
        for start in range(0, len(bucket_rows), micro_batch_size):
            batch = reader.read_rows(bucket, bucket_rows[start:start + micro_batch_size])
            result = forward_loss(model, setup, batch, g, evaluate=True)
            total += float(result.loss) * result.samples
            count += result.samples
    return total / max(1, count)


def _square_bucket(buckets: tuple[Bucket, ...]) -> Bucket:
    return min(buckets, key=lambda b: (abs(np.log(b[1] / b[0])), -b[0] * b[1]))


@torch.no_grad()
def image_grid(model: torch.nn.Module, setup: StepSetup, buckets: tuple[Bucket, ...], prompts: list[str],
               embeds: dict[str, torch.Tensor], *, decode: bool = True, controls: torch.Tensor | None = None,
               adapter: Any = None, size: Bucket | None = None) -> np.ndarray | None:
    """Denoise the cached validation prompts with `model`'s current weights; returns an HxWx3 uint8 grid.

    One image per prompt at the squarest of the cache's `buckets`, seeded per prompt. With `controls`
    (a ControlNet run) each prompt is steered by its control image, made at that image's size, and the
    grid shows the control image above each output. `decode=False`
    runs the denoiser's calls only and returns None: what the other ranks do under ZeRO-3, where every
    forward gathers the partitioned weights collectively, so every rank must make the same calls.
    `adapter` renders with another family adapter than the run's (a ControlNet run's base row: the UNet
    alone), `size` fixes the panel size (that row's, the control images').
    """
    if not prompts:
        return None
    was_training = model.training
    model.eval()
    adapter = adapter or setup.adapter
    render = adapter.validation_renderer(model, setup)
    h, w = size or (_square_bucket(buckets) if controls is None else tuple(controls.shape[-2:]))
    dev, dt = setup.device, setup.dtype
    scale = getattr(adapter, "scale", 1.0)
    images = []
    for i in range(len(prompts)):
        one = {k: v[i:i + 1].to(dev, dt if v.is_floating_point() else v.dtype) for k, v in embeds.items()}
        empty = {k: v.to(dev, dt if v.is_floating_point() else v.dtype) for k, v in setup.empty.items()}
        call = None if controls is None else {"image": controls[i:i + 1].to(dev, dt),
                                              "controlnet_conditioning_scale": scale}
        image = render((h, w), one, empty, torch.Generator(device="cpu").manual_seed(VALIDATION_SEED + i), decode, call)
        if image is None:
            continue
        if controls is not None:  # the control above its output; inpainting's masked -1 shows black
            shown = (controls[i].clamp(0, 1).permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
            image = np.concatenate([shown, image], axis=0)
        images.append(image)
    model.train(was_training)
    return np.concatenate(images, axis=1) if images else None


def base_row(model: torch.nn.Module, setup: StepSetup, data: ValidationData, step: int, *, is_main: bool,
             sharded: bool) -> np.ndarray | None:
    """The grid's labelled `base` row on the main rank (None elsewhere, or when there is none to show).

    Read from OUTPUT/validation/base.png when it was rendered for this cache, these prompts and settings;
    else rendered now and kept there: at step 0 (before any training), or at any step for LoRA and
    ControlNet runs, which still hold their base weights (`grid_rows`). Under ZeRO-3 every rank renders
    or none does (rank 0 decides), since each forward gathers the weights collectively.
    """
    if not is_main and not sharded:
        return None
    config, out_dir = setup.config, Path(setup.config.train.output_dir)
    key = base_key(config, data.reader.spec.fingerprint, data.prompts)
    row = None
    for folder in run_folders(out_dir, config.train.resume) if is_main else ():
        row = load_base_row(folder, key)
        if row is not None:
            if folder != out_dir:  # a resume into a new output folder keeps its run's base row
                save_base_row(out_dir, row, key)
            break
    if not _rank0_says(row is None, sharded) or not data.prompts:
        return row
    if step > 0 and not base_renders_later(config):
        if is_main:
            log.info("validation: no base row: %s was not rendered for these prompts and settings at step 0, and "
                     "the weights have trained since", out_dir / BASE_FILE)
        return None
    started = time.perf_counter()
    controls = data.controls
    with base_weights(model, setup.adapter, config) as (module, adapter):
        grid = image_grid(module, setup, data.reader.spec.buckets, data.prompts, data.embeds, decode=is_main,
                          adapter=adapter, size=None if controls is None else tuple(controls.shape[-2:]))
    if grid is None or not is_main:
        return None
    row = label_row(grid, data.prompts, "base", 0)
    path = save_base_row(out_dir, row, key)
    log.info("validation: base row rendered in %.2f s, kept in %s", time.perf_counter() - started, path)
    return row


def _rank0_says(flag: bool, sharded: bool) -> bool:
    """Rank 0's `flag` on every rank (ZeRO-3 with several ranks), else `flag`."""
    import torch.distributed as dist

    if not sharded or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def validate(model: torch.nn.Module, setup: StepSetup, data: ValidationData, metrics: Metrics, step: int, *,
             is_main: bool, sharded: bool, base: np.ndarray | None = None, ema: Any = None) -> None:
    """Log the held-out loss (every rank computes it) and, on the main rank, save and log the image grid.

    The main rank also appends the loss to OUTPUT/val_log.jsonl, redraws OUTPUT/loss_curve.png, and labels
    the grid (`grid_labels.label_row`: each panel's prompt, the row's name and the step). The grid's rows:
    `base` (the kept row from `base_row`, when given), `current`, and `ema` (the EMA's weights swapped in,
    when `ema` is given: on the main rank without ZeRO-3, on every rank with it).

    `model` is the bare module being trained (not the DeepSpeed engine); `sharded` says its weights are
    partitioned over ranks (ZeRO-3). Then each forward pass gathers the weights from all ranks, so every
    rank runs the same held-out batches and the same denoising steps (the same calls, in the same order),
    and only the main rank decodes and writes the grid.
    """
    loss = held_out_loss(model, setup, data.reader, data.held_out, setup.config.train.micro_batch_size)
    out_dir = Path(setup.config.train.output_dir)
    if loss is not None:
        metrics.scalar("val/loss", loss, step)
        if is_main:
            append_val_loss(out_dir, step, loss)
    if is_main:  # the curve for people without TensorBoard open, redrawn with the new held-out point
        write_loss_curve(out_dir)
    if not is_main and not sharded:
        return

    def draw() -> np.ndarray | None:
        return image_grid(model, setup, data.reader.spec.buckets, data.prompts, data.embeds, decode=is_main,
                          controls=data.controls)

    current = draw()
    averaged = None
    if ema is not None:
        with ema_weights(model, ema, sharded):
            averaged = draw()
    if current is None or not is_main:
        return
    from PIL import Image

    rows = [base] if base is not None else []
    rows.append(label_row(current, data.prompts, "current", step))
    if averaged is not None:
        rows.append(label_row(averaged, data.prompts, "ema", step))
    grid = stack_rows(rows)
    out = out_dir / "validation"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step-{step:08d}.png"
    Image.fromarray(grid).save(path)
    metrics.image("val/images", grid, step)
    metrics.text("val/prompts", " | ".join(data.prompts), step)
    log.info("validation: loss %s, images %s (rows: %s)", "n/a" if loss is None else f"{loss:.4f}", path,
             ", ".join(n for n, r in (("base", base), ("current", current), ("ema", averaged)) if r is not None))
