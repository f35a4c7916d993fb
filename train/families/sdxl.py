"""SDXL in the trainer: UNet with text_time added conditioning from the cached pooled embedding and sizes."""

from __future__ import annotations

from typing import Any

import torch

from latentforge.shared.config import Config

from ..objective import drop_captions, sdxl_add_time_ids
from .base import DenoiserAdapter


class SdxlAdapter(DenoiserAdapter):
    """SDXL: UNet with `text_time` conditioning (pooled text embedding + six size/crop numbers)."""

    family = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    no_text = {"tokenizer": None, "tokenizer_2": None, "text_encoder": None, "text_encoder_2": None,
               "add_watermarker": False}

    def load(self, config: Config) -> torch.nn.Module:
        return self._load(config)

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
