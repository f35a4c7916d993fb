"""torchvision EfficientNet feature extractors, as Stable Cascade's networks build them.

Two Stable Cascade modules stand on the same backbone (Stability-AI/StableCascade): the Stage C encoder
(`modules/effnet.py`, the cache job's `preprocess/effnet.py`) and the Stage C ControlNet
(`modules/controlnet.py`, the trainer's `train/cascade_controlnet.py`): `efficientnet_v2_s().features`,
stride 32, 1280 channels. A `stages` description builds a smaller one (the devkit's tiny models):
`{"last_channel": 64, "stages": [["fused"|"mb", expand, kernel, stride, in, out, layers], ...]}`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

V2_S_CHANNELS = 1280  # channels out of efficientnet_v2_s().features


def efficientnet_features(config: dict[str, Any] | None, imagenet: bool = False) -> tuple[nn.Module, int]:
    """(features, channels out): the EfficientNetV2-S of the release (`imagenet`: with torchvision's
    ImageNet weights, `weights='DEFAULT'`, downloaded on first use), or the stages `config` lists."""
    import torchvision
    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

    if not config or not config.get("stages"):
        weights = "DEFAULT" if imagenet else None
        return torchvision.models.efficientnet_v2_s(weights=weights).features, V2_S_CHANNELS
    stages = []
    for kind, expand, kernel, stride, c_in, c_out, layers in config["stages"]:
        if kind == "mb":
            stages.append(MBConvConfig(expand, kernel, stride, c_in, c_out, layers, width_mult=1.0, depth_mult=1.0))
        elif kind == "fused":
            stages.append(FusedMBConvConfig(expand, kernel, stride, c_in, c_out, layers))
        else:
            raise ValueError(f"EfficientNet stage kind {kind!r} is neither 'fused' nor 'mb'")
    last = int(config["last_channel"])
    return EfficientNet(stages, dropout=0.0, last_channel=last).features, last


def state_misfit(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """What keeps `state` from loading strictly into `model` ("2 missing, 0 unexpected, ..., e.g. 'key'"), or
    None when it fits. BatchNorm's `num_batches_tracked` counters may be absent: eval mode never reads them."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return None
    first = (missing or unexpected or shapes)[0]
    return f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} of another shape, e.g. {first!r}"
