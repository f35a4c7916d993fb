"""SANA in the cache job: Gemma-2 with the pipeline's complex human instruction, through SanaPipeline.encode_prompt."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .pipeline_text import PipelineText


class SanaText(PipelineText):
    pipeline_class, encoder_class, tokenizer_class = "SanaPipeline", "AutoModel", "AutoTokenizer"

    @torch.inference_mode()
    def _encode_unique(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        import inspect

        # SANA prefixes every prompt with its "complex human instruction" (the pipeline's default).
        instruction = inspect.signature(type(self.pipe).__call__).parameters["complex_human_instruction"].default
        embeds, mask, _, _ = self.pipe.encode_prompt(list(captions), do_classifier_free_guidance=False, device=self.device,
                                                     max_sequence_length=self.tokens, complex_human_instruction=instruction)
        return self._masked(embeds, mask)
