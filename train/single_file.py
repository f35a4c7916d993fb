"""`latentforge export CKPT --out FILE.safetensors --single-file`: the original (LDM) single-file layout.

ComfyUI and AUTOMATIC1111 load SDXL and SD 1.x models as one `.safetensors` file in the layout of the
original training code (`model.diffusion_model.*` for the UNet, `first_stage_model.*` for the VAE,
`conditioner.embedders.{0,1}.*` / `cond_stage_model.*` for the text encoders). Written here: the UNet
(the trained weights of a checkpoint, or a diffusers pipeline folder's), optionally the VAE and the text
encoders from the base pipeline, all cast to `--dtype` (fp16 by default).

Where the key mapping comes from. diffusers 0.42.1 ships only the original -> diffusers direction
(`diffusers.loaders.single_file_utils`: the `DIFFUSERS_TO_LDM_MAPPING` tables and the `convert_ldm_*`
functions `from_single_file` uses); the diffusers -> original direction exists only as repository scripts
that are not in the wheel: `scripts/convert_diffusers_to_original_sdxl.py` and
`scripts/convert_diffusers_to_original_stable_diffusion.py` (https://github.com/huggingface/diffusers).
This module is a port of those scripts' mapping tables with two changes:

* the fixed tables (SDXL: 3 UNet blocks x 2 layers; VAE: 4 levels x 2/3 resnets) are derived from the
  model's config and keys instead (`input_blocks.{(L+1)*i + j + 1}` for down block i, layer j, with L =
  layers_per_block, exactly the arithmetic diffusers' `convert_ldm_unet_checkpoint` inverts), so the real
  SDXL and SD 1.x models and the tiny test models go through the same code; the top-level names come
  from diffusers' own `DIFFUSERS_TO_LDM_MAPPING`;
* the OpenCLIP `text_projection` is written transposed, as original SDXL checkpoints hold it and as
  diffusers' `convert_open_clip_checkpoint` reads it back.

Every export is checked before it is written: diffusers' own `convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint` and `convert_open_clip_checkpoint` must turn
the file's state dict back into exactly the diffusers keys and tensors it came from.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from latentforge.shared.config import ConfigError

from .checkpoint_weights import DTYPES, read_trainer_state, trained_state_dict
from .export_base import export_base, local_pipeline_folder
from .families import adapter_for

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# family -> (prefix of the CLIP ViT-L text encoder, prefix of the OpenCLIP bigG encoder or None)
TEXT_PREFIXES = {
    "sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
    "sd1": ("cond_stage_model.transformer.", None),
}
ARCHITECTURES = {"sdxl": "stable-diffusion-xl-v1-base", "sd1": "stable-diffusion-v1"}

# ResNet sub-modules, (diffusers, original): the same pairs as the scripts' `unet_conversion_map_resnet`.
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
# VAE mid-block attention, (diffusers, original): the scripts' `vae_conversion_map_attn`.
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# OpenCLIP transformer layers, (diffusers, original): the scripts' `textenc_conversion_lst`.
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


class SingleFileError(ConfigError):
    """The model cannot be written in the original single-file layout (unsupported family or module).

    A `ConfigError`, so the command reports it in one line and exits 2."""


# ---- key mapping: diffusers -> original ------------------------------------------------------------------
def _split(rest: str) -> tuple[str, str]:
    head, _, tail = rest.partition(".")
    return head, tail


def _unet_top_level(config: Mapping[str, Any]) -> dict[str, str]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    tables = DIFFUSERS_TO_LDM_MAPPING["unet"]
    top = dict(tables["layers"])
    if config.get("addition_embed_type") == "text_time":
        top.update(tables["addition_embed_type"])
    if config.get("class_embed_type") in ("timestep", "projection"):
        top.update(tables["class_embed_type"])
    return top


def unet_to_original(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers `UNet2DConditionModel` state dict in the original layout (without `model.diffusion_model.`)."""
    per_block = config.get("layers_per_block", 2)
    if not isinstance(per_block, int):
        raise SingleFileError(f"layers_per_block {per_block}: the original layout needs one value for every block")
    n = per_block + 1  # original blocks per diffusers block: the layers plus a down/upsampler slot
    top = _unet_top_level(config)
    up_has_attention = {int(k.split(".")[1]) for k in state if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            index = n * i + j + (1 if side == "down" else 0)
            head = f"{'input' if side == 'down' else 'output'}_blocks.{index}"
            if kind == "resnets":
                sub, tail = _split(rest)
                new = f"{head}.0.{_UNET_RESNET.get(sub, sub)}.{tail}"
            else:
                new = f"{head}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{n * (int(m.group(1)) + 1)}.0.op.{m.group(2)}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            i = int(m.group(1))
            # After the resnet (.0) and, in blocks with attention, the transformer (.1).
            new = f"output_blocks.{n * i + per_block}.{2 if i in up_has_attention else 1}.{m.group(2)}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            sub, tail = _split(m.group(2))
            new = f"middle_block.{2 * int(m.group(1))}.{_UNET_RESNET.get(sub, sub)}.{tail}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m.group(1)}"
        else:
            raise SingleFileError(f"UNet weight {key} has no counterpart in the original layout")
        out[new] = value
    return out


def vae_to_original(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers `AutoencoderKL` state dict in the original layout (without `first_stage_model.`)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    levels = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
            new = f"encoder.down.{m.group(1)}.downsample.{m.group(2)}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            # Up blocks are numbered from the bottom in the original code, from the top in diffusers.
            new = (f"decoder.up.{levels - 1 - int(m.group(1))}.block.{m.group(2)}."
                   f"{m.group(3).replace('conv_shortcut', 'nin_shortcut')}")
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            new = f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.{m.group(2)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", key):
            name = _VAE_ATTN[m.group(2)]
            new = f"{m.group(1)}.mid.attn_1.{name}.{m.group(3)}"
            if m.group(3) == "weight" and name != "norm" and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)  # the original attention uses 1x1 convolutions
        else:
            raise SingleFileError(f"VAE weight {key} has no counterpart in the original layout")
        out[new] = value
    return out


def clip_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI CLIP (ViT-L) keeps the transformers names; transformers >= 5.6 dropped the `text_model.` level of
    `CLIPTextModel`, which the original layout (and diffusers' reader) still has."""
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        out[key if key.startswith("text_model.") else f"text_model.{key}"] = value
    return out


def open_clip_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers `CLIPTextModelWithProjection` -> OpenCLIP names: q/k/v fused into `in_proj_*`, the
    projection transposed."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in top:
            out[top[key]] = value.T.contiguous() if key == "text_projection.weight" else value
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if not m:
            raise SingleFileError(f"text encoder 2 weight {key} has no counterpart in the OpenCLIP layout")
        layer, module, kind = m.groups()
        if qm := re.fullmatch(r"self_attn\.([qkv])_proj", module):
            qkv.setdefault((layer, kind), {})[qm.group(1)] = value
            continue
        if module not in _OPENCLIP_LAYER:
            raise SingleFileError(f"text encoder 2 weight {key} has no counterpart in the OpenCLIP layout")
        out[f"transformer.resblocks.{layer}.{_OPENCLIP_LAYER[module]}.{kind}"] = value
    for (layer, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise SingleFileError(f"text encoder 2 layer {layer}: q, k and v projections must all be present")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# ---- assembling, checking, writing -----------------------------------------------------------------------
def pipeline_family(folder: str | Path) -> str:
    """`sdxl` or `sd1` from a diffusers pipeline folder (SD 2.x's OpenCLIP-H layout is not supported)."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder}: no model_index.json; a single-file export needs a local diffusers "
                                "pipeline folder (pass --base)")
    cls = json.loads(index.read_text()).get("_class_name", "")
    if cls == "StableDiffusionXLPipeline":
        return "sdxl"
    if cls == "StableDiffusionPipeline":
        unet = json.loads((folder / "unet" / "config.json").read_text())
        if unet.get("cross_attention_dim") == 1024:
            raise SingleFileError(f"{folder}: Stable Diffusion 2.x; single-file export supports SDXL and SD 1.x")
        return "sd1"
    raise SingleFileError(f"{folder}: {cls or 'unknown pipeline'}; single-file export supports SDXL and SD 1.x")


def _load(folder: Path, subfolder: str, cls_name: str, why: str, variant: str | None = None) -> Any:
    if not (folder / subfolder).is_dir():
        raise FileNotFoundError(f"{folder} has no {subfolder}/ for {why}; pass --base with a full pipeline folder")
    import diffusers
    import transformers

    cls = getattr(diffusers, cls_name, None) or getattr(transformers, cls_name)
    return cls.from_pretrained(folder, subfolder=subfolder, dtype=torch.float32, **({"variant": variant} if variant else {}))


def assemble(family: str, unet_state: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any], *,
             vae: tuple[Mapping[str, torch.Tensor], Mapping[str, Any]] | None = None,
             text_encoders: tuple[Mapping[str, torch.Tensor], ...] | None = None,
             text_hidden_size_2: int | None = None) -> dict[str, torch.Tensor]:
    """The single-file state dict from diffusers/transformers state dicts, checked against diffusers' reader.

    `vae` is (state, config); `text_encoders` the CLIP state (and, for SDXL, the OpenCLIP one).
    """
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    if family not in TEXT_PREFIXES:
        raise SingleFileError(f"family {family}: single-file export supports {', '.join(TEXT_PREFIXES)}")
    unet_config = dict(unet_config)
    # (prefix, original-layout part, the diffusers state it came from, diffusers' converter back)
    parts: list[tuple[str, dict[str, torch.Tensor], Mapping[str, torch.Tensor], Any]] = [
        (UNET_PREFIX, unet_to_original(unet_state, unet_config), unet_state,
         lambda sd: convert_ldm_unet_checkpoint(sd, unet_config))]
    if vae is not None:
        vae_state, vae_config = vae[0], dict(vae[1])
        parts.append((VAE_PREFIX, vae_to_original(vae_state, vae_config), vae_state,
                      lambda sd: convert_ldm_vae_checkpoint(sd, vae_config)))
    if text_encoders:
        clip_prefix, open_clip_prefix = TEXT_PREFIXES[family]
        te = clip_to_original(text_encoders[0])
        parts.append((clip_prefix, te, te, convert_ldm_clip_checkpoint))
        if open_clip_prefix:
            if len(text_encoders) != 2:
                raise SingleFileError(f"family {family} has two text encoders")
            te2 = {k: v for k, v in text_encoders[1].items() if not k.endswith("position_ids")}
            # diffusers' reader needs the width only when the projection is missing (it never is here).
            stub = SimpleNamespace(config=SimpleNamespace(hidden_size=text_hidden_size_2))
            parts.append((open_clip_prefix, open_clip_to_original(te2), te2,
                          lambda sd: convert_open_clip_checkpoint(stub, sd, prefix=open_clip_prefix)))
    full: dict[str, torch.Tensor] = {}
    for prefix, part, _, _ in parts:
        full.update({prefix + k: v for k, v in part.items()})
    for prefix, _, source, back in parts:
        _check_round_trip(prefix, source, back(full))
    return full


def original_state_dict(pipeline: str | Path, *, unet_state: Mapping[str, torch.Tensor] | None = None,
                        with_vae: bool = False, with_text_encoders: bool = False,
                        variant: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(the single-file state dict at the models' own precision, family) from a diffusers pipeline folder.

    `unet_state` replaces the pipeline's UNet weights (the trained ones); other parts come from `pipeline`
    (its `variant` weight files when given).
    """
    from diffusers import UNet2DConditionModel

    folder = Path(pipeline)
    family = pipeline_family(folder)
    unet_config = UNet2DConditionModel.load_config(folder, subfolder="unet")
    if unet_state is None:
        unet_state = _load(folder, "unet", "UNet2DConditionModel", "the UNet", variant).state_dict()
    vae = None
    if with_vae:
        vae_model = _load(folder, "vae", "AutoencoderKL", "--with-vae", variant)
        vae = (vae_model.state_dict(), vae_model.config)
    text_encoders, width_2 = None, None
    if with_text_encoders:
        text_encoders = (_load(folder, "text_encoder", "CLIPTextModel", "--with-text-encoders", variant).state_dict(),)
        if TEXT_PREFIXES[family][1]:
            te2 = _load(folder, "text_encoder_2", "CLIPTextModelWithProjection", "--with-text-encoders",
                        variant)
            text_encoders, width_2 = (*text_encoders, te2.state_dict()), te2.config.hidden_size
    return assemble(family, unet_state, unet_config, vae=vae, text_encoders=text_encoders,
                    text_hidden_size_2=width_2), family


def _check_round_trip(prefix: str, source: Mapping[str, torch.Tensor], back: Mapping[str, torch.Tensor]) -> None:
    """diffusers' reader must give back exactly the keys and values the part was made from."""
    missing, extra = sorted(set(source) - set(back)), sorted(set(back) - set(source))
    if missing or extra:
        raise SingleFileError(f"{prefix}*: diffusers would not read this back: {len(missing)} weights lost "
                              f"({', '.join(missing[:3])}), {len(extra)} unexpected ({', '.join(extra[:3])})")
    for key, value in source.items():
        other = back[key]
        if other.shape != value.shape or (value.device.type != "meta" and not torch.equal(other, value)):
            raise SingleFileError(f"{prefix}*: {key} does not survive the round trip through diffusers' reader")


def write_single_file(state: Mapping[str, torch.Tensor], out: Path, dtype: str,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Cast to `dtype` and write atomically (temporary file beside `out`, then rename)."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    cast = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items()}
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(cast, str(tmp), metadata=dict(metadata or {}))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def export_single_file(pipeline: str | Path, out: str | Path, *, unet_state: Mapping[str, torch.Tensor] | None = None,
                       with_vae: bool = False, with_text_encoders: bool = False, dtype: str = "fp16",
                       info: Mapping[str, Any] | None = None, variant: str | None = None) -> Path:
    """Write `out` (.safetensors) from a diffusers pipeline folder, optionally with trained UNet weights."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise SingleFileError(f"--out {out}: a single-file export is one .safetensors file")
    state, family = original_state_dict(pipeline, unet_state=unet_state, with_vae=with_vae,
                                        with_text_encoders=with_text_encoders, variant=variant)
    components = ["unet"] + (["vae"] if with_vae else []) + (["text_encoders"] if with_text_encoders else [])
    metadata = {"format": "pt", "latentforge.family": family, "latentforge.components": ",".join(components),
                "latentforge.export": json.dumps({"source": str(pipeline), "dtype": dtype, **(info or {})})}
    if with_vae and with_text_encoders:  # a complete checkpoint: say what it is the way model hubs read it
        metadata.update({"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": ARCHITECTURES[family],
                         "modelspec.title": out.stem})
    return write_single_file(state, out, dtype, metadata)


def export_checkpoint_single_file(checkpoint: Path, out: str | Path, *, use_ema: bool = False, dtype: str = "fp16",
                                  base: str | None = None, with_vae: bool = False,
                                  with_text_encoders: bool = False) -> Path:
    """A training checkpoint's UNet (trained or EMA) as a single file; VAE/text encoders from the base pipeline."""
    state = read_trainer_state(checkpoint)
    model_cfg = state["config"]["model"]
    base, pins = export_base(model_cfg, base)
    adapter = adapter_for(model_cfg["family"])
    if adapter.model_class != "UNet2DConditionModel":
        raise SingleFileError(f"{adapter.model_class}: single-file export supports the SDXL and SD 1.x UNets")
    parts = ("unet",) + (("vae",) if with_vae else ()) + (("text_encoder", "text_encoder_2") if with_text_encoders else ())
    folder = local_pipeline_folder(base, pins, parts)
    import diffusers

    model_cls = getattr(diffusers, adapter.model_class)
    with torch.device("meta"):
        expected = set(model_cls.from_config(model_cls.load_config(folder, subfolder=adapter.model_subfolder)).state_dict())
    weights = trained_state_dict(checkpoint, use_ema)
    missing, unexpected = expected - set(weights), set(weights) - expected
    if unexpected or (missing and not use_ema):
        raise RuntimeError(f"{checkpoint}: weights do not fit {adapter.model_class} of {base} "
                           f"(missing {len(missing)}, unexpected {len(unexpected)})")
    if missing:  # an EMA of the trainable subset: the frozen rest comes from the base model
        base_state = model_cls.from_pretrained(folder, subfolder=adapter.model_subfolder,
                                               **({"variant": pins["variant"]} if "variant" in pins else {})).state_dict()
        weights = {**{k: base_state[k] for k in missing}, **weights}
    info = {"checkpoint": str(checkpoint), "step": state["step"], "ema": use_ema, "base": base, **pins}
    return export_single_file(folder, out, unet_state=weights, with_vae=with_vae,
                              with_text_encoders=with_text_encoders, dtype=dtype, info=info,
                              variant=pins.get("variant"))
