"""Checks a run makes before it loads a model or writes a byte: one `ConfigError` line naming the key.

`load_config` validates types and bounds; what it cannot see is the machine: whether `model.pretrained`
and `model.vae` name something that can be loaded here. Without this, a typo in a model path surfaces
as a multi-line loader traceback after the process group is up (`OSError: We couldn't connect to
'https://huggingface.co' ...`).
"""

from __future__ import annotations

import os
import re

from .config import Config, ConfigError
from .families import family_facts

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_TRUE = ("1", "true", "yes", "on")


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def model_source_problem(value: str, *, marker: str, revision: str | None = None) -> str | None:
    """Why `value` (a local folder or a hub id) cannot be loaded here, or None if it looks loadable.

    `marker` is the file a hub repo of this kind has at its top (model_index.json for a pipeline,
    config.json for a standalone VAE); it is looked up in the local Hugging Face cache when offline.
    """
    path = os.path.expanduser(value)
    if os.path.isdir(path):
        return None
    if os.path.exists(path):
        return f"{value!r} is a file; expected a diffusers model folder or a hub id (org/name)"
    looks_like_path = value.startswith(("/", "./", "../", "~")) or value.endswith("/") or value.count("/") > 1
    if looks_like_path or not _HUB_ID.match(value):
        return f"folder {value!r} does not exist; expected a diffusers model folder or a hub id (org/name)"
    if _offline():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(value, marker, revision=revision)
        except Exception:  # a malformed id or an unreadable cache: treat as not cached
            cached = None
        if not isinstance(cached, str):
            return (f"{value!r} is neither a local folder nor a hub model in the local Hugging Face cache, "
                    "and HF_HUB_OFFLINE is set (nothing can be downloaded); fix the path or download it first")
    return None


def check_model_paths(config: Config) -> None:
    """Raise `ConfigError` naming `model.pretrained` or `model.vae` when it cannot be loaded here.

    `model.revision` is a revision of the pipeline repo; a separate hub VAE is another repo, loaded at its
    default branch (as the cache job loads it), so that is where it is looked up."""
    checks = [("model.pretrained", config.model.pretrained, "model_index.json", config.model.revision)]
    if config.model.vae:
        checks.append(("model.vae", config.model.vae, family_facts(config.model.family).encoder_marker, None))
    for key, value, marker, revision in checks:
        problem = model_source_problem(value, marker=marker, revision=revision)
        if problem:
            raise ConfigError(f"config error: {key}: {problem}")
