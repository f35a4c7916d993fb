"""What a cache's fingerprint is made of: the model identity (per encoder part, the sha256 of each file of
a local folder, or a hub id at a commit), the `cache.*`, `buckets.*` and `upscale.*` settings that change
what is cached, and the stable hash of it all. `cache.json` records both the inputs and the hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .conditioning_format import conditioning_settings

if TYPE_CHECKING:
    from .cache_format import CacheSpec

# Names in `fingerprint_inputs[FP_MODEL]`: per encoder part, the sha256 of each file of a local folder or the hub id.
FP_MODEL = "model"
MODEL_TEXT, MODEL_VAE = "text", "vae"
MODEL_FILES, MODEL_HUB_ID, MODEL_REVISION, MODEL_VARIANT, MODEL_COMMIT = "files", "hub_id", "revision", "variant", "commit"
LOCATION_PRETRAINED, LOCATION_VAE, LOCATION_PATH = "pretrained", "vae", "path"  # `CacheSpec.model_location` names
# `cache.*` settings that change what is cached; `upscale.*` weight paths, counted by content, not path.
FINGERPRINT_CACHE_SETTINGS = ("latent_mode", "store_dtype", "vae_dtype", "text_dtype", "clip_skip", "max_tokens",
                              "flip", "max_pixels", "missing_caption", "deterministic")
UPSCALE_WEIGHT_SETTINGS = ("model_path", "face_model_path")


def hub_model_part(hub_id: str, revision: str, variant: str | None, commit: str | None = None) -> dict[str, Any]:
    """Identity of a hub encoder part: id, configured revision, the commit it resolved to, weight variant."""
    return {MODEL_HUB_ID: hub_id, MODEL_REVISION: revision, MODEL_COMMIT: commit, MODEL_VARIANT: variant}


def files_model_part(files: Mapping[str, str]) -> dict[str, Any]:
    """Identity of an encoder part in a local folder: relative file name -> sha256."""
    return {MODEL_FILES: dict(files)}


def model_identity_doc(text: Mapping[str, Any], vae: Mapping[str, Any]) -> dict[str, Any]:
    """`fingerprint_inputs[FP_MODEL]` from the text-encoder and VAE parts."""
    return {MODEL_TEXT: dict(text), MODEL_VAE: dict(vae)}


def recorded_model_parts(spec: CacheSpec) -> dict[str, Mapping[str, Any]]:
    """The encoder parts a cache records (`MODEL_TEXT`, `MODEL_VAE` -> part); missing or odd ones left out."""
    ident = spec.fingerprint_inputs.get(FP_MODEL) if isinstance(spec.fingerprint_inputs, Mapping) else None
    if not isinstance(ident, Mapping):
        return {}
    return {k: ident[k] for k in (MODEL_TEXT, MODEL_VAE) if isinstance(ident.get(k), Mapping)}


def fingerprint_inputs(*, pipeline_version: int, family: str, model: Mapping[str, Any], cache: Mapping[str, Any],
                       buckets: Mapping[str, Any], upscale: Mapping[str, Any],
                       upscale_weights: Mapping[str, str | None]) -> dict[str, Any]:
    """What changes what is cached, from plain values: `cache`, `buckets`, `upscale` are config sections as
    dicts (only `FINGERPRINT_CACHE_SETTINGS` of `cache` count), `model` is `model_identity_doc(...)`,
    `upscale_weights` the sha256 (or None) of the file each of `UPSCALE_WEIGHT_SETTINGS` names."""
    up = {k: v for k, v in upscale.items() if k not in UPSCALE_WEIGHT_SETTINGS}
    up.update({k.replace("_path", "_sha256"): upscale_weights.get(k) for k in UPSCALE_WEIGHT_SETTINGS})
    cached = {k: cache[k] for k in FINGERPRINT_CACHE_SETTINGS}
    control = conditioning_settings(cache.get("conditioning"))
    if control:  # only when on: a cache without control images keeps the fingerprint it always had
        cached["conditioning"] = control
    return {"pipeline_version": pipeline_version, "family": family, FP_MODEL: dict(model),
            "cache": cached | _variants(cache), "buckets": dict(buckets), "upscale": up}


def _variants(cache: Mapping[str, Any]) -> dict[str, Any]:
    # Caption variants add fields, so they count; only when on, so caches made before them keep their fingerprint.
    n = int(cache.get("caption_variants", 1) or 1)
    return {"caption_variants": n} if n > 1 else {}


def compute_fingerprint(inputs: Mapping[str, Any]) -> str:
    """Stable hash of `fingerprint_inputs`: keys sorted, values serialised canonically, so dict order never
    changes the fingerprint."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
