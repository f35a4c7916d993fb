"""SD 1.x and 2.x in the trainer: a UNet cross-attending to one CLIP encoder's cached states."""

from __future__ import annotations

from typing import Any

import torch

from latentforge.shared.config import Config

from ..objective import drop_captions
from .base import DenoiserAdapter


class SdAdapter(DenoiserAdapter):
    """SD 1.x / 2.x: UNet cross-attending to one CLIP encoder's states; no pooled, no size conditioning."""

    family = "sd"
    pipeline_class = "StableDiffusionPipeline"
    no_text = {"tokenizer": None, "text_encoder": None, "safety_checker": None, "feature_extractor": None,
               "requires_safety_checker": False}

    def load(self, config: Config) -> torch.nn.Module:
        return self._load(config)

    def expected_cache(self, model: torch.nn.Module) -> dict[str, Any]:
        cfg = model.config
        return {"family": self.family, "latent_channels": int(cfg.in_channels),
                "field_widths": {"prompt_embeds": int(cfg.cross_attention_dim)}}

    def condition(self, batch: dict[str, Any], empty: dict[str, torch.Tensor], config: Config,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
        embeds, _, _ = drop_captions(batch["prompt_embeds"], None, empty["prompt_embeds"], None,
                                     config.train.caption_dropout, generator)
        return {"encoder_hidden_states": embeds}

    def forward(self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype)).sample


class Sd1Adapter(SdAdapter):
    family = "sd1"


class Sd2Adapter(SdAdapter):
    family = "sd2"
