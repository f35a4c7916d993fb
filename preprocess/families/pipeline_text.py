"""The text side shared by families whose pipeline has one text encoder and its own `encode_prompt`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from latentforge.shared.config import Config
from latentforge.shared.families import family_facts

from ..encoders import DTYPES, load_kwargs, run_halving_on_oom
from ..model_load import load_pretrained


class PipelineText:
    """Text side of SD 1.x/2.x, PixArt-Sigma and SANA through the family pipeline's own `encode_prompt`.

    The pipeline is built with only its tokenizer and text encoder, so the cached embeddings are exactly
    what that pipeline computes at inference (clip_skip for CLIP; T5/Gemma masks; SANA's instruction
    prefix). Padding positions are zeroed: masked out anyway, and zeros compress to almost nothing.
    """

    pipeline_class = ""
    encoder_class = ""
    tokenizer_class = "AutoTokenizer"

    def __init__(self, config: Config, device: torch.device) -> None:
        import diffusers
        import transformers

        dtype = DTYPES[config.cache.text_dtype]
        src, kwargs = config.model.pretrained, load_kwargs(config)
        tok_kwargs = {"revision": config.model.revision} if config.model.revision else {}
        tokenizer = getattr(transformers, self.tokenizer_class).from_pretrained(src, subfolder="tokenizer", **tok_kwargs)
        encoder = load_pretrained(getattr(transformers, self.encoder_class), src, device, dtype, subfolder="text_encoder",
                                  **kwargs)
        self.pipe = self._text_only_pipeline(getattr(diffusers, self.pipeline_class), tokenizer, encoder)
        self.device, self.config = device, config
        self.tokens = config.cache.max_tokens or family_facts(config.model.family).text_max_tokens
        self.text_dim = int(getattr(encoder.config, "hidden_size", None) or encoder.config.d_model)
        self.pooled_dim = None

    def _text_only_pipeline(self, cls: Any, tokenizer: Any, encoder: Any) -> Any:
        return cls(tokenizer=tokenizer, text_encoder=encoder, vae=None, transformer=None, scheduler=None)

    def _encode_unique(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions -> the family's text fields; duplicates encoded once."""
        unique = list(dict.fromkeys(captions))
        enc = run_halving_on_oom(self._encode_unique, unique)
        where = [unique.index(c) for c in captions]
        return {k: v[where] for k, v in enc.items()}

    def _masked(self, embeds: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = mask.to(torch.uint8).cpu()
        return {"prompt_embeds": embeds.float().cpu() * mask[..., None], "prompt_mask": mask}
