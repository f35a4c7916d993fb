"""ControlNet training (`train.controlnet.enabled`): a ControlNet learns to steer the frozen UNet (SD 1.x/2.x,
SDXL; Stable Cascade Stage C has its own, `cascade_controlnet_adapter.py`).

The model DeepSpeed trains is `ControlNetDenoiser`: the ControlNet (initialised from the UNet with
diffusers' `ControlNetModel.from_unet`, or loaded from `train.controlnet.pretrained`) and the UNet, whose
weights never train. `ControlNetAdapter` wraps the family's own adapter: the same cached text and
micro-conditioning (caption dropout included), plus the control image of each sample, read from the
cache's `conditioning` field (`control_images.py` turns it into the ControlNet's input). Checkpoints,
the EMA and the export hold the ControlNet alone.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from latentforge.shared.cache_format import CacheSpec
from latentforge.shared.config import Config, ConfigError

from .control_images import control_input
from .controlled_adapter import ControlledAdapter
from .families.base import DenoiserAdapter

# The diffusers pipeline an exported ControlNet goes into, per family.
CONTROLNET_PIPELINES = {"sd1": "StableDiffusionControlNetPipeline", "sd2": "StableDiffusionControlNetPipeline",
                        "sdxl": "StableDiffusionXLControlNetPipeline"}
CASCADE = "stable_cascade"  # Stage C: the original's ControlNet, not diffusers' (`cascade_controlnet.py`)
CONTROLNET_PREFIX = "controlnet."  # parameter names of the ControlNet inside `ControlNetDenoiser`


class ControlNetDenoiser(torch.nn.Module):
    """The ControlNet and the frozen UNet as one module: the ControlNet's residuals go into the UNet."""

    def __init__(self, controlnet: torch.nn.Module, unet: torch.nn.Module) -> None:
        super().__init__()
        self.controlnet, self.unet = controlnet, unet
        self.unet.requires_grad_(False)

    def frozen_denoiser(self) -> torch.nn.Module:
        """The UNet alone, without the ControlNet: what the validation grid's base row renders."""
        return self.unet

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor],
                conditioning_scale: float = 1.0) -> Any:
        dtype = noisy.dtype
        text = cond["encoder_hidden_states"].to(dtype)
        added = ({"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)}
                 if "text_embeds" in cond else None)
        down, mid = self.controlnet(noisy, timesteps, encoder_hidden_states=text,
                                    controlnet_cond=cond["controlnet_cond"].to(dtype),
                                    conditioning_scale=conditioning_scale, added_cond_kwargs=added, return_dict=False)
        return SimpleNamespace(sample=self.unet(noisy, timesteps, encoder_hidden_states=text, added_cond_kwargs=added,
                                                down_block_additional_residuals=down,
                                                mid_block_additional_residual=mid).sample)


def load_controlnet(config: Config, unet: torch.nn.Module) -> torch.nn.Module:
    """`train.controlnet.pretrained`, or a fresh ControlNet copied from `unet` (its zero convolutions start
    at zero, so step 0 predicts exactly what the UNet alone does)."""
    from diffusers import ControlNetModel

    source = config.train.controlnet.pretrained
    if source:
        try:
            return ControlNetModel.from_pretrained(source, torch_dtype=torch.float32)
        except OSError as exc:
            raise ConfigError(f"config error: train.controlnet.pretrained: cannot load a ControlNetModel from "
                              f"{source!r} ({str(exc).splitlines()[0][:160]})") from None
    return ControlNetModel.from_unet(unet, conditioning_channels=3)


class ControlNetAdapter(ControlledAdapter):
    """A family adapter with a ControlNet in front of its frozen UNet."""

    model_subfolder = "controlnet"
    model_class = "ControlNetModel"

    def __init__(self, base: DenoiserAdapter, kind: str, scale: float = 1.0) -> None:
        super().__init__(base, kind, scale)
        self.family = base.family
        self.pipeline_class = CONTROLNET_PIPELINES[base.family]
        self.no_text = base.no_text

    def load(self, config: Config) -> torch.nn.Module:
        import diffusers

        unet = getattr(diffusers, self.base.model_class).from_pretrained(
            config.model.pretrained, subfolder=self.base.model_subfolder, torch_dtype=torch.float32, **config.model.pins())
        controlnet = load_controlnet(config, unet)
        if config.train.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
            unet.enable_gradient_checkpointing()  # backward still runs through the frozen UNet
        return ControlNetDenoiser(controlnet, unet)

    def forward(self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(noisy, timesteps, cond, self.scale).sample

    def validation_pipeline(self, model: torch.nn.Module, vae: Any, scheduler: Any) -> Any:
        import diffusers

        pipe = getattr(diffusers, self.pipeline_class)(vae=vae, scheduler=scheduler, unet=model.unet,
                                                       controlnet=model.controlnet, **self.no_text)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def controlnet_adapter(base: DenoiserAdapter, config: Config, spec: CacheSpec, cache_path: str) -> DenoiserAdapter:
    """The ControlNet adapter for a run (Stable Cascade: `cascade_controlnet_adapter.py`); one-line errors for
    what cannot train a ControlNet."""
    if base.family not in (*CONTROLNET_PIPELINES, CASCADE):
        raise ConfigError(f"config error: train.controlnet.enabled: ControlNet training supports "
                          f"{', '.join((*CONTROLNET_PIPELINES, CASCADE))}, not {base.family}")
    if config.train.lora.enabled:
        raise ConfigError("config error: train.controlnet.enabled and train.lora.enabled: train one or the other")
    if spec.conditioning is None:
        raise ConfigError(f"config error: train.controlnet.enabled: cache {cache_path} holds no control images; "
                          "set cache.conditioning.kind (canny, image, inpaint or sidecar) and re-cache into a new cache.path")
    cn = config.train.controlnet
    if base.family != CASCADE and (cn.blocks is not None or cn.backbone_config):
        raise ConfigError(f"config error: train.controlnet.blocks and backbone_config are for Stable Cascade's "
                          f"ControlNet; a {base.family} ControlNet is diffusers' ControlNetModel: remove them")
    if base.family == CASCADE:
        from .cascade_controlnet_adapter import CascadeControlNetAdapter

        return CascadeControlNetAdapter(base, spec.conditioning, config.train.controlnet.conditioning_scale)
    return ControlNetAdapter(base, spec.conditioning, config.train.controlnet.conditioning_scale)


def validation_controls(spec_reader: Any, held_out: dict[tuple[int, int], Any], count: int, kind: str,
                        degrade_factor: int, seed: int) -> torch.Tensor | None:
    """Control images for `count` validation prompts, (count, 3, H, W) in [0, 1]: the squarest bucket that
    holds samples, its held-out rows first (images training never saw), then its first rows, cycled
    when there are fewer than prompts. Inpainting masks are drawn from `seed`, the same every time."""
    import numpy as np

    counts = spec_reader.bucket_counts()
    if not count or not counts:
        return None
    bucket = min(counts, key=lambda b: (abs(np.log(b[1] / b[0])), -counts[b]))
    order = [int(r) for r in held_out.get(bucket, [])] + [r for r in range(counts[bucket])]
    rows = [order[i % len(order)] for i in range(count)]
    unique = sorted(set(rows))
    cached = spec_reader.read_rows(bucket, unique, fields=["conditioning"])["conditioning"]
    picked = cached[[unique.index(r) for r in rows]]
    return control_input(kind, picked, torch.Generator().manual_seed(seed), degrade_factor)
