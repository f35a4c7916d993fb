"""Bytes per cached sample for every family at the REAL models' widths (issue 7).

Random-normal values for real tokens (pessimistic: real embeddings compress better), zeros for padding
(as the cache job stores T5/Gemma padding), caption lengths taken from the demo captions.
Run: `python -m bench.family_bytes`; writes bench/results/family_bytes.json.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import torch

from latentforge.devkit.demo_data import CAPTIONS
from latentforge.preprocess.cache_writer import CacheWriter
from latentforge.shared.cache_format import CacheSpec
from latentforge.shared.families import cached_fields

SAMPLES = 64
# family: latent channels, downsample, bucket, tokens, text width, pooled width, masked, tokens per word
FAMILIES = {
    "sdxl": (4, 8, (1024, 1024), 77, 2048, 1280, False, 1.3),
    "sd1": (4, 8, (512, 512), 77, 768, None, False, 1.3),
    "sd2": (4, 8, (768, 768), 77, 1024, None, False, 1.3),
    "pixart_sigma": (4, 8, (1024, 1024), 300, 4096, None, True, 1.4),
    "sana": (32, 32, (1024, 1024), 300, 2304, None, True, 1.3),
    # Stage C: 16 x 24 x 24 EfficientNet latents of a 768 px image; CLIP bigG's 77 states, padding included (the
    # prior attends to it, so it is not zeroed), + the pooled projection.
    "stable_cascade": (16, 32, (768, 768), 77, 1280, 1280, False, 1.3),
}


def measure(family: str) -> tuple[int, float]:
    """(raw bytes per sample, on-disk bytes per sample) for one family."""
    channels, down, bucket, tokens, width, pooled, masked, per_word = FAMILIES[family]
    captions = list(CAPTIONS.values()) if isinstance(CAPTIONS, dict) else list(CAPTIONS)
    lengths = [min(tokens, int(len(captions[i % len(captions)].split()) * per_word) + 2) for i in range(SAMPLES)]
    fields = cached_fields(family, latent_channels=channels, latent_mode="mean", store_dtype="bfloat16",
                           text_tokens=tokens, text_dim=width, pooled_dim=pooled)
    spec = CacheSpec(family=family, fingerprint="bench", fields=fields, buckets=(bucket,), latent_channels=channels,
                     vae_downsample=down, scaling_factor=1.0, shard_rows=64)
    gen = torch.Generator().manual_seed(0)
    rows: dict = {}
    for f in spec.fields:
        shape = (SAMPLES, *f.row_shape(bucket, down))
        if f.dtype in ("bfloat16", "float16"):
            rows[f.name] = torch.randn(shape, generator=gen)
        elif f.is_text:
            rows[f.name] = [str(i) for i in range(SAMPLES)]
        else:
            rows[f.name] = np.zeros(shape, f.storage_dtype)
    if masked:
        mask = np.zeros((SAMPLES, tokens), np.uint8)
        for i, n in enumerate(lengths):
            rows["prompt_embeds"][i, n:] = 0
            mask[i, :n] = 1
        rows["prompt_mask"] = mask
    with tempfile.TemporaryDirectory() as root:
        group = CacheWriter(root, spec).group("g", {}, "bench")
        group.add(bucket, rows)
        disk = sum(group.commit().files.values()) / SAMPLES
    raw = sum(int(np.prod(f.row_shape(bucket, down))) * np.dtype(f.storage_dtype).itemsize
              for f in spec.fields if not f.is_text)
    return raw, disk


def main() -> dict[str, dict[str, float]]:
    results = {}
    for family in FAMILIES:
        raw, disk = measure(family)
        results[family] = {"raw_bytes": raw, "disk_bytes": disk, "ratio": disk / raw}
        print(f"{family:13s} raw {raw / 1e6:6.3f} MB  on disk {disk / 1e6:6.3f} MB  ratio {disk / raw:.3f}")
    os.makedirs("bench/results", exist_ok=True)
    with open("bench/results/family_bytes.json", "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
