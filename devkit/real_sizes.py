"""The real model configs of every family, shipped as JSON, and their models built without weights.

`real-configs/<family>/` holds each base model's component configs in the diffusers/transformers folder
layout (`model_index.json`, `unet/` or `transformer/`, `vae/`, `text_encoder*/`, `scheduler/`) plus a
`tokenizers.json` of the tokenizer facts the cache depends on. The files are copies of the hub repos'
configs (see `real-configs/README.md` for where each came from), so real sizes can be checked with no
download and no GPU: `build_denoiser(family)` etc. build the full-size model on the meta device (shapes
and dtypes, no memory, no weights) in well under a second per component.

A family folder can be read as a pipeline folder by diffusers' own config loaders too
(`UNet2DConditionModel.load_config(config_folder("sdxl"), subfolder="unet")`), which is how the trainer
reads the scheduler; it holds no weights and no tokenizer files, so it cannot be trained or cached from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

REAL_CONFIGS = Path(__file__).resolve().parent / "real-configs"

# The base model each family's folder describes (revision "main"; see real-configs/README.md).
HUB_IDS: dict[str, str] = {
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "pixart_sigma": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
    "sana": "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
}
# Side of the square images each base model was trained at last, in pixels.
NATIVE_RESOLUTION: dict[str, int] = {"sdxl": 1024, "sd1": 512, "sd2": 768, "pixart_sigma": 1024, "sana": 1024}

# Keys of a config file that record where it came from rather than what the model is.
_BOOKKEEPING = frozenset({"architectures", "model_type", "torch_dtype", "dtype", "transformers_version"})
# diffusers' `from_pretrained` swaps these saved class names for their successors (its own remapping
# table in `model_loading_utils`); `from_config` does not, so we do it here: PixArt-Sigma's hub config
# still says Transformer2DModel.
_REMAPPED_CLASSES: dict[tuple[str, str], str] = {("Transformer2DModel", "ada_norm_single"): "PixArtTransformer2DModel"}


def config_folder(family: str) -> Path:
    """The folder of `family`'s real configs; an unknown family is a one-line error naming the known ones."""
    if family not in HUB_IDS:
        raise ValueError(f"no real configs for family {family!r}; shipped: {', '.join(HUB_IDS)}")
    return REAL_CONFIGS / family


def read_json(family: str, relpath: str) -> dict[str, Any]:
    """One shipped JSON file of `family`, e.g. `read_json("sdxl", "unet/config.json")`."""
    return json.loads((config_folder(family) / relpath).read_text())


def model_index(family: str) -> dict[str, Any]:
    """The family's `model_index.json`: pipeline class and each component's (library, class)."""
    return read_json(family, "model_index.json")


def model_components(family: str) -> dict[str, tuple[str, str]]:
    """Subfolder -> (library, class) of the components that are models with a config here
    (denoiser, VAE, text encoders), in `model_index.json` order."""
    out: dict[str, tuple[str, str]] = {}
    for name, entry in model_index(family).items():
        if isinstance(entry, list) and len(entry) == 2 and entry[0] in ("diffusers", "transformers") \
                and (config_folder(family) / name / "config.json").is_file():
            out[name] = (str(entry[0]), str(entry[1]))
    return out


def denoiser_subfolder(family: str) -> str:
    """"unet" or "transformer": where the trained model lives in the family's pipeline folder."""
    comps = model_components(family)
    for name in ("unet", "transformer"):
        if name in comps:
            return name
    raise ValueError(f"{family}: model_index.json names no unet or transformer")


def text_encoder_subfolders(family: str) -> tuple[str, ...]:
    """The text encoders' subfolders in order: ("text_encoder",) or ("text_encoder", "text_encoder_2")."""
    return tuple(sorted(name for name in model_components(family) if name.startswith("text_encoder")))


def init_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config file's contents as constructor arguments: without `_class_name`, `_diffusers_version`,
    `_name_or_path` and the transformers bookkeeping keys (`architectures`, `model_type`, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in _BOOKKEEPING}


def model_class(family: str, subfolder: str) -> type:
    """The diffusers or transformers class that `model_index.json` names for a component (remapped as
    diffusers' `from_pretrained` would remap it)."""
    import importlib

    library, name = model_components(family)[subfolder]
    if library == "diffusers":
        config = read_json(family, f"{subfolder}/config.json")
        name = _REMAPPED_CLASSES.get((name, str(config.get("norm_type"))), name)
    return getattr(importlib.import_module(library), name)


def build_component(family: str, subfolder: str, device: str | torch.device = "meta",
                    dtype: torch.dtype | None = None) -> torch.nn.Module:
    """One component at its real size from the shipped config, built on `device` (meta: no memory, no
    weights; cpu/cuda: random weights), in eval mode, in float32 or `dtype`.

    The dtype a config file records (`torch_dtype`: what the hub weights were saved in) is not followed:
    some transformers classes would, some would not, and a shape check wants one known dtype."""
    cls = model_class(family, subfolder)
    folder = config_folder(family) / subfolder
    if model_components(family)[subfolder][0] == "diffusers":
        with torch.device(device):
            model = cls.from_config(cls.load_config(folder))  # float32 parameters
        # (diffusers logs a warning on every dtype cast, so only cast when asked to)
        return (model if dtype in (None, torch.float32) else model.to(dtype)).eval()
    from transformers import AutoConfig

    with torch.device(device):
        model = cls(AutoConfig.from_pretrained(folder))
    return model.to(dtype or torch.float32).eval()


def build_denoiser(family: str, device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The family's UNet or DiT at its real size (SDXL 2.57 B parameters, SANA 1.60 B, ...)."""
    return build_component(family, denoiser_subfolder(family), device, dtype)


def build_vae(family: str, device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The family's autoencoder at its real size (KL VAE, or SANA's DC-AE)."""
    return build_component(family, "vae", device, dtype)


def build_text_encoders(family: str, device: str | torch.device = "meta",
                        dtype: torch.dtype | None = None) -> dict[str, torch.nn.Module]:
    """Subfolder -> text encoder at its real size, in order (SDXL has two)."""
    return {sub: build_component(family, sub, device, dtype) for sub in text_encoder_subfolders(family)}


def scheduler_config(family: str) -> dict[str, Any]:
    """The family's `scheduler/scheduler_config.json` (noise schedule, prediction type, flow shift)."""
    return read_json(family, "scheduler/scheduler_config.json")


def tokenizer_facts(family: str) -> dict[str, dict[str, Any]]:
    """Tokenizer subfolder -> the facts the cache depends on (class, vocabulary size, pad token, and the
    pipeline's prompt length where it is not the tokenizer's own `model_max_length`)."""
    return read_json(family, "tokenizers.json")
