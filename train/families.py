"""Per-family denoiser adapters: load the trainable model, say what cache it needs, run its forward.

The training loop only talks to `DenoiserAdapter`; adding a family adds one class here (and one in
`preprocess/encoders.py`), never a branch in the loop. Nothing here imports a text encoder.
"""

from __future__ import annotations

from typing import Any

import torch

from latentforge.shared.config import Config

from .objective import drop_captions, sdxl_add_time_ids


class DenoiserAdapter:
    """Interface of a family: `load`, `expected_cache`, `condition`, `forward`."""

    family: str = ""
    model_subfolder: str = "unet"  # where the trained model lives in a diffusers pipeline folder
    model_class: str = "UNet2DConditionModel"  # diffusers class of the trained model
    pipeline_class: str = ""  # diffusers pipeline class an export loads with

    def load(self, config: Config) -> torch.nn.Module:
        raise NotImplementedError

    def expected_cache(self, model: torch.nn.Module) -> dict[str, Any]:
        """Arguments for `CacheReader.check_compatible`, read from the model's own config."""
        raise NotImplementedError

    def condition(self, batch: dict[str, Any], empty: dict[str, torch.Tensor], config: Config,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Text and extra conditioning for a batch, with train-time caption/micro-conditioning dropout."""
        raise NotImplementedError

    def forward(self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class SdxlAdapter(DenoiserAdapter):
    """SDXL: UNet with `text_time` conditioning (pooled text embedding + six size/crop numbers)."""

    family = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"

    def load(self, config: Config) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        kwargs: dict[str, Any] = {}
        if config.model.revision:
            kwargs["revision"] = config.model.revision
        if config.model.variant:
            kwargs["variant"] = config.model.variant
        unet = UNet2DConditionModel.from_pretrained(config.model.pretrained, subfolder="unet", torch_dtype=torch.float32, **kwargs)
        if config.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return unet

    def expected_cache(self, model: torch.nn.Module) -> dict[str, Any]:
        cfg = model.config
        pooled = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
        return {"family": "sdxl", "latent_channels": int(cfg.in_channels),
                "field_widths": {"prompt_embeds": int(cfg.cross_attention_dim), "pooled_prompt_embeds": pooled}}

    def condition(self, batch: dict[str, Any], empty: dict[str, torch.Tensor], config: Config,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = drop_captions(batch["prompt_embeds"], batch["pooled_prompt_embeds"], empty["prompt_embeds"],
                                          empty["pooled_prompt_embeds"], config.train.caption_dropout, generator)
        time_ids = sdxl_add_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"],
                                     config.train.micro_conditioning_dropout, generator)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids}

    def forward(self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = noisy.dtype
        return model(
            noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
            added_cond_kwargs={"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)},
        ).sample


ADAPTERS: dict[str, type[DenoiserAdapter]] = {"sdxl": SdxlAdapter}


def adapter_for(family: str) -> DenoiserAdapter:
    try:
        return ADAPTERS[family]()
    except KeyError:
        raise ValueError(f"model.family {family!r}: the trainer supports {', '.join(ADAPTERS)} so far") from None
