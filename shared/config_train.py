"""The `train:` section of the config: the trainer's keys, with types, bounds and descriptions."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from .config_section import Section

_Section = Section


class TimestepBiasConfig(_Section):
    strategy: Literal["none", "earlier", "later", "range"] = Field(
        default="none", description="Bias timestep sampling towards earlier/later steps or a range (MindONE/diffusers)."
    )
    multiplier: float = Field(default=1.0, gt=0, description="Weight of the biased timesteps relative to the others.")
    begin: int = Field(default=0, ge=0, description="First timestep of the range (strategy: range).")
    end: int = Field(default=1000, ge=1, description="End (exclusive) of the range (strategy: range).")
    portion: float = Field(default=0.25, gt=0, le=1, description="Fraction of timesteps biased (earlier/later).")

    @model_validator(mode="after")
    def _range(self) -> TimestepBiasConfig:
        if self.begin >= self.end:
            raise ValueError(f"begin ({self.begin}) must be < end ({self.end})")
        return self


class EdmConfig(_Section):
    p_mean: float = Field(default=-1.2, description="Mean of log(sigma) (EDM's log-normal noise-level sampling).")
    p_std: float = Field(default=1.2, gt=0, description="Std of log(sigma).")
    sigma_data: float = Field(default=0.5, gt=0, description="Std of the (scaled) data the preconditioning assumes.")
    sigma_min: float = Field(default=0.002, gt=0, description="Smallest sigma of the exported EDMEulerScheduler.")
    sigma_max: float = Field(default=80.0, gt=0, description="Largest sigma of the exported EDMEulerScheduler.")


class EmaConfig(_Section):
    enabled: bool = Field(default=False, description="Keep an exponential moving average of the trained weights (fp32).")
    decay: float = Field(default=0.9999, gt=0, lt=1, description="EMA decay per update.")
    start_step: int = Field(
        default=0, ge=0,
        description="Until this optimizer step (included) each update copies the weights; after it, it averages "
        "with `decay` (Stable Cascade's ema_start_iters).",
    )
    update_every: int = Field(default=1, ge=1, description="Update the EMA every N optimizer steps (ema_iters).")


class LoraSection(_Section):
    enabled: bool = Field(default=False, description="Train LoRA adapters (peft) instead of the full denoiser.")
    rank: int = Field(default=16, ge=1, description="LoRA rank r.")
    alpha: float = Field(default=16.0, gt=0, description="LoRA alpha (the update is scaled by alpha / rank).")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="Module names or regex (peft target_modules) that get adapters; default: attention projections.",
    )
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")


class ControlNetSection(_Section):
    enabled: bool = Field(
        default=False, description="Train a ControlNet on the cache's control images (cache.conditioning), the "
        "base model frozen: SD 1.x/2.x and SDXL (diffusers' ControlNetModel, initialised from the UNet), Stable "
        "Cascade Stage C (the original's EfficientNet ControlNet feeding train.controlnet.blocks).",
    )
    pretrained: str | None = Field(
        default=None, description="Start from this ControlNet instead: SD/SDXL a hub id or folder; Stable Cascade "
        "a .safetensors in the released layout (a path, or OWNER/REPO/PATH.safetensors on the hub, e.g. "
        "stabilityai/stable-cascade/controlnet/canny.safetensors) or a folder written by latentforge export.",
    )
    blocks: list[int] | None = Field(
        default=None, description="Stable Cascade: the prior's ResBlocks (numbered in call order, down then up, "
        "from 0) that receive the ControlNet's features (the original's controlnet_blocks); default the release's "
        "[0, 4, 8, 12, 51, 55, 59, 63] of the 3.6B prior's 64.",
    )
    backbone_config: str | None = Field(
        default=None, description="Stable Cascade: a JSON file describing a smaller EfficientNet backbone "
        "({last_channel, stages}, as effnet_config.json; the devkit's tiny one); default EfficientNetV2-S with "
        "torchvision's ImageNet weights, as the original.",
    )
    conditioning_scale: float = Field(default=1.0, gt=0, description="Scale of the ControlNet residuals.")
    degrade_factor: int = Field(
        default=4, ge=1, description="kind image: the control is the crop shrunk by this factor and enlarged back."
    )

    @model_validator(mode="after")
    def _blocks(self) -> ControlNetSection:
        if self.blocks is not None and (not self.blocks or min(self.blocks) < 0 or len(set(self.blocks)) != len(self.blocks)):
            raise ValueError(f"blocks {self.blocks} must be distinct block numbers >= 0, at least one")
        return self


class WandbSection(_Section):
    project: str = Field(default="latentforge", description="wandb project the run logs to.")
    entity: str | None = Field(default=None, description="wandb team or user; unset: the API key's default entity.")
    run_name: str | None = Field(default=None, description="Display name of the run; unset: the output folder's name.")
    tags: list[str] = Field(default_factory=list, description="Tags of the wandb run.")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        default=None, description="wandb mode; unset: WANDB_MODE, else online. offline writes the run under "
        "OUTPUT/wandb (or WANDB_DIR) for a later `wandb sync`.",
    )

    @model_validator(mode="after")
    def _no_key(self) -> WandbSection:
        # The API key comes from WANDB_API_KEY or ~/.netrc only; a pasted key would be copied into checkpoints.
        for name in ("project", "entity", "run_name", *(f"tags.{i}" for i in range(len(self.tags)))):
            value = self.tags[int(name[5:])] if name.startswith("tags.") else getattr(self, name)
            if value and _API_KEY.match(value):
                raise ValueError(f"{name} looks like an API key: the wandb key comes from WANDB_API_KEY or "
                                 "~/.netrc (wandb login), never the config")
        return self


_API_KEY = re.compile(r"^(?:[A-Za-z0-9]+[-_])?[A-Za-z0-9]{40,}$")  # 40 hex chars, or a prefixed longer key


EVAL_METRICS = ("fid", "kid", "is", "clip", "lpips", "hps")


class EvalSection(_Section):
    """Run evaluation (`train.eval_every`, `latentforge evaluate`): what is measured and where its weights are."""

    metrics: list[Literal["fid", "kid", "is", "clip", "lpips", "hps"]] = Field(
        default_factory=lambda: list(EVAL_METRICS),
        description="fid, kid (vs the held-out split decoded by the VAE), is, clip (CLIP score), lpips (diversity "
        "between seeds of one prompt), hps (HPSv2.1).",
    )
    num_images: int = Field(
        default=100, ge=1, description="Held-out rows generated from their cached embeddings and decoded as the "
        "reference (FID, KID, IS); fewer when the held-out split is smaller.")
    seeds_per_prompt: int = Field(
        default=4, ge=1, description="Images per validation prompt (CLIP score, HPSv2.1; LPIPS diversity needs 2+).")
    steps: int | None = Field(default=None, ge=1, description="Denoising steps; default train.validation_inference_steps.")
    guidance_scale: float | None = Field(default=None, ge=0, description="Classifier-free guidance; default the pipeline's.")
    batch_size: int = Field(default=16, ge=1, description="Images per forward pass of a metric backbone.")
    inception_weights: str | None = Field(
        default=None, description="torch-fidelity's InceptionV3 weights file (weights-inception-2015-12-05-6726825d.pth); "
        "unset: downloaded once into the torch hub cache.")
    clip_model: str = Field(
        default="openai/clip-vit-large-patch14", description="CLIP for CLIP score: hub id or a local folder "
        "(transformers CLIPModel + CLIPProcessor).")
    hps_model: str = Field(
        default="ViT-H-14", description="open_clip architecture of HPSv2.1, or a model config .json file.")
    hps_checkpoint: str | None = Field(
        default=None, description="HPS_v2.1_compressed.pt; unset: downloaded from the hub repo xswu/HPSv2.")
    lpips_net: Literal["alex", "vgg", "squeeze"] = Field(default="alex", description="LPIPS backbone.")
    lpips_weights: str | None = Field(
        default=None, description="The LPIPS backbone's torchvision ImageNet weights file (e.g. alexnet-owt-7be5be79.pth); "
        "unset: downloaded once into the torch hub cache.")


class TrainConfig(_Section):
    output_dir: str = Field(description="Checkpoints, TensorBoard logs and exports go here.")
    max_steps: int = Field(gt=0, description="Optimizer steps to train.")
    seed: int = Field(default=0, ge=0, description="Seed for sample order, noise and dropout.")
    lr: float = Field(default=1e-5, gt=0, description="Peak learning rate (per sample x global batch with scale_lr).")
    scale_lr: bool = Field(default=False, description="Multiply lr by the global batch size.")
    lr_scheduler: Literal["constant", "cosine", "linear"] = Field(default="constant", description="Decay after warmup.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup steps from 0 to lr.")
    micro_batch_size: int = Field(default=1, ge=1, description="Samples per rank per forward pass.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    max_grad_norm: float = Field(default=1.0, ge=0, description="Gradient clipping (0 disables).")
    optimizer: Literal["adamw", "adamw_8bit", "lion", "lion_8bit", "adafactor", "prodigy", "deepspeed"] = Field(
        default="adamw",
        description="adamw (torch; DeepSpeed's CPU Adam under ZeRO-Offload), adamw_8bit / lion / lion_8bit "
        "(bitsandbytes), adafactor (transformers), prodigy (prodigyopt, use lr 1.0), deepspeed (the "
        "deepspeed.optimizer section). The warmup/decay schedule applies to each.",
    )
    optimizer_args: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for the optimizer, e.g. {d_coef: 0.5} for Prodigy."
    )
    weight_decay: float = Field(default=1e-2, ge=0, description="Decoupled weight decay of the optimizer.")
    adam_betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(default=1e-8, gt=0, description="AdamW epsilon.")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations to save memory.")
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        default=None, description="Training target; default: the model's scheduler config."
    )
    objective: Literal["scheduler", "edm"] = Field(
        default="scheduler",
        description="scheduler: the family's own (DDPM eps/v, or flow matching); edm: Karras preconditioning with "
        "log-normal sigmas for the eps/v UNet families (train.edm), exported with an EDMEulerScheduler.",
    )
    edm: EdmConfig = Field(default_factory=EdmConfig, description="EDM objective settings (train.objective: edm).")
    zero_terminal_snr: bool = Field(
        default=False,
        description="Rescale the betas to zero terminal SNR (Lin et al. 2023); needs v_prediction. Validation and "
        "export then sample with trailing timesteps.",
    )
    input_perturbation: float = Field(
        default=0.0, ge=0, description="Input perturbation (e.g. 0.1): the model input is noised with noise + p x "
        "fresh noise, the target keeps the noise (diffusers' train_text_to_image).",
    )
    snr_gamma: float | None = Field(default=None, gt=0, description="Min-SNR-gamma loss weighting (e.g. 5.0); off when unset.")
    noise_offset: float = Field(default=0.0, ge=0, description="Offset noise strength (e.g. 0.05).")
    timestep_bias: TimestepBiasConfig = Field(default_factory=TimestepBiasConfig, description="Timestep sampling bias.")
    flow_weighting: Literal["logit_normal", "uniform"] = Field(
        default="logit_normal", description="Flow-matching families (SANA): how noise levels are sampled."
    )
    flow_shift: float | None = Field(default=None, gt=0, description="Flow-matching shift; default the scheduler's.")
    logit_mean: float = Field(default=0.0, description="Mean of the logit-normal noise-level distribution.")
    logit_std: float = Field(default=1.0, gt=0, description="Std of the logit-normal noise-level distribution.")
    gdf_shift: float = Field(
        default=1.0, gt=0, description="Stable Cascade: GDF schedule shift (logSNR + 2 log(1/shift)); 1 as Stage C was trained."
    )
    caption_dropout: float = Field(default=0.0, ge=0, le=1, description="Probability of training on the empty prompt.")
    micro_conditioning_dropout: float = Field(
        default=0.0, ge=0, le=1, description="Probability of zeroing SDXL's size/crop conditioning for a sample."
    )
    ema: EmaConfig = Field(default_factory=EmaConfig, description="Exponential moving average of the weights.")
    lora: LoraSection = Field(default_factory=LoraSection, description="Low-rank adapters (peft) on the denoiser.")
    controlnet: ControlNetSection = Field(default_factory=ControlNetSection, description="ControlNet training.")
    held_out_fraction: float = Field(
        default=0.0, ge=0, lt=1, description="Fraction of samples (by key hash) kept out of training for validation."
    )
    validation_every: int = Field(default=0, ge=0, description="Validation loss + image grid every N steps (0: off).")
    validation_inference_steps: int = Field(default=20, ge=1, description="Denoising steps for validation images.")
    eval_every: int = Field(
        default=0, ge=0, description="Run evaluation (FID, KID, IS, CLIP score, LPIPS, HPSv2.1; train.eval) every N "
        "steps and at the last step (0: off).")
    eval: EvalSection = Field(default_factory=EvalSection, description="Run evaluation: metrics, images, weights.")
    checkpoint_every: int = Field(default=500, ge=1, description="Save a DeepSpeed checkpoint every N steps.")
    keep_last: int = Field(default=3, ge=1, description="Checkpoints to keep.")
    backup_every: int = Field(
        default=0, ge=0,
        description="Also keep every checkpoint whose step is a multiple of this, outside the keep_last rotation "
        "(Stable Cascade's backup_every; 0: off). Such a step is always checkpointed.",
    )
    resume: str | None = Field(default=None, description="'latest', a checkpoint folder, or unset for a fresh run.")
    log_every: int = Field(default=10, ge=1, description="TensorBoard scalars every N steps.")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Where scalars, grids, text and hparams go: "
        "tensorboard (OUTPUT/tensorboard) and/or wandb (train.wandb; key from WANDB_API_KEY or ~/.netrc).",
    )
    wandb: WandbSection = Field(default_factory=WandbSection, description="Weights & Biases run (report_to: wandb).")
    num_workers: int = Field(default=2, ge=0, description="DataLoader worker processes reading the cache.")
    prefetch_factor: int = Field(default=4, ge=1, description="Batches each worker reads ahead.")
    read_ahead: int | None = Field(
        default=None, ge=0, description="Micro-batches each worker reads concurrently ahead (threads); unset: 16 "
        "when cache.path is on an object store (hides its per-request latency), 0 on a local disk.")
    read_through_dir: str | None = Field(
        default=None, description="Object-store caches: a local folder for copies of the shard files read, so "
        "later epochs read at local-disk speed (several workers and ranks may share it).")
    read_through_gb: float = Field(default=100.0, gt=0, description="Most GB read_through_dir may hold; least "
                                   "recently used copies are deleted beyond it.")
    shuffle: Literal["auto", "global", "shard_window"] = Field(
        default="auto", description="Sample order within an epoch. global: every bucket shuffled as a whole (one "
        "request per row on an object store). shard_window: shard files shuffled, rows shuffled within windows of "
        "shuffle_window_shards files, each file fetched whole once per worker (docs/training.md). auto: "
        "shard_window when cache.path is on an object store and no source sets a weight, else global.")
    shuffle_window_shards: int = Field(
        default=2, ge=1, description="shuffle: shard_window: shard files per window. More mixes rows of more files "
        "but a worker reading whole files keeps about 3 x this + 2 shard files per field in memory (three windows).")
