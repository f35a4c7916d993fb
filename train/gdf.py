"""Stable Cascade Stage C's objective (its GDF) as pure functions: tensors in, tensors out.

What Stage C was trained with (Stability-AI/StableCascade `train/train_c.py` `setup_extras_pre` and `gdf/`):
`GDF(schedule=CosineSchedule(clamp_range=[0.0001, 0.9999]), input_scaler=VPScaler(), target=EpsilonTarget(),
noise_cond=CosineTNoiseCond(), loss_weight=P2LossWeight())` and `gdf.diffuse(latents, shift=1, loss_shift=1)`:

- t = (1 - U[0, 1)) + 0.001, clamped to [0.001, 1] (`CosineSchedule.schedule` with no t given);
- var = cos((t + s) / (1 + s) * pi / 2)^2 / cos(s / (1 + s) * pi / 2)^2, s = 0.008, clamped to [1e-4, 0.9999];
  logSNR = log(var / (1 - var)); a shift adds 2 log(1 / shift) and the result is clamped to the schedule's
  limits at t = 1 and t = 0 (`BaseSchedule.__call__`);
- x_t = sqrt(sigmoid(logSNR)) x0 + sqrt(1 - sigmoid(logSNR)) eps (`VPScaler`), target eps;
- the model's `timestep_ratio` = CosineTNoiseCond(logSNR), the inverse of the schedule (t back, clamped to [0, 1]);
- loss weight P2: (1 + exp(logSNR + 2 log(loss_shift)))^-1, per sample, times the per-sample MSE, mean over the batch.

diffusers' `DDPMWuerstchenScheduler` (what the exported pipeline samples with) uses the same cosine
alpha_bar and the same `timestep_ratio`, which the tests check against. `AdaptiveLossWeight` (the 3.6B
fine-tune yaml's optional `adaptive_loss_weight: True`) is not offered: it is a running per-logSNR-bucket
loss estimate, state the checkpoint would have to carry.
"""

from __future__ import annotations

import math

import torch

COSINE_S = 0.008
VAR_CLAMP = (0.0001, 0.9999)


def _min_var() -> float:
    return math.cos(COSINE_S / (1 + COSINE_S) * math.pi * 0.5) ** 2


def cosine_log_snr(t: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """logSNR of the cosine schedule at t in [0, 1] (float32), shifted and clamped to its limits."""
    t = t.float().clamp(0, 1)

    def raw(x: torch.Tensor) -> torch.Tensor:
        var = (torch.cos((COSINE_S + x) / (1 + COSINE_S) * math.pi * 0.5).clamp(0, 1) ** 2 / _min_var())
        var = var.clamp(*VAR_CLAMP)
        return (var / (1 - var)).log()

    log_snr = raw(t)
    if shift != 1:
        log_snr = log_snr + 2 * math.log(1 / shift)
    limits = raw(torch.tensor([1.0, 0.0]))  # (min, max): the limits are set once, unshifted
    return log_snr.clamp(float(limits[0]), float(limits[1]))


def cosine_t_cond(log_snr: torch.Tensor) -> torch.Tensor:
    """`timestep_ratio` the prior is conditioned on: the cosine schedule inverted at logSNR, in [0, 1]."""
    s = torch.tensor(COSINE_S, dtype=torch.float32, device=log_snr.device)
    var = torch.sigmoid(log_snr.float()).clamp(0, 1)
    t = ((var * _min_var()) ** 0.5).acos() / (math.pi * 0.5) * (1 + s) - s
    return t.clamp(0, 1)


def p2_loss_weight(log_snr: torch.Tensor, loss_shift: float = 1.0, k: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """P2 weighting (Choi et al. 2022) as GDF's `P2LossWeight()`: (k + exp(logSNR))^-gamma, logSNR shifted first."""
    if loss_shift != 1:
        log_snr = log_snr + 2 * math.log(loss_shift)
    return (k + log_snr.float().exp()) ** -gamma


def sample_t(batch: int, generator: torch.Generator) -> torch.Tensor:
    """GDF's training draw: (1 - U) + 0.001, clamped to [0.001, 1]."""
    u = torch.rand(batch, generator=generator, device=generator.device)
    return (1 - u).add(0.001).clamp(0.001, 1.0)


def gdf_diffuse(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, shift: float = 1.0,
                loss_shift: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, timestep_ratio, loss weight) for clean `latents`, `noise` and times `t` (B,); the target is `noise`."""
    log_snr = cosine_log_snr(t, shift).to(latents.device)
    a2 = torch.sigmoid(log_snr).view(-1, *([1] * (latents.ndim - 1)))
    noisy = a2.sqrt() * latents.float() + (1 - a2).sqrt() * noise.float()
    return noisy, cosine_t_cond(log_snr), p2_loss_weight(log_snr, loss_shift)
