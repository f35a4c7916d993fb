"""SANA in the trainer: linear-attention DiT on DC-AE latents with Gemma states, rectified flow."""

from __future__ import annotations

import torch

from latentforge.shared.config import Config

from .masked_text import MaskedTextAdapter


class SanaAdapter(MaskedTextAdapter):
    """SANA: linear-attention DiT on DC-AE latents, rectified-flow objective."""

    family = "sana"
    model_class = "SanaTransformer2DModel"
    pipeline_class = "SanaPipeline"
    objective = "flow"

    def load(self, config: Config) -> torch.nn.Module:
        return self._load(config)

    def forward(self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(noisy, encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype),
                     encoder_attention_mask=cond["encoder_attention_mask"], timestep=timesteps).sample
