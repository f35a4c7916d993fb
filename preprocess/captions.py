"""Caption variety without a text encoder in the training loop: several captions per image, chosen at cache time.

With `cache.caption_variants: N` > 1 every cached sample holds N encoded captions: variant 0 is the caption
as before (`prompt_embeds`, what validation and inspect read), variants 1..N-1 go to the `*_alt` fields and
the trainer picks one of the N per sample and step from its seeded generator. The variants of a sample are,
in order: its caption, the non-empty values of the source's `extra_caption_fields` (json metadata keys,
e.g. a long caption and a tag list), then, with `tag_shuffle`, its comma-separated tags shuffled after the
first `keep_tokens` (kohya's keep_tokens), seeded by the sample key and variant number; when that still
makes fewer than N distinct captions they repeat in order, so every sample has exactly N.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from typing import Any

from latentforge.shared.config import SourceConfig


def shuffle_tags(caption: str, keep_tokens: int, key: str, variant: int) -> str:
    """The caption's comma-separated tags with all but the first `keep_tokens` shuffled (seeded by key, variant)."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    seed = int.from_bytes(hashlib.blake2b(f"{key}\0{variant}".encode(), digest_size=8).digest(), "little")
    random.Random(seed).shuffle(tail)
    return ", ".join(head + tail)


def caption_variants(caption: str, metadata: Mapping[str, Any], source: SourceConfig, n: int, key: str) -> tuple[str, ...]:
    """Exactly `n` captions for one sample (see the module docstring); the first is `caption` itself."""
    found = [caption]
    for field in source.extra_caption_fields:
        value = metadata.get(field)
        if isinstance(value, list):  # a tag list in the json
            value = ", ".join(str(v) for v in value)
        if isinstance(value, str) and value.strip() and value.strip() not in found:
            found.append(value.strip())
    if source.tag_shuffle:
        # A few more tries than slots: short tag lists repeat shuffles, which add nothing.
        for j in range(1, 4 * n):
            if len(found) >= n:
                break
            shuffled = shuffle_tags(caption, source.keep_tokens, key, j)
            if shuffled not in found:
                found.append(shuffled)
    return tuple(found[i % len(found)] for i in range(n))


def encode_variants(encode: Any, variants: list[tuple[str, ...]], names: tuple[str, ...]) -> dict[str, Any]:
    """`<field>_alt` rows (B, N - 1, ...) for the text fields `names`, from each sample's variants 1..N-1, encoded
    in one call of `encode` (the cache job's text encoder: list of captions -> {field: (B*, ...)})."""
    from latentforge.shared.families import ALT_SUFFIX

    alt = [c for v in variants for c in v[1:]]
    if not alt:
        return {}
    per = len(variants[0]) - 1
    enc = encode(alt)
    return {name + ALT_SUFFIX: enc[name].reshape(len(variants), per, *enc[name].shape[1:]) for name in names}


def variant_settings(source: SourceConfig, variants: int) -> dict[str, Any]:
    """The source's caption-variant settings that change what a shard caches (empty when there is one caption,
    so turning the feature off leaves every existing shard's hash, and so the cache, as it was)."""
    if variants <= 1:
        return {}
    return {"caption_variants": variants, "extra_caption_fields": list(source.extra_caption_fields),
            "tag_shuffle": source.tag_shuffle, "keep_tokens": source.keep_tokens}
