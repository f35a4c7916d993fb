"""Validation: held-out loss with fixed noise and timesteps, and an image grid from cached prompt embeddings.

The only place in `train/` where a VAE appears, and only its decoder runs: validation images are made
from the validation prompts' cached embeddings (no text encoder), denoised by the model being trained.
Fixed seeds make successive curves and grids comparable. The held-out loss is the training step's own
(`step.forward_loss`). Everything comes in as arguments (model, `StepSetup`, `ValidationData`, metrics):
validation never sees the trainer, so the two cannot import each other.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentforge.shared.cache_reader import CacheReader
from latentforge.shared.families import family_facts

from .metrics import Metrics
from .noise_options import sampling_scheduler
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
               embeds: dict[str, torch.Tensor], *, decode: bool = True) -> np.ndarray | None:
    """Denoise the cached validation prompts with `model`'s current weights; returns an HxWx3 uint8 grid.

    One image per prompt at the squarest of the cache's `buckets`, seeded per prompt. `decode=False`
    runs the denoiser's calls only and returns None: what the other ranks do under ZeRO-3, where every
    forward gathers the partitioned weights collectively, so every rank must make the same calls.
    """
    if not prompts:
        return None
    import diffusers

    cfg = setup.config.model
    vae_cls = getattr(diffusers, family_facts(cfg.family).vae_class)
    vae_source = {} if cfg.vae else {"subfolder": "vae", **cfg.pins()}  # a separate VAE: its own repo's default
    vae = vae_cls.from_pretrained(cfg.vae or cfg.pretrained, **vae_source).to(setup.device)
    sched_cfg = diffusers.DDPMScheduler.load_config(cfg.pretrained, subfolder="scheduler", **cfg.pins(weights=False))
    scheduler = sampling_scheduler(setup.config, dict(sched_cfg))  # EDM / zero terminal SNR: what training assumed
    was_training = model.training
    model.eval()
    pipe = setup.adapter.validation_pipeline(model, vae, scheduler)
    h, w = _square_bucket(buckets)
    dev, dt = setup.device, setup.dtype
    extra = {"use_resolution_binning": False} if "use_resolution_binning" in _call_args(pipe) else {}
    images = []
    for i in range(len(prompts)):
        one = {k: v[i:i + 1].to(dev, dt if v.is_floating_point() else v.dtype) for k, v in embeds.items()}
        empty = {k: v.to(dev, dt if v.is_floating_point() else v.dtype) for k, v in setup.empty.items()}
        out = pipe(**setup.adapter.prompt_kwargs(one, empty), height=h, width=w,
                   num_inference_steps=setup.config.train.validation_inference_steps, output_type="latent",
                   generator=torch.Generator(device="cpu").manual_seed(VALIDATION_SEED + i), **extra)
        if not decode:
            continue
        # Decode in fp32 ourselves: pipelines only upcast fp16 VAEs, and bf16 latents meet an fp32 VAE here.
        latents = out.images.float() / setup.scaling_factor
        if setup.shift_factor is not None:
            latents = latents + setup.shift_factor
        pixels = vae.decode(latents).sample[0].clamp(-1, 1)
        images.append(((pixels.permute(1, 2, 0).float().cpu().numpy() + 1) * 127.5).round().astype(np.uint8))
    model.train(was_training)
    return np.concatenate(images, axis=1) if images else None


def _call_args(pipe: object) -> set[str]:
    import inspect

    return set(inspect.signature(type(pipe).__call__).parameters)


def validate(model: torch.nn.Module, setup: StepSetup, data: ValidationData, metrics: Metrics, step: int, *,
             is_main: bool, sharded: bool) -> None:
    """Log the held-out loss (every rank computes it) and, on the main rank, save and log the image grid.

    `model` is the bare module being trained (not the DeepSpeed engine); `sharded` says its weights are
    partitioned over ranks (ZeRO-3). Then each forward pass gathers the weights from all ranks, so every
    rank runs the same held-out batches and the same denoising steps (the same calls, in the same order),
    and only the main rank decodes and writes the grid.
    """
    loss = held_out_loss(model, setup, data.reader, data.held_out, setup.config.train.micro_batch_size)
    if loss is not None:
        metrics.scalar("val/loss", loss, step)
    if not is_main and not sharded:
        return
    grid = image_grid(model, setup, data.reader.spec.buckets, data.prompts, data.embeds, decode=is_main)
    if grid is None or not is_main:
        return
    from PIL import Image

    out = Path(setup.config.train.output_dir) / "validation"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step-{step:08d}.png"
    Image.fromarray(grid).save(path)
    metrics.image("val/images", grid, step)
    metrics.text("val/prompts", " | ".join(data.prompts), step)
    log.info("validation: loss %s, images %s", "n/a" if loss is None else f"{loss:.4f}", path)
