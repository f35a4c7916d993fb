"""Exponential moving average of the trained weights, kept in fp32 on the main rank.

Under ZeRO 0-2 every rank holds the full (bf16 or fp32) module weights after a step, so rank 0 alone
keeps the EMA; the other ranks spend no memory on it. ZeRO-3 partitions the weights and is refused
with EMA for now. The average follows the module weights (bf16 under bf16 training), not DeepSpeed's
fp32 master copy: the EMA itself stays fp32, so rounding noise of single steps averages out.
"""

from __future__ import annotations

import torch


class Ema:
    """fp32 shadow of a module's trainable parameters: decay, start step and update interval."""

    def __init__(self, module: torch.nn.Module, decay: float, start_step: int = 0, update_every: int = 1) -> None:
        self.decay, self.start_step, self.update_every = decay, start_step, update_every
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> bool:
        """Call after optimizer step `step` (1-based); returns whether the EMA changed."""
        if step < self.start_step or step % self.update_every:
            return False
        if step == self.start_step:  # start from the current weights, not the initial ones
            for n, p in module.named_parameters():
                if n in self.shadow:
                    self.shadow[n].copy_(p.detach().float())
            return True
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 shadow weights by parameter name (what a checkpoint's ema.safetensors holds)."""
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a saved shadow in place; one that lacks a trained parameter is refused."""
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])
