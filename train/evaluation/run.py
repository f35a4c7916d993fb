"""One evaluation: make the images (every rank), score them (rank 0), log and write the figures.

Figures go to TensorBoard as `eval/<metric>` (through `Metrics.scalar`, so every reporter the run has gets
them), to OUTPUT/eval/<step>.json (written to a temporary name and renamed) and, through the returned
dict, to run_summary.json. A metric that cannot be computed (no held-out split for FID, no validation
prompts for CLIP score, too few images) is listed under `skipped` with the reason instead of a number.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import write_atomic
from ..metrics import Metrics
from ..step import StepSetup
from ..validation import ValidationData
from . import scores
from .backbones import Backbones, load_backbones
from .generate import Images, generate, has_reference_decoder, plan

log = logging.getLogger("latentforge.train")


def run_evaluation(model: torch.nn.Module, setup: StepSetup, data: ValidationData, step: int, *, rank: int,
                   world: int, sharded: bool, metrics: Metrics | None, output_dir: Path,
                   backbones: Backbones | None = None) -> dict[str, Any] | None:
    """Evaluate `model`'s current weights (collective: every rank calls it); the figures on rank 0, else None.

    `backbones` defaults to those `train.eval` names (loaded once per process)."""
    cfg = setup.config.train.eval
    if backbones is None and rank == 0:  # missing weights: said before minutes of generation, not after
        backbones = load_backbones(cfg, cfg.metrics)
    items = plan(data, cfg.num_images, cfg.seeds_per_prompt)
    t0 = time.perf_counter()
    images = generate(model, setup, data, items, steps=cfg.steps or setup.config.train.validation_inference_steps,
                      guidance_scale=cfg.guidance_scale, rank=rank, world=world, sharded=sharded)
    if images is None:
        return None
    made = time.perf_counter() - t0
    assert backbones is not None
    figures, skipped = score(images, backbones, cfg.metrics, cfg.batch_size, setup.device,
                             reference_decoder=has_reference_decoder(setup))
    result = {"step": step, "metrics": figures, "skipped": skipped,
              "images": {"held_out_generated": len(images.generated), "reference": len(images.reference),
                         "prompt_images": len(images.prompt_images)},
              "seconds": {"generate": round(made, 3), "score": round(time.perf_counter() - t0 - made, 3)},
              "world_size": world, "settings": cfg.model_dump(mode="json")}
    write_atomic(output_dir / "eval" / f"{step}.json", json.dumps(result, indent=2))
    for key, value in figures.items():
        if metrics is not None:
            metrics.scalar(f"eval/{key}", value, step)
    log.info("evaluation at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in figures.items()) or "nothing")
    return result


def score(images: Images, backbones: Backbones, wanted: list[str], batch_size: int, device: torch.device, *,
          reference_decoder: bool = True) -> tuple[dict[str, float], dict[str, str]]:
    """The figures of `wanted` metrics and, for each one that could not be computed, why."""
    figures: dict[str, float] = {}
    skipped: dict[str, str] = {}
    want = set(wanted)
    if want & {"fid", "kid", "is"}:
        assert backbones.inception is not None
        net = backbones.inception.to(device)
        everything = images.generated + images.prompt_images
        pool, logits = scores.inception_features(everything, net, batch_size, device)
        fake = pool[:len(images.generated)]
        ref_pool, _ = (scores.inception_features(images.reference, net, batch_size, device) if images.reference
                       else (None, None))
        backbones.inception.cpu()
        why = _why_no_fid(images, reference_decoder)
        for name in ("fid", "kid"):
            if name in want and why:
                skipped[name] = why
        if "fid" in want and not why:
            figures["fid"] = scores.fid(ref_pool, fake)
        if "kid" in want and not why:
            figures["kid"], figures["kid_std"] = scores.kid(ref_pool, fake)
        if "is" in want:
            if len(everything) < 2:
                skipped["is"] = "fewer than 2 generated images"
            else:
                figures["is"], figures["is_std"] = scores.inception_score(logits)
    no_prompts = "no validation prompts in the cache (data.validation_prompts)"
    if "clip" in want:
        if images.prompt_images:
            figures["clip_score"] = scores.clip_score(images.prompt_images, images.prompt_texts, backbones.clip,
                                                      batch_size, device)
            backbones.clip[0].cpu()
        else:
            skipped["clip"] = no_prompts
    if "hps" in want:
        if images.prompt_images:
            figures["hps"] = scores.hps_score(images.prompt_images, images.prompt_texts, backbones.hps, batch_size, device)
            backbones.hps.model.cpu()
        else:
            skipped["hps"] = no_prompts
    if "lpips" in want:
        value = scores.lpips_diversity(images.prompt_groups, backbones.lpips.to(device), device)
        backbones.lpips.cpu()
        if value is None:
            skipped["lpips"] = "needs validation prompts and train.eval.seeds_per_prompt >= 2"
        else:
            figures["lpips_diversity"] = value
    return figures, skipped


def _why_no_fid(images: Images, reference_decoder: bool) -> str:
    if not reference_decoder:
        return "this family's cached latents have no VAE to decode references here"
    if len(images.generated) < 2:
        return "fewer than 2 held-out rows (set train.held_out_fraction, e.g. 0.05)"
    return ""

