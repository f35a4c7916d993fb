"""PixArt-Sigma in the cache job: T5 through PixArtSigmaPipeline.encode_prompt, with its attention mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .pipeline_text import PipelineText


class PixArtText(PipelineText):
    pipeline_class, encoder_class, tokenizer_class = "PixArtSigmaPipeline", "T5EncoderModel", "AutoTokenizer"

    @torch.inference_mode()
    def _encode_unique(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        embeds, mask, _, _ = self.pipe.encode_prompt(list(captions), do_classifier_free_guidance=False, device=self.device,
                                                     max_sequence_length=self.tokens)
        return self._masked(embeds, mask)
