"""The conditioning images of a cache (ControlNet training): which kinds exist and how they are stored.

Part of the cache contract (`cache_format.py` imports it): a cache made with `cache.conditioning.kind`
holds one more per-sample field, `conditioning`, uint8 pixels at the bucket size ("H", "W" in its
shape), cut with the same crop and flip as the latent beside it, and `CacheSpec.conditioning` names the
kind. A cache without it is byte for byte what it was before (same fingerprint, same cache.json).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# `canny`: edges computed by the cache job; `image`: the prepared crop (tile / super-resolution control,
# the trainer degrades it); `inpaint`: the prepared crop (the trainer draws masks); `sidecar`: the user's
# own map shipped beside each image as `<key>.<name>.png`.
CONDITIONING_KINDS = ("canny", "image", "inpaint", "sidecar")
CONDITIONING_FIELD = "conditioning"


def conditioning_channels(kind: str) -> int:
    """Stored channels: Canny edges are one channel (the trainer repeats it to RGB), the rest RGB."""
    if kind not in CONDITIONING_KINDS:
        raise ValueError(f"conditioning kind {kind!r} is not one of {', '.join(CONDITIONING_KINDS)}")
    return 1 if kind == "canny" else 3


def conditioning_settings(section: Mapping[str, Any] | None) -> dict[str, Any]:
    """The `cache.conditioning` settings that change what is stored ({} when off): the kind, plus the
    Canny thresholds (and `canny_resize` when set) for `canny` and the file name part for `sidecar`."""
    kind = (section or {}).get("kind", "none")
    if kind == "none":
        return {}
    extra = {"canny": ("canny_low", "canny_high", "canny_sigma"), "sidecar": ("sidecar",)}.get(kind, ())
    out = {"kind": kind, **{k: section[k] for k in extra}}  # type: ignore[index]
    if kind == "canny" and (section or {}).get("canny_resize") is not None:  # only when set: older caches keep theirs
        out["canny_resize"] = section["canny_resize"]  # type: ignore[index]
    return out
