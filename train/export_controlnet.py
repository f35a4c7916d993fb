"""Export of a ControlNet run: a `ControlNetModel` folder for diffusers' ControlNet pipelines.

`StableDiffusionControlNetPipeline.from_pretrained(BASE, controlnet=ControlNetModel.from_pretrained(OUT))`
(SD 1.x / 2.x) and `StableDiffusionXLControlNetPipeline` (SDXL) load it beside the base pipeline the run
trained against, which is unchanged (its UNet was frozen). Stable Cascade Stage C: a folder with
`controlnet.safetensors` in the original layout and `controlnet_config.json`, which
`cascade_controlnet.load_cascade_controlnet` reads. Written to a temporary folder and renamed.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from latentforge.shared.config import Config

from .checkpoint_weights import DTYPES, trained_state_dict
from .controlnet import CASCADE, CONTROLNET_PIPELINES, CONTROLNET_PREFIX, load_controlnet
from .export_base import export_base


def export_controlnet(checkpoint: Path, out: Path, state: dict[str, Any], *, use_ema: bool = False,
                      dtype: str = "fp16", base: str | None = None) -> Path:
    """Write the trained (or EMA) ControlNet of `checkpoint` to `out` as a diffusers `ControlNetModel` folder."""
    config = Config.model_validate(state["config"])
    if config.model.family == CASCADE:  # one safetensors file in the original layout, not a diffusers folder
        return export_cascade_controlnet(checkpoint, out, state, use_ema=use_ema, dtype=dtype)
    base, pins = export_base(state["config"]["model"], base)
    import diffusers

    # The same architecture the run trained: built like the run built it, then given the trained weights.
    unet = diffusers.UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=torch.float32, **pins)
    controlnet = load_controlnet(config, unet)
    del unet
    weights = {k[len(CONTROLNET_PREFIX):]: v for k, v in trained_state_dict(checkpoint, use_ema).items()
               if k.startswith(CONTROLNET_PREFIX)}
    missing, unexpected = controlnet.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{checkpoint}: weights do not fit the run's ControlNetModel "
                           f"(missing {len(missing)}, unexpected {len(unexpected)})")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    controlnet.to(DTYPES[dtype]).save_pretrained(tmp, safe_serialization=True)
    (tmp / "latentforge_export.json").write_text(json.dumps(
        {"checkpoint": str(checkpoint), "step": state["step"], "ema": use_ema, "dtype": dtype, "base": base, **pins,
         "controlnet": True, "pipeline": CONTROLNET_PIPELINES[config.model.family],
         "conditioning": state.get("cache_conditioning")}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def export_cascade_controlnet(checkpoint: Path, out: Path, state: dict[str, Any], *, use_ema: bool = False,
                              dtype: str = "fp16") -> Path:
    """Write the trained (or EMA) Stage C ControlNet of `checkpoint` to `out` (`save_cascade_controlnet`).

    The architecture is read back from the weights (`controlnet_from_state`) with the run's blocks and
    backbone; the EMA holds the parameters only, so BatchNorm statistics (frozen in training) come from
    the checkpoint's module state."""
    from .cascade_controlnet import KIND_FILTER, controlnet_from_state, save_cascade_controlnet
    from .cascade_controlnet_adapter import read_backbone

    config = Config.model_validate(state["config"])
    cn = config.train.controlnet
    prefix = len(CONTROLNET_PREFIX)
    weights = {k[prefix:]: v for k, v in trained_state_dict(checkpoint, False).items() if k.startswith(CONTROLNET_PREFIX)}
    if use_ema:
        weights.update({k[prefix:]: v for k, v in trained_state_dict(checkpoint, True).items()
                        if k.startswith(CONTROLNET_PREFIX)})
    blocks = cn.blocks
    if blocks is None and cn.pretrained and Path(cn.pretrained).is_dir():  # continued from an export: its blocks
        blocks = json.loads((Path(cn.pretrained) / "controlnet_config.json").read_text())["proj_blocks"]
    controlnet = controlnet_from_state(weights, str(checkpoint), blocks, read_backbone(cn.backbone_config))
    kind = state.get("cache_conditioning")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    save_cascade_controlnet(controlnet, tmp, DTYPES[dtype], {"conditioning": kind, "filter": KIND_FILTER.get(kind)})
    (tmp / "latentforge_export.json").write_text(json.dumps(
        {"checkpoint": str(checkpoint), "step": state["step"], "ema": use_ema, "dtype": dtype,
         "base": config.model.pretrained, "controlnet": True, "conditioning": kind,
         "loader": "latentforge.train.cascade_controlnet.load_cascade_controlnet"}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
