"""The EDM objective (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models")
as pure functions, for the eps/v UNet families (`train.objective: edm`).

The denoiser is D(x; sigma) = c_skip x + c_out F(c_in x, c_noise), with (EDM Table 1)

    c_skip = sd^2 / (sigma^2 + sd^2)    c_out = sigma sd / sqrt(sigma^2 + sd^2)    c_in = 1 / sqrt(sigma^2 + sd^2)
    c_noise = log(sigma) / 4            ln(sigma) ~ N(P_mean, P_std^2)             lambda = (sigma^2 + sd^2) / (sigma sd)^2

and the loss lambda(sigma) ||D(x0 + sigma n) - x0||^2. Since D - x0 = c_out (F - (x0 - c_skip x) / c_out), that
loss is exactly ||F - target||^2 with target = (x0 - c_skip x) / c_out and weight lambda c_out^2 = 1: the model
call stays the plain `adapter.forward(c_in x, c_noise)`, only its input, timestep and target change. These are
the conventions of diffusers' `EDMEulerScheduler` (c_noise = 0.25 log sigma; for v_prediction c_out is negated),
so a UNet trained here samples with that scheduler (`edm_scheduler_config`).
"""

from __future__ import annotations

import torch

from latentforge.shared.config import Config

from .objective import NoisedBatch


def edm_sigmas(batch: int, generator: torch.Generator, p_mean: float, p_std: float) -> torch.Tensor:
    """Log-normal noise levels: sigma = exp(P_mean + P_std * z), z ~ N(0, 1) (float32, on the generator's device)."""
    z = torch.randn(batch, generator=generator, device=generator.device, dtype=torch.float32)
    return torch.exp(p_mean + p_std * z)


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float, prediction_type: str = "epsilon"
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in, c_noise) per sample (EDM Table 1; c_out's sign as `EDMEulerScheduler`)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"EDM needs prediction_type epsilon or v_prediction, got {prediction_type!r}")
    sigma = sigma.float()
    total = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = sigma * sigma_data / total.sqrt() * (-1.0 if prediction_type == "v_prediction" else 1.0)
    c_in = 1.0 / total.sqrt()
    c_noise = 0.25 * torch.log(sigma)
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2: the weight of the denoised-space loss."""
    sigma = sigma.float()
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_pair(latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator, p_mean: float, p_std: float,
             sigma_data: float, prediction_type: str, input_noise: torch.Tensor | None = None) -> NoisedBatch:
    """Model input c_in (x0 + sigma n), timestep c_noise and target (x0 - c_skip x) / c_out, weight 1 (see above).

    `input_noise` (input perturbation) replaces `noise` in the model input only; the target keeps `noise`'s x.
    """
    sigma = edm_sigmas(latents.shape[0], generator, p_mean, p_std).to(latents.device)
    c_skip, c_out, c_in, c_noise = (c.view(-1, *([1] * (latents.ndim - 1))) if c.ndim else c
                                    for c in edm_preconditioning(sigma, sigma_data, prediction_type))
    x0 = latents.float()
    noisy = x0 + sigma.view_as(c_in) * noise.float()
    seen = noisy if input_noise is None else x0 + sigma.view_as(c_in) * input_noise.float()
    target = (x0 - c_skip * noisy) / c_out
    return NoisedBatch(c_in * seen, c_noise.flatten(), target, None)


def edm_scheduler_config(config: Config, prediction_type: str) -> dict[str, object]:
    """The `EDMEulerScheduler` config that samples a model trained with `config.train.edm`."""
    e = config.train.edm
    return {"_class_name": "EDMEulerScheduler", "sigma_min": e.sigma_min, "sigma_max": e.sigma_max,
            "sigma_data": e.sigma_data, "sigma_schedule": "karras", "num_train_timesteps": 1000,
            "prediction_type": prediction_type, "rho": 7.0, "final_sigmas_type": "zero"}
