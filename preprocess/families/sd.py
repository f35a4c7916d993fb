"""SD 1.x and 2.x in the cache job: one CLIP text encoder through StableDiffusionPipeline.encode_prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .pipeline_text import PipelineText


class SdText(PipelineText):
    pipeline_class, encoder_class, tokenizer_class = "StableDiffusionPipeline", "CLIPTextModel", "CLIPTokenizer"

    def _text_only_pipeline(self, cls: Any, tokenizer: Any, encoder: Any) -> Any:
        return cls(vae=None, text_encoder=encoder, tokenizer=tokenizer, unet=None, scheduler=None, safety_checker=None,
                   feature_extractor=None, requires_safety_checker=False)

    @torch.inference_mode()
    def _encode_unique(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(list(captions), self.device, 1, False,
                                            clip_skip=self.config.cache.clip_skip or None)
        return {"prompt_embeds": embeds.float().cpu()}
