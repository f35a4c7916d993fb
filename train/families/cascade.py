"""Validation images through the whole Stable Cascade: the prior being trained (Stage C), then Stage B and Stage A.

Stage C runs in StableCascadePriorPipeline around the model being trained (cached prompt embeddings, the empty
prompt as the negative); its 16-channel output goes to StableCascadeDecoderPipeline (Stage B, conditioned on the
pooled embedding) and the Paella VQ model (Stage A) decodes the pixels. The decoder comes from `model.decoder`
(a pipeline folder or hub id, e.g. stabilityai/stable-cascade), else a `decoder/` folder inside a local
`model.pretrained` (the devkit's tiny model); without one, validation images are skipped with a warning.
No text encoder is loaded: the pipelines only read a dtype from it, which `_DtypeOnly` provides.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentforge.shared.families import family_facts

from .render import Renderer

log = logging.getLogger("latentforge.train")


class _DtypeOnly(torch.nn.Module):
    """Stands in for the prior pipeline's text encoder: given embeddings, the pipeline reads only its dtype and device."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("marker", torch.zeros(1, dtype=dtype, device=device))

    @property
    def dtype(self) -> torch.dtype:
        return self.marker.dtype

    @property
    def device(self) -> torch.device:  # the pipeline's `device` asks every component
        return self.marker.device


def decoder_source(config: Any) -> str | None:
    """`model.decoder`, else `<model.pretrained>/decoder` when that is a pipeline folder, else None."""
    if config.model.decoder:
        return str(config.model.decoder)
    local = Path(config.model.pretrained) / "decoder"
    return str(local) if (local / "model_index.json").is_file() else None


def prior_height(latent_side: int, resolution_multiple: float) -> int:
    """The pipeline height/width whose `ceil(x / resolution_multiple)` is `latent_side` (1024 for 24 at 42.67)."""
    return int(math.floor(latent_side * resolution_multiple))


def load_decoder(source: str, **kwargs: Any) -> Any:
    """StableCascadeDecoderPipeline (fp32) without its text side, built from its components: diffusers no longer
    resolves `["diffusers", "PaellaVQModel"]` in model_index.json (the class moved to `deprecated`), so
    `from_pretrained` of the whole pipeline fails on the real repo too."""
    import diffusers
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel

    config = diffusers.StableCascadeDecoderPipeline.load_config(source, **kwargs)
    return diffusers.StableCascadeDecoderPipeline(
        decoder=diffusers.StableCascadeUNet.from_pretrained(source, subfolder="decoder", **kwargs),
        vqgan=PaellaVQModel.from_pretrained(source, subfolder="vqgan", **kwargs),
        scheduler=diffusers.DDPMWuerstchenScheduler.from_pretrained(source, subfolder="scheduler", **kwargs),
        tokenizer=None, text_encoder=None, latent_dim_scale=float(config.get("latent_dim_scale", 10.67)))


def cascade_renderer(adapter: Any, model: torch.nn.Module, setup: Any) -> Renderer:
    """Prior pipeline around `model` + Stage B decoder + Paella VQ (see the module docstring)."""
    import diffusers

    cfg = setup.config.model
    pins = cfg.pins(weights=False)
    prior_cfg = diffusers.StableCascadePriorPipeline.load_config(cfg.pretrained, **pins)
    scheduler = diffusers.DDPMWuerstchenScheduler.from_pretrained(cfg.pretrained, subfolder="scheduler", **pins)
    multiple = float(prior_cfg.get("resolution_multiple", 42.67))
    prior = diffusers.StableCascadePriorPipeline(tokenizer=None, text_encoder=_DtypeOnly(setup.dtype, setup.device),
                                                 prior=model, scheduler=scheduler, resolution_multiple=multiple)
    prior.set_progress_bar_config(disable=True)
    source = decoder_source(setup.config)
    decoder = None
    if source is None:
        log.warning("validation: no Stage B decoder (set model.decoder, e.g. stabilityai/stable-cascade); "
                    "Stable Cascade validation images are skipped")
    else:
        decoder = load_decoder(source).to(setup.device)
        decoder.set_progress_bar_config(disable=True)
    steps = setup.config.train.validation_inference_steps
    cell = family_facts(cfg.family).vae_downsample  # pixels per Stage C latent cell (32)

    def render(size: tuple[int, int], one: dict[str, torch.Tensor], empty: dict[str, torch.Tensor],
               generator: torch.Generator, decode: bool, call: dict[str, Any] | None = None) -> np.ndarray | None:
        h, w = (prior_height(side // cell, multiple) for side in size)
        kwargs = adapter.prompt_kwargs(one, empty)
        out = prior(**kwargs, height=h, width=w, num_inference_steps=steps, generator=generator, output_type="pt")
        if not decode or decoder is None:
            return None
        pooled = kwargs["prompt_embeds_pooled"].float()
        images = decoder(image_embeddings=out.image_embeddings.float(), prompt_embeds=kwargs["prompt_embeds"].float(),
                         prompt_embeds_pooled=pooled, num_inference_steps=steps, guidance_scale=0.0,
                         generator=generator, output_type="pt").images
        return (images[0].permute(1, 2, 0).float().cpu().numpy().clip(0, 1) * 255).round().astype(np.uint8)

    return render

