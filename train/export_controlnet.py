"""Export of a ControlNet run: a `ControlNetModel` folder for diffusers' ControlNet pipelines.

`StableDiffusionControlNetPipeline.from_pretrained(BASE, controlnet=ControlNetModel.from_pretrained(OUT))`
(SD 1.x / 2.x) and `StableDiffusionXLControlNetPipeline` (SDXL) load it beside the base pipeline the run
trained against, which is unchanged (its UNet was frozen). Written to a temporary folder and renamed.
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
from .controlnet import CONTROLNET_PIPELINES, CONTROLNET_PREFIX, load_controlnet
from .export_base import export_base


def export_controlnet(checkpoint: Path, out: Path, state: dict[str, Any], *, use_ema: bool = False,
                      dtype: str = "fp16", base: str | None = None) -> Path:
    """Write the trained (or EMA) ControlNet of `checkpoint` to `out` as a diffusers `ControlNetModel` folder."""
    config = Config.model_validate(state["config"])
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
