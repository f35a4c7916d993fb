"""Validation images of a one-stage family: its pipeline around the model being trained, then its VAE's decoder.

Built once per grid (`DenoiserAdapter.validation_renderer`), called once per prompt. Only the VAE decoder
runs here; the text side comes from the cached embeddings.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from latentforge.shared.families import family_facts

from ..noise_options import sampling_scheduler

# (size, prompt fields, empty fields, generator, decode, extra pipeline arguments such as a control image)
Renderer = Callable[[tuple[int, int], dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Generator, bool,
                     "dict[str, Any] | None"], "np.ndarray | None"]


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> HxWx3 uint8."""
    return ((pixels.clamp(-1, 1).permute(1, 2, 0).float().cpu().numpy() + 1) * 127.5).round().astype(np.uint8)


def load_vae(setup: Any) -> Any:
    """The run's VAE (model.vae, or the pipeline's vae/ folder) on the setup's device, in fp32."""
    import diffusers

    cfg = setup.config.model
    vae_cls = getattr(diffusers, family_facts(cfg.family).vae_class)
    vae_source = {} if cfg.vae else {"subfolder": "vae", **cfg.pins()}  # a separate VAE: its own repo's default
    return vae_cls.from_pretrained(cfg.vae or cfg.pretrained, **vae_source).to(setup.device)


def vae_renderer(adapter: Any, model: torch.nn.Module, setup: Any) -> Renderer:
    """The family pipeline (latents out) and its VAE decoder, decoding in fp32."""
    import diffusers

    cfg = setup.config.model
    vae = load_vae(setup)
    sched_cfg = diffusers.DDPMScheduler.load_config(cfg.pretrained, subfolder="scheduler", **cfg.pins(weights=False))
    scheduler = sampling_scheduler(setup.config, dict(sched_cfg))  # EDM / zero terminal SNR: what training assumed
    pipe = adapter.validation_pipeline(model, vae, scheduler)
    extra = {"use_resolution_binning": False} if "use_resolution_binning" in call_args(pipe) else {}

    def render(size: tuple[int, int], one: dict[str, torch.Tensor], empty: dict[str, torch.Tensor],
               generator: torch.Generator, decode: bool, call: dict[str, Any] | None = None) -> np.ndarray | None:
        out = pipe(**adapter.prompt_kwargs(one, empty), height=size[0], width=size[1],
                   num_inference_steps=setup.config.train.validation_inference_steps, output_type="latent",
                   generator=generator, **extra, **(call or {}))
        if not decode:
            return None
        # Decode in fp32 ourselves: pipelines only upcast fp16 VAEs, and bf16 latents meet an fp32 VAE here.
        latents = out.images.float() / setup.scaling_factor
        if setup.shift_factor is not None:
            latents = latents + setup.shift_factor
        return to_uint8(vae.decode(latents).sample[0])

    return render


def call_args(pipe: object) -> set[str]:
    """The keyword arguments a pipeline's `__call__` takes."""
    return set(inspect.signature(type(pipe).__call__).parameters)
