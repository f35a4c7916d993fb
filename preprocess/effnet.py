"""Stable Cascade's Stage C encoder: EfficientNetV2-S features plus a 1x1 mapper to 16 normalised channels.

diffusers has no class for it, so it is built here the way the original training code builds it
(Stability-AI/StableCascade `modules/effnet.py`): torchvision's `efficientnet_v2_s().features` (stride 32,
1280 channels) as `backbone`, then `mapper` = Conv2d(1280, 16, 1, bias=False) and a non-affine
BatchNorm2d(16) whose running statistics make the latents roughly zero-mean, unit-variance. The module
names are the released `effnet_encoder.safetensors`'s (`backbone.*`, `mapper.0.weight`,
`mapper.1.running_mean`, ...), so that file loads strictly.

Input: RGB in [0, 1] normalised with the ImageNet mean/std (`train/train_c.py` `effnet_preprocess`), at
the training size: a 768x768 image gives 24x24 latents, which the prior pipeline renders as a 1024 px
image (its `resolution_multiple` 42.67 = 1024 / 24).

An optional `effnet_config.json` beside the weights describes another backbone (the devkit's tiny one):
`{"c_latent": 16, "last_channel": 64, "stages": [["fused"|"mb", expand, kernel, stride, in, out, layers], ...]}`.
Without it the backbone is the released EfficientNetV2-S.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentforge.shared.efficientnet import efficientnet_features, state_misfit

WEIGHTS_NAME = "effnet_encoder.safetensors"
CONFIG_NAME = "effnet_config.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EfficientNetEncoder(nn.Module):
    """`backbone` (EfficientNet features) + `mapper` (1x1 conv, non-affine BatchNorm): the release's layout."""

    def __init__(self, c_latent: int = 16, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone, channels = efficientnet_features(config)
        self.mapper = nn.Sequential(nn.Conv2d(channels, c_latent, kernel_size=1, bias=False),
                                    nn.BatchNorm2d(c_latent, affine=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised RGB (B, 3, H, W) -> latents (B, c_latent, H/32, W/32)."""
        return self.mapper(self.backbone(x))


def load_effnet_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` strictly; only BatchNorm's `num_batches_tracked` counters may be absent (unused in eval).

    A file in another layout is one line naming it and what did not fit."""
    misfit = state_misfit(model, state)
    if misfit:
        raise ValueError(f"{source}: not an EfficientNet Stage C encoder in the effnet_encoder.safetensors layout "
                         f"({misfit}); point model.vae at the released file's folder")
    model.load_state_dict(state, strict=False)


def effnet_file(folder: Path) -> Path:
    """The weights file in `folder`: effnet_encoder.safetensors (a single .safetensors also does)."""
    path = folder / WEIGHTS_NAME
    if path.is_file():
        return path
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME}; set model.vae to the folder (or hub repo, "
                            "e.g. stabilityai/StableCascade) that holds Stable Cascade's effnet_encoder.safetensors")


def load_effnet(folder: Path, device: str | torch.device = "cpu") -> EfficientNetEncoder:
    """The encoder saved in `folder` (released layout, optional `effnet_config.json`), on `device`, in eval mode.

    The weights are read straight onto `device` and the module is built there (no host copy on a GPU)."""
    from .model_load import built_on, load_safetensors

    path = effnet_file(folder)
    config_path = folder / CONFIG_NAME
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    state = load_safetensors(path, torch.device(device))
    c_latent = int(state["mapper.0.weight"].shape[0]) if "mapper.0.weight" in state else 16
    with built_on(torch.device(device), str(path)):
        model = EfficientNetEncoder(c_latent, config)
        load_effnet_state(model, state, str(path))
    return model.eval()


def to_effnet_input(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] (the cache job's range) -> [0, 1] -> ImageNet mean/std, as `effnet_preprocess`."""
    x = (pixels + 1.0) / 2.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
