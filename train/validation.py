"""Validation: held-out loss with fixed noise and timesteps, and an image grid from cached prompt embeddings.

The only place in `train/` where a VAE appears, and only its decoder runs: validation images are made
from the validation prompts' cached embeddings (no text encoder), denoised by the model being trained.
Fixed seeds make successive curves and grids comparable.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from latentforge.shared.families import family_facts

from . import objective as obj

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger("latentforge.train")
VALIDATION_SEED = 1234


@torch.no_grad()
def held_out_loss(tr: Trainer) -> float | None:
    """Mean loss over the held-out rows, with noise and timesteps drawn from a fixed seed each time."""
    if not tr.samples.val_rows:
        return None
    g = tr.val_generator.manual_seed(VALIDATION_SEED)
    total, count = 0.0, 0
    micro = tr.config.train.micro_batch_size
    for bucket, rows in sorted(tr.samples.val_rows.items()):
        for start in range(0, len(rows), micro):
            batch = tr.cache.read_rows(bucket, rows[start:start + micro])
            latents = obj.scale_latents(batch["latent_mean"].float(), tr.cache.spec.scaling_factor,
                                        tr.cache.spec.shift_factor).to(tr.dist.device)
            noise = obj.sample_noise(latents, g, 0.0)
            pair = tr.make_pair(latents, noise, g)
            cond = tr.adapter.condition({k: v.to(tr.dist.device) if torch.is_tensor(v) else v for k, v in batch.items()},
                                        tr.empty, _no_dropout(tr.config), g)
            pred = tr.adapter.forward(tr.engine.module, pair.noisy.to(tr.dtype), pair.timesteps, cond)
            total += float(obj.diffusion_loss(pred.float(), pair.target, None)) * latents.shape[0]
            count += latents.shape[0]
    return total / max(1, count)


def _no_dropout(config):  # validation conditions on the real captions and sizes
    return config.model_copy(update={"train": config.train.model_copy(update={"caption_dropout": 0.0,
                                                                              "micro_conditioning_dropout": 0.0})})


def _square_bucket(buckets: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    return min(buckets, key=lambda b: (abs(np.log(b[1] / b[0])), -b[0] * b[1]))


@torch.no_grad()
def image_grid(tr: Trainer) -> np.ndarray | None:
    """Denoise the cached validation prompts with the current weights; returns an HxWx3 uint8 grid."""
    if not tr.validation_prompts:
        return None
    import diffusers

    cfg = tr.config.model
    vae_cls = getattr(diffusers, family_facts(cfg.family).vae_class)
    vae = vae_cls.from_pretrained(cfg.vae or cfg.pretrained, subfolder=None if cfg.vae else "vae").to(tr.dist.device)
    sched_cfg = diffusers.DDPMScheduler.load_config(cfg.pretrained, subfolder="scheduler")
    scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    model = tr.engine.module
    was_training = model.training
    model.eval()
    pipe = tr.adapter.validation_pipeline(model, vae, scheduler)
    h, w = _square_bucket(tr.cache.spec.buckets)
    dev, dt = tr.dist.device, tr.dtype
    extra = {"use_resolution_binning": False} if "use_resolution_binning" in _call_args(pipe) else {}
    images = []
    for i in range(len(tr.validation_prompts)):
        embeds = {k: v[i:i + 1].to(dev, dt if v.is_floating_point() else v.dtype) for k, v in tr.validation_embeds.items()}
        empty = {k: v.to(dev, dt if v.is_floating_point() else v.dtype) for k, v in tr.empty.items()}
        out = pipe(**tr.adapter.prompt_kwargs(embeds, empty), height=h, width=w,
                   num_inference_steps=tr.config.train.validation_inference_steps, output_type="latent",
                   generator=torch.Generator(device="cpu").manual_seed(VALIDATION_SEED + i), **extra)
        # Decode in fp32 ourselves: pipelines only upcast fp16 VAEs, and bf16 latents meet an fp32 VAE here.
        latents = out.images.float() / tr.cache.spec.scaling_factor
        if tr.cache.spec.shift_factor is not None:
            latents = latents + tr.cache.spec.shift_factor
        pixels = vae.decode(latents).sample[0].clamp(-1, 1)
        images.append(((pixels.permute(1, 2, 0).float().cpu().numpy() + 1) * 127.5).round().astype(np.uint8))
    model.train(was_training)
    return np.concatenate(images, axis=1)


def _call_args(pipe: object) -> set[str]:
    import inspect

    return set(inspect.signature(type(pipe).__call__).parameters)


def validate(tr: Trainer) -> None:
    """Log the held-out loss and (main rank) save + log the image grid."""
    loss = held_out_loss(tr)
    if loss is not None:
        tr.metrics.scalar("val/loss", loss, tr.step)
    if not tr.dist.is_main:
        return
    if tr.ds_config["zero_optimization"].get("stage", 0) == 3:
        log.warning("validation images need the full weights on one rank; skipped under ZeRO-3")
        return
    grid = image_grid(tr)
    if grid is None:
        return
    from PIL import Image

    out = Path(tr.config.train.output_dir) / "validation"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step-{tr.step:08d}.png"
    Image.fromarray(grid).save(path)
    tr.metrics.image("val/images", grid, tr.step)
    tr.metrics.text("val/prompts", " | ".join(tr.validation_prompts), tr.step)
    log.info("validation: loss %s, images %s", "n/a" if loss is None else f"{loss:.4f}", path)
