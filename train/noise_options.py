"""Which noise-schedule options a family's objective takes, and the sampling scheduler that matches training.

An option that does not apply to the run's objective is refused in one line (naming the key and the fix)
before anything loads, instead of being silently ignored: min-SNR, timestep bias, zero terminal SNR, EDM
and input perturbation on a flow-matching family; DDPM-only options under EDM; zero terminal SNR with
epsilon prediction (its last timestep is pure noise, where an eps target says nothing about the image).
`sampling_scheduler` gives validation and export the scheduler a run's model must sample with: the base
pipeline's, with rescaled betas and trailing timesteps under zero terminal SNR, or `EDMEulerScheduler`.
"""

from __future__ import annotations

from typing import Any

import torch

from latentforge.shared.config import Config, ConfigError

from .edm import edm_scheduler_config


def check_objective_options(config: Config, objective: str, unet: bool = True) -> None:
    """Raise `ConfigError` (one line) for a `train.*` option the family's objective (`diffusion`/`flow`/`gdf`) ignores;
    `unet`: the family trains a UNet (EDM's preconditioning is defined and tested for the UNet families)."""
    t, family = config.train, config.model.family
    if objective == "flow":
        refused = {"train.snr_gamma": t.snr_gamma is not None, "train.timestep_bias.strategy": t.timestep_bias.strategy != "none",
                   "train.zero_terminal_snr": t.zero_terminal_snr, "train.objective=edm": t.objective == "edm",
                   "train.input_perturbation": t.input_perturbation > 0, "train.prediction_type": t.prediction_type is not None}
        for key, set_ in refused.items():
            if set_:
                raise ConfigError(f"{key} does not apply to {family} (a flow-matching family); remove it "
                                  "(flow_weighting, flow_shift, logit_mean and logit_std shape its noise levels)")
    if objective == "gdf":
        refused = {"train.snr_gamma": t.snr_gamma is not None, "train.timestep_bias.strategy": t.timestep_bias.strategy != "none",
                   "train.zero_terminal_snr": t.zero_terminal_snr, "train.input_perturbation": t.input_perturbation > 0,
                   "train.prediction_type": t.prediction_type is not None}
        for key, set_ in refused.items():
            if set_:
                raise ConfigError(f"{key} does not apply to {family} (Stable Cascade's GDF: epsilon target, P2 loss "
                                  "weights); remove it (train.gdf_shift shapes its noise levels)")
    if t.objective == "edm" and not unet:
        raise ConfigError(f"train.objective=edm is for the UNet families (sdxl, sd1, sd2), not {family}; "
                          "remove it")
    if t.objective == "edm":
        refused = {"train.snr_gamma": t.snr_gamma is not None, "train.timestep_bias.strategy": t.timestep_bias.strategy != "none",
                   "train.zero_terminal_snr": t.zero_terminal_snr}
        for key, set_ in refused.items():
            if set_:
                raise ConfigError(f"{key} does not apply with train.objective=edm (sigmas are log-normal, train.edm); "
                                  "remove it")


def check_prediction_type(config: Config, prediction_type: str) -> None:
    """Zero terminal SNR needs v-prediction (Lin et al. 2023, section 3.2)."""
    if config.train.zero_terminal_snr and prediction_type != "v_prediction":
        raise ConfigError(f"train.zero_terminal_snr needs v-prediction but the run trains {prediction_type}; "
                          "set train.prediction_type=v_prediction")


def perturbation(noise: torch.Tensor, generator: torch.Generator, strength: float) -> torch.Tensor | None:
    """Input perturbation: noise + strength x fresh noise for the model input (None when off, drawing nothing,
    so a run without it keeps exactly its old random stream)."""
    if strength <= 0:
        return None
    extra = torch.randn(tuple(noise.shape), generator=generator, device=generator.device, dtype=torch.float32)
    return noise + strength * extra.to(noise.device, noise.dtype)


def sampling_scheduler_config(config: Config, base: dict[str, Any]) -> dict[str, Any]:
    """The scheduler config a run's model samples with, from the base pipeline's `base` config."""
    t = config.train
    prediction = t.prediction_type or base.get("prediction_type", "epsilon")
    if t.objective == "edm":
        return edm_scheduler_config(config, prediction)
    if not t.zero_terminal_snr:
        return dict(base)
    import diffusers

    cls = getattr(diffusers, base.get("_class_name", "EulerDiscreteScheduler"), None)
    keys = set(cls._get_init_keys(cls)) if cls is not None else set()
    out = dict(base)
    if not {"rescale_betas_zero_snr", "timestep_spacing"} <= keys:  # e.g. DPMSolver: Euler has both
        out["_class_name"] = "EulerDiscreteScheduler"
    out.update(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type=prediction)
    return out


def sampling_scheduler(config: Config, base: dict[str, Any]) -> Any:
    """`sampling_scheduler_config` as a diffusers scheduler object."""
    import diffusers

    cfg = sampling_scheduler_config(config, base)
    return getattr(diffusers, cfg["_class_name"]).from_config(cfg)
