"""Stable Cascade Stage C ControlNet training: the ControlNet's features injected into diffusers' frozen prior.

diffusers' `StableCascadeUNet` takes no control input, so the injection is a forward pre-hook on each chosen
`SDCascadeResBlock`, not a fork of its forward. The original (Stability-AI/StableCascade `modules/stage_c.py`
`StageC._down_encode` / `_up_decode` with `ControlNetDeliverer`) hands out the ControlNet's outputs one per
ResBlock call, in call order (down levels, then up levels) and, when the k-th call has one, adds it to the
block's input: `x = x + interpolate(cnet, size=x.shape[-2:], mode='bilinear', align_corners=True)`, after
the up path's resize of `x` to the skip's size and before `block(x, skip)`. `res_blocks` lists the blocks
in that order (Stage C priors call each block once: no repeat mappers), and the hook of block k adds
feature k to the first argument it is called with. Blocks are found by index, not counted per call, so a
gradient-checkpointed block recomputed in backward gets the same feature again.

`CascadeControlNetDenoiser` is what DeepSpeed trains: the ControlNet (trainable) and the prior (frozen).
`CascadeControlNetAdapter` wraps the Stage C adapter: the same cached text fields and caption dropout, plus
the control image of each sample (`control_images.control_input`, then `cascade_control_input`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from latentforge.shared.config import Config, ConfigError

from .cascade_controlnet import (
    KIND_CHANNELS,
    RELEASE_BLOCKS,
    CascadeControlNet,
    cascade_control_input,
    interpolate_to,
    load_cascade_controlnet,
)
from .controlled_adapter import ControlledAdapter
from .families.base import DenoiserAdapter


def res_blocks(prior: torch.nn.Module) -> list[torch.nn.Module]:
    """The prior's ResBlocks in the order the original's `ControlNetDeliverer` numbers them."""
    from diffusers.models.unets.unet_stable_cascade import SDCascadeResBlock

    cfg = prior.config
    repeats = [*(cfg.down_blocks_repeat_mappers or ()), *(cfg.up_blocks_repeat_mappers or ())]
    if any(int(r) != 1 for r in repeats):
        raise ValueError("a prior with repeat mappers calls its blocks more than once; Stage C priors have none")
    return [b for level in [*prior.down_blocks, *prior.up_blocks] for b in level if isinstance(b, SDCascadeResBlock)]


class CascadeControlNetDenoiser(torch.nn.Module):
    """The ControlNet and the frozen prior as one module: the ControlNet's features go into chosen ResBlocks."""

    def __init__(self, controlnet: CascadeControlNet, prior: torch.nn.Module) -> None:
        super().__init__()
        self.controlnet, self.prior = controlnet, prior
        self.prior.requires_grad_(False)
        self._hooks: list[Any] = []
        blocks = res_blocks(prior)
        for index in controlnet.proj_blocks:
            if index >= len(blocks):
                raise ConfigError(f"config error: train.controlnet.blocks: {index} is past the prior's {len(blocks)} "
                                  f"ResBlocks (0-{len(blocks) - 1})")
            width = blocks[index].depthwise.in_channels
            if width != controlnet.c_proj:
                raise ConfigError(f"config error: train.controlnet.blocks: ResBlock {index} is {width} channels wide, "
                                  f"the ControlNet projects to {controlnet.c_proj}")
            self._hooks.append(blocks[index].register_forward_pre_hook(self._injector(index)))
        # The features of the current forward. Kept after it when the prior checkpoints its gradients,
        # which runs its blocks (and these hooks) again in backward.
        self._features: list[torch.Tensor | None] | None = None

    def frozen_denoiser(self) -> torch.nn.Module:
        """The prior without control (what the grid's base row renders): features of a past forward dropped."""
        self._features = None
        return self.prior

    def remove_hooks(self) -> None:
        """Give the prior back unhooked (after sampling with it, say)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _injector(self, index: int) -> Any:
        def inject(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            features = self._features
            if features is None or index >= len(features) or features[index] is None:
                return None
            return (args[0] + interpolate_to(features[index], args[0]), *args[1:])
        return inject

    def features(self, control: torch.Tensor, scale: float = 1.0) -> list[torch.Tensor | None]:
        """The ControlNet's outputs for a control input, times `scale` (train.controlnet.conditioning_scale)."""
        out = self.controlnet(control)
        return out if scale == 1.0 else [f * scale if f is not None else None for f in out]

    @contextmanager
    def controlled(self, control: torch.Tensor, scale: float = 1.0) -> Iterator[None]:
        """Every prior call inside is steered by `control` (validation: the prior pipeline calls `self.prior`)."""
        self._features = self.features(control.to(next(self.controlnet.parameters()).dtype), scale)
        try:
            yield
        finally:
            self._features = None

    def forward(self, noisy: torch.Tensor, timestep_ratio: torch.Tensor, cond: dict[str, torch.Tensor],
                scale: float = 1.0) -> torch.Tensor:
        """The prior's prediction steered by `cond["controlnet_cond"]`, called as StableCascadePriorPipeline
        calls the prior (`clip_img` zeros: text-to-image)."""
        dtype = noisy.dtype
        self._features = self.features(cond["controlnet_cond"].to(dtype), scale)
        clip_img = torch.zeros(noisy.shape[0], 1, int(self.prior.config.clip_image_in_channels), device=noisy.device,
                               dtype=dtype)
        try:
            return self.prior(noisy, timestep_ratio=timestep_ratio.to(dtype), clip_text_pooled=cond["clip_text_pooled"].to(dtype),
                              clip_text=cond["clip_text"].to(dtype), clip_img=clip_img).sample
        finally:
            if not (torch.is_grad_enabled() and self.prior.gradient_checkpointing):
                self._features = None  # else backward's recomputation needs them; the next forward replaces them


def read_backbone(path: str | None) -> dict[str, Any] | None:
    """`train.controlnet.backbone_config` (a smaller EfficientNet), or None for EfficientNetV2-S."""
    if not path:
        return None
    import json
    from pathlib import Path

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config error: train.controlnet.backbone_config: cannot read {path} ({exc})") from None


def build_controlnet(config: Config, kind: str, prior: torch.nn.Module) -> CascadeControlNet:
    """`train.controlnet.pretrained` (a file in the released layout, or an export folder), or a fresh ControlNet
    as the original builds one: EfficientNetV2-S with ImageNet weights, zero output projections."""
    cn = config.train.controlnet
    backbone = read_backbone(cn.backbone_config)
    blocks: Sequence[int] | None = cn.blocks
    width = int(prior.config.block_out_channels[0])
    if cn.pretrained:
        try:
            controlnet = load_cascade_controlnet(cn.pretrained, blocks, backbone)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config error: train.controlnet.pretrained: {str(exc).splitlines()[0][:240]}") from None
        if controlnet.c_in != KIND_CHANNELS[kind]:
            raise ConfigError(f"config error: train.controlnet.pretrained: {cn.pretrained} takes {controlnet.c_in} "
                              f"input channels; the {kind} control gives {KIND_CHANNELS[kind]}")
        return controlnet
    try:
        return CascadeControlNet(KIND_CHANNELS[kind], width, blocks or RELEASE_BLOCKS, backbone, imagenet=backbone is None)
    except OSError as exc:  # torchvision downloads the ImageNet weights on first use
        raise ConfigError("config error: train.controlnet: cannot get torchvision's EfficientNetV2-S ImageNet weights "
                          f"({str(exc)[:120]}); run once online, or set train.controlnet.pretrained") from None


class CascadeControlNetAdapter(ControlledAdapter):
    """The Stage C adapter with a ControlNet steering its frozen prior."""

    def __init__(self, base: DenoiserAdapter, kind: str, scale: float = 1.0) -> None:
        super().__init__(base, kind, scale)
        # The prior, its pipeline and objective are the Stage C adapter's own; this one adds the ControlNet.
        for name in ("family", "model_class", "model_subfolder", "pipeline_class", "objective"):
            setattr(self, name, getattr(base, name))

    def load(self, config: Config) -> torch.nn.Module:
        prior = self.base.load(config)  # with gradient checkpointing when set: backward runs through it
        return CascadeControlNetDenoiser(build_controlnet(config, self.kind, prior), prior)

    def controlnet_input(self, control: torch.Tensor) -> torch.Tensor:
        """The original filters' form: canny 1 channel, inpaint 4 (holes + mask), image and sidecar 3."""
        return cascade_control_input(self.kind, control)

    def forward(self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(noisy, timesteps, cond, self.scale)

    def validation_renderer(self, model: torch.nn.Module, setup: Any) -> Any:
        """The whole cascade (`families/cascade.py`) around the prior, steered by each prompt's control image."""
        from .families.cascade import cascade_renderer

        inner = cascade_renderer(self.base, model.prior, setup)

        def render(size: tuple[int, int], one: dict[str, torch.Tensor], empty: dict[str, torch.Tensor],
                   generator: torch.Generator, decode: bool, call: dict[str, Any] | None = None) -> Any:
            control = (call or {}).get("image")
            if control is None:
                return inner(size, one, empty, generator, decode)
            with model.controlled(cascade_control_input(self.kind, control), self.scale):
                return inner(size, one, empty, generator, decode)

        return render
