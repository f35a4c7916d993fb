"""One micro-batch's forward pass and loss, the single definition shared by training and held-out validation.

`Trainer.train_step` adds backward and the optimizer step around `forward_loss`; held-out validation
(`validation.held_out_loss`) calls it with `evaluate=True` under `torch.no_grad()`. Keeping one function
means the validation curve measures exactly the objective the run optimises: the same latent scaling,
noise schedule, target, conditioning and model call. No optimizer, no I/O, no trainer state here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from latentforge.shared.config import Config

from . import gdf
from . import objective as obj
from .captions import pick_caption_variants
from .edm import edm_pair
from .families.base import DenoiserAdapter
from .noise_options import check_objective_options, check_prediction_type, perturbation

PairFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], obj.NoisedBatch]


@dataclass(frozen=True)
class Objective:
    """The family's objective with the model's own noise schedule: clean latents + noise -> `NoisedBatch`."""

    make_pair: PairFn  # (latents, noise, generator) -> NoisedBatch
    prediction_type: str  # "epsilon", "v_prediction" or "flow"
    alphas_cumprod: torch.Tensor | None  # the DDPM schedule; None for flow matching and Stable Cascade's GDF


def build_objective(config: Config, adapter: DenoiserAdapter, device: torch.device) -> Objective:
    """The objective the family and the model's scheduler config say (`train.*` knobs override the latter)."""
    from diffusers import DDPMScheduler

    t = config.train
    check_objective_options(config, adapter.objective, unet=adapter.model_class == "UNet2DConditionModel")
    if adapter.objective == "gdf":  # Stable Cascade Stage C: no DDPM table; the schedule is a formula (`gdf.py`)
        return Objective(lambda x, n, g: gdf_pair(x, n, g, t.gdf_shift), "epsilon", None)
    sched_cfg = DDPMScheduler.load_config(config.model.pretrained, subfolder="scheduler", **config.model.pins(weights=False))
    steps = int(sched_cfg.get("num_train_timesteps", 1000))
    if adapter.objective == "flow":
        shift = t.flow_shift or float(sched_cfg.get("flow_shift") or sched_cfg.get("shift") or 1.0)
        return Objective(
            lambda x, n, g: obj.flow_pair(x, n, g, shift, steps, t.flow_weighting, t.logit_mean, t.logit_std),
            "flow", None)
    init_keys = DDPMScheduler._get_init_keys(DDPMScheduler)
    prediction_type = t.prediction_type or sched_cfg.get("prediction_type", "epsilon")
    if t.objective == "edm":
        e = t.edm
        return Objective(lambda x, n, g: edm_pair(x, n, g, e.p_mean, e.p_std, e.sigma_data, prediction_type,
                                                  perturbation(n, g, t.input_perturbation)), prediction_type, None)
    check_prediction_type(config, prediction_type)
    zero_snr = {"rescale_betas_zero_snr": True} if t.zero_terminal_snr else {}  # diffusers' rescale_zero_terminal_snr
    sched = DDPMScheduler.from_config({**{k: v for k, v in sched_cfg.items() if k in init_keys}, **zero_snr})
    alphas_cumprod = sched.alphas_cumprod.to(device)
    weights = obj.timestep_weights(steps, t.timestep_bias)
    return Objective(
        lambda x, n, g: obj.diffusion_pair(x, n, g, alphas_cumprod, weights, prediction_type, t.snr_gamma,
                                           input_noise=perturbation(n, g, t.input_perturbation)),
        prediction_type, alphas_cumprod)


def gdf_pair(latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator, shift: float) -> obj.NoisedBatch:
    """Stage C's GDF objective (`gdf.py`): cosine schedule with `shift`, epsilon target, P2 loss weights."""
    t = gdf.sample_t(latents.shape[0], generator).to(latents.device)
    noisy, ratio, weights = gdf.gdf_diffuse(latents, noise, t, shift=shift, loss_shift=1.0)
    return obj.NoisedBatch(noisy, ratio, noise.float(), weights)


@dataclass(frozen=True)
class StepSetup:
    """Everything besides the model, the batch and the generator that a micro-batch's loss depends on.

    Fixed for a run; built once by the trainer and handed to validation as it is.
    """

    adapter: DenoiserAdapter
    objective: Objective
    config: Config
    empty: dict[str, torch.Tensor]  # the cached empty prompt, on `device` (caption dropout's replacement)
    scaling_factor: float  # the cache's VAE latent scaling (CacheSpec)
    shift_factor: float | None
    device: torch.device
    dtype: torch.dtype  # the model's parameter dtype: what its input is cast to
    # Per-source loss multipliers indexed by a batch's `source_index` (DreamBooth's prior-preservation
    # weight); None when every source weighs 1.
    loss_weights: torch.Tensor | None = None


@dataclass(frozen=True)
class LossResult:
    """A micro-batch's loss and what it was taken at."""

    loss: torch.Tensor  # scalar float32; carries the graph when computed with gradients
    timesteps: torch.Tensor  # per-sample conditioning noise level (DDPM ints, or sigma * 1000 for flow)

    @property
    def samples(self) -> int:
        """Number of samples the loss averages over."""
        return int(self.timesteps.shape[0])


def forward_loss(model: Any, setup: StepSetup, batch: dict[str, Any], generator: torch.Generator, *,
                 evaluate: bool = False) -> LossResult:
    """Noise the cached latents, predict with `model`, and take the loss.

    Training (`evaluate=False`): latents are a fresh draw from the cached posterior (when the cache kept
    one), with `train.noise_offset`, caption and micro-conditioning dropout, and the objective's per-sample
    weights (min-SNR). Held-out evaluation (`evaluate=True`): the posterior mean, no noise offset, no
    dropout and a plain mean, so that with a fixed generator successive evaluations see the same inputs
    and only the weights change. Every random draw comes from `generator`, in the same order either way.
    `model` is whatever `adapter.forward` calls: the DeepSpeed engine in training, its module otherwise.
    """
    dev = setup.device
    # Held-out evaluation reads variant 0 (the caption itself); training one variant per sample, seeded.
    batch = pick_caption_variants(batch, generator) if not evaluate else batch
    mean = batch["latent_mean"].float()
    posterior = not evaluate and "latent_std" in batch
    latents = obj.sample_posterior(mean, batch["latent_std"].float(), generator) if posterior else mean
    latents = obj.scale_latents(latents, setup.scaling_factor, setup.shift_factor).to(dev)
    noise = obj.sample_noise(latents, generator, 0.0 if evaluate else setup.config.train.noise_offset)
    pair = setup.objective.make_pair(latents, noise, generator)
    config = without_dropout(setup.config) if evaluate else setup.config
    cond = setup.adapter.condition({k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()},
                                   setup.empty, config, generator)
    pred = setup.adapter.forward(model, pair.noisy.to(setup.dtype), pair.timesteps, cond)
    loss = obj.diffusion_loss(pred.float(), pair.target, None if evaluate else sample_weights(setup, batch, pair.weights))
    return LossResult(loss, pair.timesteps)


def without_dropout(config: Config) -> Config:
    """`config` with caption and micro-conditioning dropout off: evaluation conditions on the real captions and sizes."""
    return config.model_copy(update={"train": config.train.model_copy(
        update={"caption_dropout": 0.0, "micro_conditioning_dropout": 0.0})})


def sample_weights(setup: StepSetup, batch: dict[str, Any], weights: torch.Tensor | None) -> torch.Tensor | None:
    """The objective's per-sample weights times each sample's source `loss_weight` (None: a plain mean)."""
    if setup.loss_weights is None or "source_index" not in batch:
        return weights
    per_source = setup.loss_weights[torch.as_tensor(batch["source_index"]).long().cpu()]
    return per_source if weights is None else weights * per_source.to(weights.device)


def source_loss_weights(config: Config) -> torch.Tensor | None:
    """`data.sources[*].loss_weight` as a table by source index (plus 1.0 for unattributed groups), or None
    when all are 1 so a run without them computes exactly what it did before."""
    table = [s.loss_weight for s in config.data.sources] + [1.0]
    return None if all(w == 1.0 for w in table) else torch.tensor(table, dtype=torch.float32)
