"""SDXL in the cache job: two CLIP text encoders, penultimate states, pooled projection, 75-token windows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from latentforge.shared.config import Config

from ..encoders import DTYPES, load_kwargs, run_halving_on_oom
from ..model_load import load_pretrained


def token_windows(max_tokens: int, window: int = 77) -> int:
    """Number of 77-token windows a `max_tokens` prompt is encoded in (75 content tokens each)."""
    return max(1, math.ceil((max_tokens - 2) / (window - 2)))


class SdxlText:
    """SDXL text side: both CLIP encoders' penultimate hidden states concatenated, pooled from the second.

    `clip_skip` moves further up from the penultimate layer. Prompts longer than 77 tokens are split
    into 75-token windows, each wrapped with BOS/EOS and encoded separately, then concatenated along the
    sequence (as kohya sd-scripts and A1111 do); the pooled embedding comes from the first window.
    """

    def __init__(self, config: Config, device: torch.device) -> None:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        dtype = DTYPES[config.cache.text_dtype]
        src, kwargs = config.model.pretrained, load_kwargs(config)
        tok_kwargs = {"revision": config.model.revision} if config.model.revision else {}
        self.tokenizers = [CLIPTokenizer.from_pretrained(src, subfolder=s, **tok_kwargs) for s in ("tokenizer", "tokenizer_2")]
        self.encoders = [load_pretrained(CLIPTextModel, src, device, dtype, subfolder="text_encoder", **kwargs),
                         load_pretrained(CLIPTextModelWithProjection, src, device, dtype, subfolder="text_encoder_2",
                                         **kwargs)]
        self.device = device
        self.windows = token_windows(config.cache.max_tokens or 77)
        self.clip_skip = config.cache.clip_skip
        self.text_dim = sum(int(e.config.hidden_size) for e in self.encoders)
        self.pooled_dim = int(self.encoders[1].config.projection_dim)
        self.tokens = 77 * self.windows

    def _tokenize(self, tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
        """(B, windows, 77) ids: 75 content tokens per window, each window framed by BOS ... EOS/pad."""
        body = 75 * self.windows
        ids = tokenizer(list(captions), add_special_tokens=False, truncation=True, max_length=body).input_ids
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        out = torch.full((len(captions), self.windows, 77), pad, dtype=torch.long)
        for i, seq in enumerate(ids):
            for w in range(self.windows):
                chunk = seq[w * 75:(w + 1) * 75]
                row = [bos, *chunk, eos]
                out[i, w, : len(row)] = torch.tensor(row)
        return out

    @torch.inference_mode()
    def _encode_unique(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders, strict=True):
            ids = self._tokenize(tokenizer, captions)
            b = ids.shape[0]
            out = encoder(ids.view(b * self.windows, 77).to(self.device), output_hidden_states=True)
            h = out.hidden_states[-(2 + self.clip_skip)]
            hidden.append(h.reshape(b, self.windows * 77, -1).float().cpu())
            if isinstance(out, dict) and "text_embeds" in out:
                pooled = out["text_embeds"].reshape(b, self.windows, -1)[:, 0].float().cpu()
        assert pooled is not None
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}

    def encode(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions -> {"prompt_embeds": (B, T, D), "pooled_prompt_embeds": (B, P)}; duplicates encoded once."""
        unique = list(dict.fromkeys(captions))
        enc = run_halving_on_oom(self._encode_unique, unique)
        where = [unique.index(c) for c in captions] if len(unique) != len(captions) else list(range(len(captions)))
        return {k: v[where] for k, v in enc.items()}

    def field_widths(self) -> dict[str, int]:
        return {"prompt_embeds": self.text_dim, "pooled_prompt_embeds": self.pooled_dim}
