"""The metric backbones, loaded once per process from wherever `weights.py` finds them.

InceptionV3 is torch-fidelity's port of the TF FID network as torchmetrics' FID/KID/IS run it; CLIP is a transformers CLIPModel + CLIPProcessor; HPSv2.1 is an
open_clip ViT-H-14 holding the HPS_v2.1_compressed.pt weights (the `hpsv2` package itself pins
protobuf<4 and cannot install beside tensorboard and wandb, so its scoring is reproduced here, see
`scores.hps_score`); LPIPS is the `lpips` package's network with its shipped linear heads and the
torchvision backbone weights. Backbones stay on the CPU between evaluations and move to the device only to
score. Tests build `Backbones` from tiny modules directly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import weights as w


@dataclass(frozen=True)
class HpsModel:
    """An open_clip model with HPS weights, its validation transform (PIL -> tensor) and its tokenizer."""

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]


@dataclass(frozen=True)
class Backbones:
    """What the metrics run on; None for a metric not asked for."""

    inception: torch.nn.Module | None = None  # uint8 (N, 3, H, W) -> (pool features (N, D), logits (N, K))
    clip: tuple[Any, Any] | None = None  # (CLIPModel, CLIPProcessor)
    hps: HpsModel | None = None
    lpips: torch.nn.Module | None = None  # (img0, img1) in [-1, 1] -> (N, 1, 1, 1) distances


def load_backbones(cfg: Any, metrics: Sequence[str]) -> Backbones:
    """The backbones `metrics` need (`cfg` is `train.eval`); `MissingWeightsError` when weights are missing."""
    want = set(metrics)
    return Backbones(
        inception=inception(cfg.inception_weights) if want & {"fid", "kid", "is"} else None,
        clip=clip(cfg.clip_model) if "clip" in want else None,
        hps=hps(cfg.hps_model, cfg.hps_checkpoint) if "hps" in want else None,
        lpips=lpips_net(cfg.lpips_net, cfg.lpips_weights) if "lpips" in want else None,
    )


@functools.cache
def inception(local: str | None) -> torch.nn.Module:
    """The InceptionV3 of torchmetrics' FID/KID/IS (torch-fidelity's network, uint8 in, antialiased resize
    to 299 as `FrechetInceptionDistance()` does by default), giving the 2048-d pool features and the
    unbiased logits IS takes from one pass (its own `forward` returns only the first)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    class BothOutputs(NoTrainInceptionV3):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pool, logits = self._torch_fidelity_forward(x)
            return pool.reshape(x.shape[0], -1), logits

    path = w.weights_file(w.INCEPTION, local)
    return BothOutputs("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path))


@functools.cache
def clip(name_or_path: str) -> tuple[Any, Any]:
    """CLIPModel (as `ClipFeatures`) and CLIPProcessor from a hub id or a local folder."""
    from transformers import CLIPModel, CLIPProcessor

    source = w.clip_source(name_or_path)
    model = w.hub_folder(source, name_or_path, CLIPModel.from_pretrained).eval()
    return ClipFeatures(model), w.hub_folder(source, name_or_path, CLIPProcessor.from_pretrained)


class ClipFeatures(torch.nn.Module):
    """A CLIPModel whose `get_*_features` return the projected embeddings as tensors.

    torchmetrics 1.9's CLIP score divides what they return by its norm; transformers 5 returns a model
    output instead, whose `pooler_output` holds those embeddings."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _embeds(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _embeds(self.model.get_text_features(*args, **kwargs))


def _embeds(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@functools.cache
def hps(arch: str, checkpoint: str | None) -> HpsModel:
    """open_clip `arch` (a name, or a model config .json registered under its file stem) with HPS weights.

    As hpsv2's `img_score`: the checkpoint's `state_dict` replaces every weight, and images are resized on
    their longest side and padded to square (open_clip's resize_mode "longest", hpsv2's ResizeMaxSize)."""
    import open_clip

    if arch.endswith(".json"):
        if not Path(arch).is_file():
            raise w.MissingWeightsError(f"train.eval.hps_model={arch}: no such open_clip model config file")
        open_clip.add_model_config(arch)
        arch = Path(arch).stem
    path = w.weights_file(w.HPS, checkpoint)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, image_resize_mode="longest",
                                                                 output_dict=True)
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state.get("state_dict", state))
    return HpsModel(model.eval(), preprocess, open_clip.get_tokenizer(arch))


@functools.cache
def lpips_net(net: str, local: str | None) -> torch.nn.Module:
    """LPIPS (`lpips` package, its linear heads) over torchvision's ImageNet `net` backbone read from a file."""
    import lpips

    path = w.weights_file(w.lpips_source(net), local)
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    load_backbone(model, torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def load_backbone(model: torch.nn.Module, torchvision_state: dict[str, torch.Tensor]) -> None:
    """Copy a torchvision model's `features.N.*` weights into LPIPS's `net.sliceK.N.*` (the slices hold the
    very modules of `features`, under their original index)."""
    own = model.net.state_dict()
    mapped = {key: torchvision_state["features." + key.split(".", 1)[1]] for key in own}
    model.net.load_state_dict(mapped)
