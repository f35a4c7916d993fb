"""The DiT families conditioned on a long masked text embedding (PixArt-Sigma, SANA): their shared conditioning."""

from __future__ import annotations

from typing import Any

import torch

from latentforge.shared.config import Config

from ..objective import drop_captions
from .base import DenoiserAdapter


class MaskedTextAdapter(DenoiserAdapter):
    """DiT families conditioned on a long, masked text embedding (T5 for PixArt, Gemma for SANA)."""

    model_subfolder = "transformer"

    def prompt_kwargs(self, embeds: dict[str, torch.Tensor], empty: dict[str, torch.Tensor]) -> dict[str, Any]:
        # These pipelines default negative_prompt to "" and refuse it beside negative embeddings.
        return {**super().prompt_kwargs(embeds, empty), "negative_prompt": None}

    def expected_cache(self, model: torch.nn.Module) -> dict[str, Any]:
        cfg = model.config
        return {"family": self.family, "latent_channels": int(cfg.in_channels),
                "field_widths": {"prompt_embeds": int(cfg.caption_channels)}}

    def condition(self, batch: dict[str, Any], empty: dict[str, torch.Tensor], config: Config,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
        embeds, _, dropped = drop_captions(batch["prompt_embeds"], None, empty["prompt_embeds"], None,
                                           config.train.caption_dropout, generator)
        # A dropped caption takes the empty prompt's mask too, or attention would see its zero padding.
        mask = torch.where(dropped.view(-1, 1), empty["prompt_mask"].to(batch["prompt_mask"].device).expand_as(batch["prompt_mask"]),
                           batch["prompt_mask"])
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
