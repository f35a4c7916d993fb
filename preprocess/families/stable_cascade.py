"""Stable Cascade (Stage C) in the cache job: CLIP ViT-bigG last hidden state + pooled projection, through
StableCascadePriorPipeline.encode_prompt (the latent side is the EfficientNet encoder, `encoders.EffnetEncoder`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from latentforge.shared.config import Config

from .pipeline_text import PipelineText


class StableCascadeText(PipelineText):
    """The prior pipeline's own `encode_prompt`: `hidden_states[-1]` (77 x 1280, padding kept: the prior attends to
    all 77 positions, as in training) and `text_embeds` (1280), with the tokenizer's attention mask passed to CLIP."""

    pipeline_class, encoder_class, tokenizer_class = ("StableCascadePriorPipeline", "CLIPTextModelWithProjection",
                                                      "CLIPTokenizer")

    def __init__(self, config: Config, device: torch.device) -> None:
        super().__init__(config, device)
        self.pooled_dim = int(self.pipe.text_encoder.config.projection_dim)
        if self.tokens != 77:
            raise ValueError(f"cache.max_tokens={self.tokens}: Stable Cascade's prior reads 77 CLIP tokens; unset it")

    def _text_only_pipeline(self, cls: Any, tokenizer: Any, encoder: Any) -> Any:
        return cls(tokenizer=tokenizer, text_encoder=encoder, prior=None, scheduler=None)

    @torch.inference_mode()
    def _encode_unique(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _, _ = self.pipe.encode_prompt(device=self.device, batch_size=len(captions),
                                                       num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                       prompt=list(captions))
        return {"prompt_embeds": embeds.float().cpu(), "pooled_prompt_embeds": pooled[:, 0].float().cpu()}
