"""LoRA on the denoiser through diffusers' peft integration (the same config rebuilds it at export)."""

from __future__ import annotations

from typing import Any

import torch

from latentforge.shared.config import Config


def lora_config(config: Config) -> Any:
    """The peft LoraConfig of a run (also rebuilt at export, from the run's config snapshot)."""
    from peft import LoraConfig

    lora = config.train.lora
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                      lora_dropout=lora.dropout, init_lora_weights="gaussian")


def add_lora(model: torch.nn.Module, config: Config) -> None:
    """Freeze the denoiser and inject trainable LoRA layers (diffusers' peft integration)."""
    model.requires_grad_(False)
    model.add_adapter(lora_config(config))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError(f"train.lora.target_modules={config.train.lora.target_modules} matched no module of the model")
