"""Which VAE decodes the grids of `latentforge inspect`, loading it, and decoding cached latents.

The VAE must be the one the cache was made with, or the grids show something else than what was cached.
In order of preference:

* `--model`: a pipeline or VAE folder (or a hub id) the user names; its weight hashes are compared with
  the cache's fingerprint and a mismatch is a warning (the user asked for that model);
* a hub model the fingerprint records: the hub id at the recorded commit (what the cache job loaded);
* the local folder cache.json records as a location hint (`CacheSpec.model_location`): used only when
  its VAE files have the sha256 the fingerprint records. A folder that is gone, or holds other weights,
  is a one-line `InspectError` asking for `--model`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentforge.shared.cache_fingerprint import (
    LOCATION_PATH,
    MODEL_COMMIT,
    MODEL_FILES,
    MODEL_HUB_ID,
    MODEL_REVISION,
    MODEL_TEXT,
    MODEL_VAE,
    recorded_model_parts,
)
from latentforge.shared.model_check import WEIGHT_SUFFIXES, differing_files, recorded_vae_location

_ASK = "pass --model MODEL_FOLDER (or --per-bucket 0 for no grids)"


class InspectError(RuntimeError):
    """A usage problem the command reports in one line (exit 2)."""


@dataclass(frozen=True)
class VaeChoice:
    """Where to load the grids' VAE from: a folder or hub id, its subfolder, a hub revision, and the notes
    the command prints about the choice."""

    source: str
    subfolder: str | None
    revision: str | None = None
    notes: tuple[str, ...] = ()


def resolve_vae(spec: Any, model: str | None) -> VaeChoice:
    """The VAE that decodes the grids of the cache `spec` describes (`--model` when given).

    Raises `InspectError` (one line) when no VAE the cache was made with can be found: no --model, and
    cache.json records its model only by weight hashes, or the folder it records is gone or changed.
    """
    if model is not None:
        return _explicit_model(spec, model)
    vae_part = recorded_model_parts(spec).get(MODEL_VAE, {})
    if MODEL_HUB_ID in vae_part:
        return _hub_vae(spec, vae_part)
    hint = recorded_vae_location(spec)
    if hint is None or LOCATION_PATH not in hint[0]:
        raise InspectError("cache.json records its model only by weight hashes (it was made from a local folder, "
                           f"and records no location), so the VAE that decodes the grids is unknown: {_ASK}")
    location, separate = hint
    folder = Path(str(location[LOCATION_PATH]))
    base = folder if separate else folder / "vae"
    if not base.is_dir():
        raise InspectError(f"the model folder this cache was made from, {folder}, is gone (or has no "
                           f"{'VAE' if separate else 'vae/'} folder): {_ASK}")
    # The location is only a hint: whatever is there now must be the VAE the fingerprint records.
    differ = differing_files(vae_part, base, "" if separate else "vae/")
    if differ:
        more = f" and {len(differ) - 1} more" if len(differ) > 1 else ""
        raise InspectError(f"the VAE in {folder} is not the one this cache was made with (sha256 of "
                           f"{differ[0]}{more} differs from the fingerprint's): {_ASK}")
    return VaeChoice(str(folder), None if separate else "vae",
                     notes=(f"VAE from {folder}, the folder the cache was made from; "
                            "VAE weights match the cache's fingerprint",))


def _hub_vae(spec: Any, part: Mapping[str, Any]) -> VaeChoice:
    """A hub VAE the fingerprint records, at the commit the cache job loaded (its revision if older)."""
    hub_id = str(part[MODEL_HUB_ID])
    revision = part.get(MODEL_COMMIT) or part.get(MODEL_REVISION)
    hint = recorded_vae_location(spec)
    if hint is not None:
        separate = hint[1]
    else:  # older caches: a separate VAE is another repo than the text encoders'
        separate = recorded_model_parts(spec).get(MODEL_TEXT, {}).get(MODEL_HUB_ID) != hub_id
    at = f"@{revision[:12] if part.get(MODEL_COMMIT) else revision}" if revision else ""
    return VaeChoice(hub_id, None if separate else "vae", revision or None,
                     notes=(f"VAE from the cache's model {hub_id}{at}",))


def _explicit_model(spec: Any, model: str) -> VaeChoice:
    """`--model`: a pipeline folder (its `vae/`), a VAE folder, or else a hub id."""
    p = Path(model)
    if (p / "vae" / "config.json").is_file():
        folder, sub = p / "vae", "vae"
    elif (p / "config.json").is_file():
        folder, sub = p, None
    elif p.exists():
        raise InspectError(f"--model {model}: neither vae/config.json nor config.json there; "
                           "pass a diffusers pipeline folder or a VAE folder")
    else:
        return VaeChoice(model, "vae", notes=(f"VAE from {model} (not a local folder: treated as a hub id)",))
    vae_part = recorded_model_parts(spec).get(MODEL_VAE, {})
    notes: tuple[str, ...] = ()
    if _has_weights(vae_part):  # a hub model is recorded by id: nothing to compare
        notes = ((f"warning: the VAE in {model} is not the one this cache was made with (weight hashes differ); "
                  "the grids may not show what was cached",) if differing_files(vae_part, folder, "vae/")
                 else ("VAE weights match the cache's fingerprint",))
    return VaeChoice(str(p), sub, notes=notes)


def _has_weights(part: Mapping[str, Any]) -> bool:
    files = part.get(MODEL_FILES)
    return isinstance(files, Mapping) and any(str(n).endswith(WEIGHT_SUFFIXES) for n in files)


def load_vae(choice: VaeChoice, family: str) -> Any:
    """The VAE `choice` names, in float32 and eval mode; its class from its config.json when local."""
    import diffusers
    import torch

    from latentforge.shared.families import family_facts

    cls_name = family_facts(family).vae_class
    if not hasattr(diffusers, cls_name):  # Stable Cascade's EfficientNet encoder has no decoder of its own
        raise InspectError(f"family {family}: its latents ({cls_name}) decode only through Stage B and A; "
                           "pass --per-bucket 0 to summarise the cache without decoded grids")
    config = Path(choice.source) / (choice.subfolder or "") / "config.json"
    if config.is_file():
        cls_name = json.loads(config.read_text()).get("_class_name", cls_name)
    kwargs = {"revision": choice.revision} if choice.revision else {}
    try:
        vae = getattr(diffusers, cls_name).from_pretrained(choice.source, subfolder=choice.subfolder,
                                                           dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        raise InspectError(f"could not load the VAE from {choice.source} ({exc.__class__.__name__}: "
                           f"{str(exc).splitlines()[0][:160]}); pass --model MODEL_FOLDER") from None
    return vae.eval()


def decode_latents(vae: Any, latents: Any) -> Any:
    """Native-space latents (N, C, h, w) -> uint8 images (N, H, W, 3). The cache stores latents unscaled."""
    import torch

    with torch.no_grad():
        images = vae.decode(latents.to(torch.float32)).sample
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
