"""The diffusion training objective as pure functions: tensors in, tensors out.

Every random draw takes an explicit `torch.Generator` (never the global RNG), so a resumed run that
restores the generator state reproduces the exact same timesteps, noise and dropout decisions. Each
function draws the same number of values whatever its strength knob (noise offset, dropout p), so
changing one knob does not reshuffle every later draw. No module state, no I/O.

Conventions follow diffusers (DDPMScheduler, the SDXL pipeline and its text-to-image trainers) so a
model trained here behaves like one trained there; the tests check the formulas against diffusers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from latentforge.shared.config import TimestepBiasConfig

LrSchedule = Literal["constant", "cosine", "linear"]
SizeLike = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


def timestep_weights(num_train_timesteps: int, bias: TimestepBiasConfig) -> torch.Tensor:
    """Sampling probability of each timestep (float32, sums to 1).

    Same semantics as diffusers' `generate_timestep_weights` (SDXL text-to-image trainer, also MindONE):
    "later" multiplies the last int(portion*T) timesteps by `multiplier`, "earlier" the first ones,
    "range" the half-open interval [begin, end); "none" (or multiplier 1) is uniform. diffusers
    returns unnormalised ones for "none"; we always normalise, which multinomial treats identically.
    """
    weights = torch.ones(num_train_timesteps, dtype=torch.float32)
    num_to_bias = int(bias.portion * num_train_timesteps)
    if bias.strategy == "none":
        return weights / weights.sum()
    if bias.multiplier <= 0:
        raise ValueError(f"timestep_bias.multiplier must be > 0, got {bias.multiplier} (use strategy: none)")
    if bias.strategy == "later":
        # diffusers slices [-n:]; with n == 0 that biases everything, i.e. uniform again, as [T - 0:] does.
        biased = slice(num_train_timesteps - num_to_bias, None)
    elif bias.strategy == "earlier":
        biased = slice(0, num_to_bias)
    elif bias.strategy == "range":
        if bias.begin < 0 or bias.end > num_train_timesteps:
            raise ValueError(
                f"timestep_bias range [{bias.begin}, {bias.end}) must lie within [0, {num_train_timesteps}]"
            )
        biased = slice(bias.begin, bias.end)
    else:
        raise ValueError(f"unknown timestep_bias.strategy {bias.strategy!r}")
    weights[biased] *= bias.multiplier
    return weights / weights.sum()


def sample_timesteps(batch: int, weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`batch` timesteps drawn i.i.d. from `weights` (int64, on `weights`' device)."""
    # multinomial needs its input on the generator's device; draw there and move the result back.
    drawn = torch.multinomial(weights.to(generator.device), batch, replacement=True, generator=generator)
    return drawn.long().to(weights.device)


def _randn(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    # Always float32 on the generator's device: the same seed gives the same numbers whatever the
    # training dtype (bf16 randn would differ), and a CPU generator works with CUDA latents.
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float) -> torch.Tensor:
    """Gaussian noise like `latents`, plus `noise_offset` x a per-(sample, channel) constant.

    The offset term ("offset noise", crosslabs.org/blog/diffusion-with-offset-noise) lets the model
    learn to shift the mean brightness of an image, which plain i.i.d. noise barely perturbs.
    """
    noise = _randn(latents.shape, generator)
    # Drawn even when noise_offset == 0 so the generator advances the same way in every config.
    offset = _randn((*latents.shape[:2], *([1] * (latents.ndim - 2))), generator)
    noise = noise + noise_offset * offset
    return noise.to(device=latents.device, dtype=latents.dtype)


def sample_posterior(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A fresh draw from the cached VAE posterior N(mean, std^2), as `vae.encode().latent_dist.sample()`."""
    eps = _randn(mean.shape, generator).to(mean.device)
    return (mean.float() + std.float() * eps).to(mean.dtype)


def scale_latents(
    latents: torch.Tensor, scaling_factor: float, shift_factor: float | None = None
) -> torch.Tensor:
    """VAE latents to the model's unit-variance space: (latents - shift) * scaling (as in diffusers)."""
    if shift_factor is not None:
        latents = latents - shift_factor
    return latents * scaling_factor


def _alpha_bar(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t per sample, float32, shaped (B, 1, ..., 1) to broadcast over `like`."""
    ab = alphas_cumprod.to(device=like.device, dtype=torch.float32)[timesteps.to(like.device)]
    return ab.reshape(-1, *([1] * (like.ndim - 1)))


def compute_snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) per sample (float32, on `timesteps`' device)."""
    ab = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return ab / (1.0 - ab)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, arXiv:2303.09556), per sample.

    The paper weights the x0-space loss by min(snr, gamma). Rewritten for the actual target:
    ||x0 - x0_hat||^2 = ||eps - eps_hat||^2 / snr, so epsilon gets min(snr, gamma) / snr;
    ||x0 - x0_hat||^2 = ||v - v_hat||^2 / (snr + 1), so v-prediction gets min(snr, gamma) / (snr + 1).
    (diffusers' older SDXL script used min(snr + 1, gamma) / (snr + 1), which is not the paper's weight;
    its train_text_to_image.py uses the form here.)
    """
    snr = snr.float()
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        # snr == 0 (zero-terminal-SNR schedules, last t): min(snr, g) / snr -> 1 as snr -> 0; avoid 0/0.
        return torch.where(
            snr > 0, clipped / snr.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(snr)
        )
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)  # finite at snr == 0: 0, the paper's x0 weight min(0, gamma)
    raise ValueError(f"min-SNR weighting supports epsilon or v_prediction, got {prediction_type!r}")


def add_noise(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Forward diffusion x_t = sqrt(ab) * x0 + sqrt(1 - ab) * noise (== `DDPMScheduler.add_noise`)."""
    ab = _alpha_bar(alphas_cumprod, timesteps, latents)
    noisy = ab**0.5 * latents.float() + (1.0 - ab) ** 0.5 * noise.float()
    return noisy.to(latents.dtype)


def training_target(
    prediction_type: str,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """What the model must predict: the noise (epsilon) or v = sqrt(ab) * noise - sqrt(1 - ab) * x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        ab = _alpha_bar(alphas_cumprod, timesteps, latents)
        return (ab**0.5 * noise.float() - (1.0 - ab) ** 0.5 * latents.float()).to(latents.dtype)
    raise ValueError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Scalar MSE in float32: mean over non-batch dims per sample, then weighted mean over the batch.

    The batch reduction is mean(w * loss), not sum(w * loss) / sum(w): min-SNR weights are meant to
    rescale the loss of each timestep, and renormalising would cancel them (entirely at batch size 1).
    """
    per_sample = (pred.float() - target.float()).square().flatten(1).mean(dim=1)
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights.to(per_sample.device, torch.float32)).mean()


def _per_sample(empty: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    # The cache stores the empty prompt with a leading dim of 1 (or none); broadcast it over the batch.
    if empty.ndim == like.ndim - 1:
        empty = empty.unsqueeze(0)
    if empty.shape[1:] != like.shape[1:]:
        raise ValueError(
            f"{name}: empty-prompt shape {tuple(empty.shape)} does not match {tuple(like.shape)}"
        )
    return empty.to(device=like.device, dtype=like.dtype).expand_as(like)


def drop_captions(
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor | None,
    empty_embeds: torch.Tensor,
    empty_pooled: torch.Tensor | None,
    p: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Replace each sample's text conditioning by the cached empty prompt with probability `p`.

    This teaches the unconditional branch that classifier-free guidance needs. Returns the new
    embeddings and the bool mask (B,) of dropped samples (use it for a text mask, if any).
    """
    batch = prompt_embeds.shape[0]
    mask = torch.rand(batch, generator=generator, device=generator.device) < p
    mask = mask.to(prompt_embeds.device)
    rows = mask.view(-1, *([1] * (prompt_embeds.ndim - 1)))
    prompt_embeds = torch.where(
        rows, _per_sample(empty_embeds, prompt_embeds, "prompt_embeds"), prompt_embeds
    )
    if pooled is not None:
        if empty_pooled is None:
            raise ValueError("pooled embeddings given without the empty prompt's pooled embedding")
        prows = mask.to(pooled.device).view(-1, *([1] * (pooled.ndim - 1)))
        pooled = torch.where(prows, _per_sample(empty_pooled, pooled, "pooled_prompt_embeds"), pooled)
    return prompt_embeds, pooled, mask


def sdxl_add_time_ids(
    original_size: SizeLike,
    crop_top_left: SizeLike,
    target_size: SizeLike,
    dropout_p: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """SDXL micro-conditioning rows (B, 6) float32: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    The order of diffusers' `StableDiffusionXLPipeline._get_add_time_ids` (original_size +
    crops_coords_top_left + target_size, all (h, w)). Each argument is (B, 2) or one (2,) pair shared
    by the batch. With probability `dropout_p` a sample's whole row is zeroed, so the model also
    learns to work without size/crop hints (SDXL paper, micro-conditioning dropout).
    """
    parts = [
        torch.as_tensor(x).to(torch.float32).reshape(-1, 2)
        for x in (original_size, crop_top_left, target_size)
    ]
    ids = torch.cat(torch.broadcast_tensors(*parts), dim=1)
    keep = torch.rand(ids.shape[0], generator=generator, device=generator.device) >= dropout_p
    return ids * keep.to(ids.device, torch.float32).unsqueeze(1)


def lr_lambda(step: int, warmup_steps: int, max_steps: int, schedule: LrSchedule) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based), for `torch.optim.lr_scheduler.LambdaLR`.

    Warmup is (step + 1) / warmup_steps, so the first step already learns (transformers' step /
    warmup wastes step 0 at lr 0) and step warmup_steps - 1 reaches 1. Then constant, or cosine /
    linear decay reaching 0 at `max_steps`.
    """
    if schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"lr schedule must be constant, cosine or linear, got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, max_steps - warmup_steps)))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


@dataclass(frozen=True)
class NoisedBatch:
    """What a training step feeds the model and compares against."""

    noisy: torch.Tensor
    timesteps: torch.Tensor  # what the model is conditioned on (ints for DDPM, sigma*1000 for flow)
    target: torch.Tensor
    weights: torch.Tensor | None  # per-sample loss weights, or None for a plain mean


def diffusion_pair(latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator,
                   alphas_cumprod: torch.Tensor, weights: torch.Tensor, prediction_type: str,
                   snr_gamma: float | None, input_noise: torch.Tensor | None = None) -> NoisedBatch:
    """DDPM-family objective (SD, SDXL, PixArt): biased timesteps, eps or v target, optional min-SNR-γ.

    `input_noise` (input perturbation) noises the model input instead of `noise`; the target keeps `noise`.
    """
    timesteps = sample_timesteps(latents.shape[0], weights, generator).to(latents.device)
    noisy = add_noise(latents, noise if input_noise is None else input_noise, timesteps, alphas_cumprod)
    target = training_target(prediction_type, latents, noise, timesteps, alphas_cumprod)
    loss_weights = None
    if snr_gamma:
        loss_weights = min_snr_weights(compute_snr(alphas_cumprod, timesteps), snr_gamma, prediction_type)
    return NoisedBatch(noisy, timesteps, target, loss_weights)


def flow_sigmas(batch: int, generator: torch.Generator, shift: float, weighting: str = "logit_normal",
                logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """Flow-matching noise levels in (0, 1): logit-normal (SD3/SANA) or uniform, then the model's shift.

    shift > 1 moves mass towards noisier levels, which high resolutions need (SANA uses 3.0):
    sigma' = shift * s / (1 + (shift - 1) * s).
    """
    if weighting == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(batch, generator=generator, device=generator.device))
    elif weighting == "uniform":
        u = torch.rand(batch, generator=generator, device=generator.device)
    else:
        raise ValueError(f"flow weighting {weighting!r} must be logit_normal or uniform")
    return shift * u / (1 + (shift - 1) * u)


def flow_pair(latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator, shift: float,
              num_train_timesteps: int, weighting: str = "logit_normal", logit_mean: float = 0.0,
              logit_std: float = 1.0) -> NoisedBatch:
    """Rectified-flow objective (SANA): x_t = (1 - s) x0 + s eps, predict the velocity eps - x0."""
    sigmas = flow_sigmas(latents.shape[0], generator, shift, weighting, logit_mean, logit_std).to(latents.device)
    s = sigmas.view(-1, *([1] * (latents.ndim - 1))).float()
    noisy = (1 - s) * latents.float() + s * noise.float()
    return NoisedBatch(noisy, sigmas * num_train_timesteps, noise.float() - latents.float(), None)
