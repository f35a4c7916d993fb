"""Stable Cascade Stage C in the trainer: StableCascadeUNet as the prior on EfficientNet latents, GDF objective.

The prior is called as StableCascadePriorPipeline calls it: `timestep_ratio`, `clip_text_pooled` (B, 1, 1280),
`clip_text` (B, 77, 1280) and `clip_img` zeros (B, 1, 768) for text-to-image (the original trainer zeroes it
for 90% of the samples; with no image encoder in the loop we keep all zeros). Validation images run the whole
cascade: this prior, then the Stage B decoder pipeline of `model.decoder` and its Paella VQ model (`cascade.py`).
"""

from __future__ import annotations

from typing import Any

import torch

from latentforge.shared.config import Config

from ..objective import drop_captions
from .base import DenoiserAdapter


class StableCascadeAdapter(DenoiserAdapter):
    """Stage C: the text-conditional prior over 16-channel EfficientNet latents."""

    family = "stable_cascade"
    model_class = "StableCascadeUNet"
    model_subfolder = "prior"
    pipeline_class = "StableCascadePriorPipeline"
    objective = "gdf"

    def load(self, config: Config) -> torch.nn.Module:
        return self._load(config)

    def expected_cache(self, model: torch.nn.Module) -> dict[str, Any]:
        cfg = model.config
        return {"family": self.family, "latent_channels": int(cfg.in_channels),
                "field_widths": {"prompt_embeds": int(cfg.clip_text_in_channels),
                                 "pooled_prompt_embeds": int(cfg.clip_text_pooled_in_channels)}}

    def condition(self, batch: dict[str, Any], empty: dict[str, torch.Tensor], config: Config,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = drop_captions(batch["prompt_embeds"], batch["pooled_prompt_embeds"], empty["prompt_embeds"],
                                          empty["pooled_prompt_embeds"], config.train.caption_dropout, generator)
        assert pooled is not None
        return {"clip_text": embeds, "clip_text_pooled": pooled.unsqueeze(1)}

    def forward(self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = noisy.dtype
        module = getattr(model, "module", model)  # the DeepSpeed engine wraps it; the config is the module's
        clip_img = torch.zeros(noisy.shape[0], 1, int(module.config.clip_image_in_channels), device=noisy.device,
                               dtype=dtype)
        return model(noisy, timestep_ratio=timesteps.to(dtype), clip_text_pooled=cond["clip_text_pooled"].to(dtype),
                     clip_text=cond["clip_text"].to(dtype), clip_img=clip_img).sample

    def prompt_kwargs(self, embeds: dict[str, torch.Tensor], empty: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"prompt_embeds": embeds["prompt_embeds"], "prompt_embeds_pooled": embeds["pooled_prompt_embeds"].unsqueeze(1),
                "negative_prompt_embeds": empty["prompt_embeds"].expand_as(embeds["prompt_embeds"]),
                "negative_prompt_embeds_pooled": empty["pooled_prompt_embeds"].reshape(1, 1, -1)}

    def validation_renderer(self, model: torch.nn.Module, setup: Any) -> Any:
        """The whole cascade: this prior, then the Stage B decoder and the Paella VQ model (`cascade.py`)."""
        from .cascade import cascade_renderer

        return cascade_renderer(self, model, setup)
