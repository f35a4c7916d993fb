"""The model a cache was made with: where it was loaded from, and whether another model holds its weights.

`CacheReader.check_compatible` compares shapes (family, latent channels, text widths); two VAEs or text
encoders of the same widths pass it. This compares the weights themselves: the sha256 of each weight
file the cache's model identity records (`cache_fingerprint.recorded_model_parts`) against the same file in
the training model's folder.

`cache.json` also records where the model was loaded from (`CacheSpec.model_location`: a folder's absolute
path, or a hub id with the commit its revision resolved to). That is a hint for tools, never part of the
fingerprint: a moved folder keeps its cache valid, and whoever follows the hint checks the weight hashes
(`differing_files`) before trusting what is there now.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .cache_fingerprint import (
    LOCATION_PATH,
    LOCATION_PRETRAINED,
    LOCATION_VAE,
    MODEL_COMMIT,
    MODEL_FILES,
    MODEL_HUB_ID,
    MODEL_REVISION,
    MODEL_TEXT,
    MODEL_VAE,
    recorded_model_parts,
)
from .cache_format import CacheMismatchError, CacheSpec, describe_mismatch
from .families import FAMILY_FACTS
from .file_hash import sha256_file
from .hub_revision import DEFAULT_REVISION, PIPELINE_MARKER, VAE_MARKER, resolve_commit

WEIGHT_SUFFIXES = (".safetensors", ".bin")


# ---- the location hint ----------------------------------------------------------------------------------
def folder_location(path: str) -> dict[str, Any]:
    """Location of a model loaded from a local folder: its absolute path."""
    return {LOCATION_PATH: os.path.abspath(path)}


def hub_location(hub_id: str, revision: str, commit: str) -> dict[str, Any]:
    """Location of a model loaded from the hub: id, configured revision and the commit it resolved to."""
    return {MODEL_HUB_ID: hub_id, MODEL_REVISION: revision, MODEL_COMMIT: commit}


def model_location_doc(pretrained: Mapping[str, Any], vae: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`CacheSpec.model_location`: where the pipeline was loaded from, and a separate VAE (None: none)."""
    return {LOCATION_PRETRAINED: dict(pretrained), LOCATION_VAE: None if vae is None else dict(vae)}


def recorded_vae_location(spec: CacheSpec) -> tuple[Mapping[str, Any], bool] | None:
    """(location, separate) of the VAE a cache was made with, None when cache.json records none (older
    caches). `separate`: a separate VAE (the location is the VAE itself), else the pipeline's `vae/`."""
    loc = spec.model_location if isinstance(spec.model_location, Mapping) else {}
    vae, pipe = loc.get(LOCATION_VAE), loc.get(LOCATION_PRETRAINED)
    if isinstance(vae, Mapping) and vae:
        return vae, True
    if isinstance(pipe, Mapping) and pipe:
        return pipe, False
    return None


# ---- weight hashes ---------------------------------------------------------------------------------------
def differing_files(recorded: Mapping[str, Any], base: Path, strip: str = "", *, weights_only: bool = True,
                    missing_differs: bool = True) -> list[str]:
    """The files a recorded local-folder part (`{MODEL_FILES: {name: sha256}}`) lists whose copy under
    `base` (names with `strip` removed) has another sha256, or is missing when `missing_differs`. Only
    weight files (`WEIGHT_SUFFIXES`) unless `weights_only` is False. Empty when nothing differs."""
    files = recorded.get(MODEL_FILES)
    if not isinstance(files, Mapping):
        return []
    out = []
    for name, digest in sorted(files.items()):
        rel = name[len(strip):] if strip and name.startswith(strip) else name
        if weights_only and not rel.endswith(WEIGHT_SUFFIXES):
            continue
        local = base / rel
        if not local.is_file():
            if missing_differs:
                out.append(name)
            continue
        if sha256_file(local) != digest:
            out.append(name)
    return out


def check_model_files(spec: CacheSpec, cache_url: str, pretrained: str, vae: str | None = None,
                      revision: str | None = None) -> None:
    """Raise `CacheMismatchError` (one line) when `pretrained` (and `vae`, a separate VAE) hold encoder
    weights other than those the cache at `cache_url` was made with. Local folders: compares sha256 of the
    weight files (`*.safetensors`, `*.bin`) both sides have: the folder's `vae/` (or `vae`) and
    `text_encoder*/`; what one side lacks (a training folder without text encoders) is not compared. Hub
    ids: the id, and the commit `revision` (the pipeline's; a separate VAE repo is taken at its default
    branch) resolves to now against the commit the cache recorded, so a branch that moved since the cache
    was made is caught (the error names the commit to pin)."""
    parts = recorded_model_parts(spec)
    if MODEL_VAE in parts:
        source = vae or pretrained
        # The cache names a pipeline's VAE files "vae/<file>" (Stable Cascade's encoder: "effnet/<file>") and a
        # separate VAE's "<file>".
        facts = FAMILY_FACTS.get(spec.family)
        sub = facts.encoder_subfolder if facts else "vae"
        base = Path(source) if vae else Path(pretrained) / sub
        marker = facts.encoder_marker if facts else VAE_MARKER
        pin = (DEFAULT_REVISION, marker) if vae else (revision or DEFAULT_REVISION, PIPELINE_MARKER)
        _compare_part("VAE", parts[MODEL_VAE], source, pin, base, f"{sub}/", cache_url)
    if MODEL_TEXT in parts:
        pin = (revision or DEFAULT_REVISION, PIPELINE_MARKER)
        _compare_part("text encoder", parts[MODEL_TEXT], pretrained, pin, Path(pretrained), "", cache_url)


def _compare_part(what: str, recorded: Mapping[str, Any], source: str, pin: tuple[str, str], base: Path, strip: str,
                  cache_url: str) -> None:
    """`pin`: (revision, marker file) a hub `source` is resolved with."""
    if MODEL_HUB_ID in recorded:
        if os.path.isdir(source):
            return  # a local copy of the hub model: nothing recorded to compare it with
        if recorded[MODEL_HUB_ID] != source:
            raise describe_mismatch(f"{what} (hub id)", recorded[MODEL_HUB_ID], source, cache_url)
        made_at = recorded.get(MODEL_COMMIT)
        if isinstance(made_at, str):
            rev, marker = pin
            now = resolve_commit(source, rev, marker, "model.revision")
            if now != made_at:
                raise CacheMismatchError(
                    f"cache {cache_url} does not fit the model: {what} of {source} was cached at commit {made_at} "
                    f"(revision {recorded.get(MODEL_REVISION)!r}), but revision {rev!r} now names {now}; set "
                    f"model.revision={made_at} to train on the weights the cache was made with, or re-run the "
                    "cache job")
        return
    if not base.is_dir():
        return
    # A file the training folder lacks is not compared (a UNet-only folder trains from a full cache).
    differ = differing_files(recorded, base, strip, missing_differs=False)
    if differ:
        name = differ[0]
        local = base / (name[len(strip):] if strip and name.startswith(strip) else name)
        raise describe_mismatch(f"{what} weights {name} (sha256)", str(recorded[MODEL_FILES][name])[:16],
                                f"{sha256_file(local)[:16]} in {local}", cache_url)
