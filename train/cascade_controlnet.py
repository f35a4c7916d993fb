"""Stable Cascade Stage C ControlNet: the network, its control input and its file, in the original layout.

What the original training code does (Stability-AI/StableCascade, read 2026-12-03):
- `modules/controlnet.py` `ControlNet(c_in, c_proj, proj_blocks, bottleneck_mode='effnet')`: the control image
  goes through `efficientnet_v2_s(weights='DEFAULT').features` (stride 32, 1280 channels; its first convolution
  replaced by `Conv2d(c_in, 24, 3, stride=2, bias=False)` when the filter gives another channel count, the
  ImageNet weights copied into its first three input channels), then one projection per injected block:
  `Conv2d(1280, 1280, 1) -> LeakyReLU(0.2) -> Conv2d(1280, c_proj, 1)`, the last initialised to zero, so
  step 0 predicts what the prior alone does. `forward` returns a list indexed by block (None elsewhere).
- `train/train_c_controlnet.py` `setup_models`: the backbone trains but stays in eval mode
  (`controlnet.backbone.eval().requires_grad_(True)`: BatchNorm statistics frozen, no stochastic depth);
  only the ControlNet is in the optimizer; `models_to_save` is the ControlNet alone.
- The filters (`modules/controlnet.py`) give the input in [0, 1] without ImageNet normalisation:
  `CannyFilter` one channel of edges; `InpaintFilter` four: the image with masked pixels set to 1, and the
  mask; `SRFilter` the image shrunk and enlarged back (3 channels). `cascade_control_input` turns this
  project's shared control images (`control_images.control_input`) into those.
- `configs/training/controlnet_c_3b_canny.yaml`: `controlnet_blocks: [0, 4, 8, 12, 51, 55, 59, 63]` of the
  3.6B prior's 64 ResBlocks (`RELEASE_BLOCKS`), lr 1e-4, image_size 768 (24x24 latents and features).

The released files (stabilityai/stable-cascade `controlnet/canny.safetensors`, `inpainting.safetensors`) hold
`backbone.*` and `projections.{i}.{0,2}.weight`, which is this module's state dict; `load_cascade_controlnet`
reads them, and an export of a run (`save_cascade_controlnet`) writes the same layout plus a small JSON.
The `simple` and `large` bottlenecks (face identity, effnet super-resolution) need inputs the cache does not
hold (ArcFace vectors, EfficientNet latents of the degraded image) and are not built here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.shared.efficientnet import efficientnet_features, state_misfit

from .control_images import MASKED

RELEASE_BLOCKS = (0, 4, 8, 12, 51, 55, 59, 63)  # controlnet_c_3b_{canny,inpainting,sr}.yaml
WEIGHTS_NAME = "controlnet.safetensors"
CONFIG_NAME = "controlnet_config.json"
# Channels of the original filter each cached kind stands for (CannyFilter, InpaintFilter, SRFilter, a map).
KIND_CHANNELS = {"canny": 1, "inpaint": 4, "image": 3, "sidecar": 3}
KIND_FILTER = {"canny": "CannyFilter", "inpaint": "InpaintFilter", "image": "SRFilter", "sidecar": None}


class CascadeControlNet(nn.Module):
    """The original `ControlNet` with its `effnet` bottleneck: `backbone` + one `projections[i]` per block."""

    def __init__(self, c_in: int = 3, c_proj: int = 2048, proj_blocks: Sequence[int] = RELEASE_BLOCKS,
                 backbone: dict[str, Any] | None = None, imagenet: bool = False) -> None:
        """`backbone`: a smaller EfficientNet (`shared/efficientnet.py`), None for EfficientNetV2-S;
        `imagenet`: start that V2-S from torchvision's ImageNet weights, as the original does."""
        super().__init__()
        self.c_in, self.c_proj, self.proj_blocks = c_in, c_proj, [int(b) for b in proj_blocks]
        self.backbone_config = backbone
        self.backbone, channels = efficientnet_features(backbone, imagenet=imagenet)
        if c_in != 3:  # as the original: no padding, the pretrained first-layer weights kept where they fit
            first = self.backbone[0][0]
            weights = first.weight.data
            self.backbone[0][0] = nn.Conv2d(c_in, first.out_channels, kernel_size=3, stride=2, bias=False)
            if c_in > 3:
                nn.init.constant_(self.backbone[0][0].weight, 0)
                self.backbone[0][0].weight.data[:, :3] = weights[:, :3].clone()
            else:
                self.backbone[0][0].weight.data = weights[:, :c_in].clone()
        self.projections = nn.ModuleList()
        for _ in self.proj_blocks:
            self.projections.append(nn.Sequential(nn.Conv2d(channels, channels, kernel_size=1, bias=False),
                                                  nn.LeakyReLU(0.2, inplace=True),
                                                  nn.Conv2d(channels, c_proj, kernel_size=1, bias=False)))
            nn.init.constant_(self.projections[-1][-1].weight, 0)  # zero output projection
        self.backbone.eval()

    def train(self, mode: bool = True) -> CascadeControlNet:
        """Train mode everywhere but the backbone, which stays in eval mode as in the original."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        """Control input (B, c_in, H, W) -> features (B, c_proj, H/32, W/32) at each block index, None elsewhere."""
        self._buffers_like_weights()
        x = self.backbone(x)
        out: list[torch.Tensor | None] = [None] * (max(self.proj_blocks) + 1)
        for projection, block in zip(self.projections, self.proj_blocks, strict=True):
            out[block] = projection(x)
        return out

    def _buffers_like_weights(self) -> None:
        """BatchNorm statistics in the weights' dtype. DeepSpeed's bf16 casts parameters only and keeps buffers in
        fp32, which eval-mode BatchNorm refuses; the original casts the whole network (`controlnet.to(dtype)`)."""
        dtype = self.projections[0][0].weight.dtype
        for module in self.backbone.modules():
            if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None \
                    and module.running_mean.dtype != dtype:
                module.running_mean.data = module.running_mean.data.to(dtype)
                module.running_var.data = module.running_var.data.to(dtype)

    def describe(self) -> dict[str, Any]:
        """What rebuilds this network (the JSON written beside its weights)."""
        return {"c_in": self.c_in, "c_proj": self.c_proj, "proj_blocks": self.proj_blocks,
                "bottleneck_mode": "effnet", "backbone": self.backbone_config}


def cascade_control_input(kind: str, control: torch.Tensor) -> torch.Tensor:
    """The original filter's output for a shared control image (`control_images.control_input`, (B, 3, H, W)):
    `canny` one channel of edges; `inpaint` the image with masked pixels (-1 there) set to 1, and the mask
    as a fourth channel (`InpaintFilter`); `image` and `sidecar` as they are."""
    if kind == "canny":
        return control[:, :1]
    if kind == "inpaint":
        mask = (control == MASKED).all(dim=1, keepdim=True)
        return torch.cat([control.masked_fill(mask, 1.0), mask.to(control.dtype)], dim=1)
    return control


def check_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` strictly; only BatchNorm's `num_batches_tracked` counters may be absent (unused in eval)."""
    misfit = state_misfit(model, state)
    if misfit:
        raise ValueError(f"{source}: not a Stable Cascade ControlNet of this shape ({misfit})")
    model.load_state_dict(state, strict=False)


def controlnet_from_state(state: dict[str, torch.Tensor], source: str, blocks: Sequence[int] | None = None,
                          backbone: dict[str, Any] | None = None) -> CascadeControlNet:
    """A ControlNet holding `state` (the original layout): `c_in` and `c_proj` are read from the weights,
    `blocks` default to the release's when there are as many projections, `backbone` to EfficientNetV2-S."""
    if "backbone.0.0.weight" not in state or "projections.0.2.weight" not in state:
        raise ValueError(f"{source}: no backbone.0.0.weight / projections.0.2.weight; not a Stable Cascade "
                         "ControlNet with the effnet bottleneck (canny.safetensors, inpainting.safetensors)")
    count = len({k.split(".")[1] for k in state if k.startswith("projections.")})
    if blocks is None:
        if count != len(RELEASE_BLOCKS):
            raise ValueError(f"{source}: {count} projections; name the blocks they feed (train.controlnet.blocks)")
        blocks = RELEASE_BLOCKS
    if len(blocks) != count:
        raise ValueError(f"{source}: {count} projections for {len(blocks)} blocks {list(blocks)}")
    model = CascadeControlNet(int(state["backbone.0.0.weight"].shape[1]), int(state["projections.0.2.weight"].shape[0]),
                              blocks, backbone)
    check_state(model, state, source)
    return model.float().eval()


def _resolve(source: str) -> Path:
    """A local file or folder, or `owner/repo/path/in/repo.safetensors` fetched with the hub client."""
    path = Path(source)
    if path.exists():
        return path
    parts = source.split("/")
    if len(parts) >= 3 and source.endswith(".safetensors"):
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
        except Exception as exc:  # noqa: BLE001 - the hub client's errors are not all OSErrors (a missing file, no network)
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            raise OSError(f"{source}: cannot fetch it from the hub ({type(exc).__name__}: {first}); check the repo and "
                          "path, set HF_TOKEN for a gated repo, or give a local file") from None
    raise FileNotFoundError(f"{source}: no such file or folder, and not OWNER/REPO/PATH.safetensors on the hub")


def load_cascade_controlnet(source: str | Path, blocks: Sequence[int] | None = None,
                            backbone: dict[str, Any] | None = None) -> CascadeControlNet:
    """A Stage C ControlNet, fp32 in eval mode, from
    - a folder written by `latentforge export` (`controlnet.safetensors` + `controlnet_config.json`), or
    - one `.safetensors` in the released layout (local, or `stabilityai/stable-cascade/controlnet/canny.safetensors`
      from the hub): input channels and width are read from the weights; `blocks` default to the release's
      [0, 4, 8, 12, 51, 55, 59, 63], `backbone` to EfficientNetV2-S.
    Weights that do not fit are refused (only BatchNorm's `num_batches_tracked` may be absent)."""
    from safetensors.torch import load_file

    path = _resolve(str(source))
    if path.is_dir():
        described = json.loads((path / CONFIG_NAME).read_text())
        blocks = blocks if blocks is not None else described["proj_blocks"]
        backbone = backbone if backbone is not None else described.get("backbone")
        path = path / WEIGHTS_NAME
    return controlnet_from_state(load_file(str(path)), str(path), blocks, backbone)


def save_cascade_controlnet(controlnet: CascadeControlNet, folder: Path, dtype: torch.dtype,
                            extra: dict[str, Any] | None = None) -> Path:
    """`folder/controlnet.safetensors` (the original layout) and `folder/controlnet_config.json`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in controlnet.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps({**controlnet.describe(), **(extra or {})}, indent=2))
    return folder


def interpolate_to(features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`features` at `x`'s size and batch, as `_down_encode` / `_up_decode` add them (bilinear, corners aligned);
    a batch of one control per sample is repeated when the prior runs prompt and negative together."""
    if features.shape[0] != x.shape[0]:
        features = features.repeat(x.shape[0] // features.shape[0], 1, 1, 1)
    return F.interpolate(features, size=x.shape[-2:], mode="bilinear", align_corners=True).to(x.dtype)
