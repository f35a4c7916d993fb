"""What every ControlNet adapter shares (`controlnet.py` for SD 1.x/2.x/SDXL, `cascade_controlnet_adapter.py`
for Stable Cascade Stage C), kept apart so neither of those two modules imports the other."""

from __future__ import annotations

from typing import Any

import torch

from latentforge.shared.config import Config

from .control_images import control_input
from .families.base import DenoiserAdapter


class ControlledAdapter(DenoiserAdapter):
    """What every ControlNet adapter shares: the family's own adapter (`base`) for the cached text, its
    caption dropout and micro-conditioning, plus the step's control input from the cache's `conditioning`.
    The model is a denoiser with `frozen_denoiser()` (the frozen UNet or prior)."""

    def __init__(self, base: DenoiserAdapter, kind: str, scale: float = 1.0) -> None:
        """`kind`: the cache's conditioning kind; `scale`: `train.controlnet.conditioning_scale`."""
        self.base, self.kind, self.scale = base, kind, scale

    def expected_cache(self, model: torch.nn.Module) -> dict[str, Any]:
        return self.base.expected_cache(model.frozen_denoiser())

    def condition(self, batch: dict[str, Any], empty: dict[str, torch.Tensor], config: Config,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
        cond = self.base.condition(batch, empty, config, generator)
        control = control_input(self.kind, batch["conditioning"], generator, config.train.controlnet.degrade_factor)
        cond["controlnet_cond"] = self.controlnet_input(control)
        return cond

    def controlnet_input(self, control: torch.Tensor) -> torch.Tensor:
        """`control_images.control_input`'s tensor as this ControlNet takes it (diffusers': as it is)."""
        return control

    def prompt_kwargs(self, embeds: dict[str, torch.Tensor], empty: dict[str, torch.Tensor]) -> dict[str, Any]:
        return self.base.prompt_kwargs(embeds, empty)
