"""The base pipeline an export takes its other components from, at the run's revision and variant.

An export rebuilds a pipeline around the trained denoiser: the VAE, text encoders, tokenizers and
scheduler come from a base. By default that is the run's own `model.pretrained`, loaded at the run's
`model.revision` and `model.variant` (the same weights the run trained against); `--base` names another
pipeline, loaded at its default branch without a variant.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from latentforge.shared.config_schema import ModelConfig


def export_base(model_cfg: Mapping[str, Any], base: str | None) -> tuple[str, dict[str, str]]:
    """(base pipeline, the `revision` / `variant` keyword arguments to load it with)."""
    if base:
        return base, {}
    model = ModelConfig.model_validate(dict(model_cfg))
    return model.pretrained, model.pins()


def local_pipeline_folder(base: str, pins: Mapping[str, str], subfolders: tuple[str, ...]) -> str:
    """A local folder holding `base`: the folder itself, or for a hub id the hub client's snapshot at
    `pins["revision"]` with `model_index.json`, the configs and the weight files of `subfolders` only
    (offline: what the local cache holds). Single-file export reads files, so it needs a folder."""
    if os.path.isdir(base):
        return base
    from huggingface_hub import snapshot_download

    suffix = f".{pins['variant']}" if pins.get("variant") else ""
    patterns = ["model_index.json", "*/config.json", "*/*.txt", "*/*.json"]
    patterns += [f"{sub}/*{suffix}.safetensors" for sub in subfolders]
    return snapshot_download(base, revision=pins.get("revision"), allow_patterns=patterns)
