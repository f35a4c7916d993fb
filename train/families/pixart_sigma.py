"""PixArt-Sigma in the trainer: DiT with learned sigma on T5 states, DDPM objective on the epsilon half."""

from __future__ import annotations

import torch

from latentforge.shared.config import Config

from .masked_text import MaskedTextAdapter


class PixArtSigmaAdapter(MaskedTextAdapter):
    """PixArt-Sigma: DiT with learned variance (the epsilon half is trained), DDPM objective."""

    family = "pixart_sigma"
    model_class = "PixArtTransformer2DModel"
    pipeline_class = "PixArtSigmaPipeline"

    def load(self, config: Config) -> torch.nn.Module:
        return self._load(config)

    def forward(self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(noisy, encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype),
                    encoder_attention_mask=cond["encoder_attention_mask"], timestep=timesteps,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        # Learned sigma: the second half of the channels is the variance, trained by PixArt's VLB term;
        # like diffusers' PixArt trainers we train the epsilon half with MSE.
        return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * noisy.shape[1] else out
