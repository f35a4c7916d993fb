"""Bytes per cached sample for every family at the REAL models' widths (issue 7): random-normal values for real
tokens (pessimistic), zeros for padding, caption lengths from the demo captions. `python -m bench.family_bytes`."""
import numpy as np, torch, tempfile, os, json
from latentforge.shared.cache_format import CacheSpec
from latentforge.shared.families import cached_fields
from latentforge.shared.cache_writer import CacheWriter
from latentforge.shared.demo_data import CAPTIONS
caps = list(CAPTIONS.values()) if isinstance(CAPTIONS, dict) else list(CAPTIONS)
words = [len(c.split()) for c in caps]
N = 64
fams = {  # family: (latent ch, downsample, bucket, tokens, width, pooled, mask, tokens-per-word)
 "sdxl": (4, 8, (1024,1024), 77, 2048, 1280, False, 1.3),
 "sd1": (4, 8, (512,512), 77, 768, None, False, 1.3),
 "sd2": (4, 8, (768,768), 77, 1024, None, False, 1.3),
 "pixart_sigma": (4, 8, (1024,1024), 300, 4096, None, True, 1.4),
 "sana": (32, 32, (1024,1024), 300, 2304, None, True, 1.3),
}
rows_out = {}
for fam, (C, ds, b, T, D, P, has_mask, tpw) in fams.items():
    fields = cached_fields(fam, latent_channels=C, latent_mode="mean", store_dtype="bfloat16", text_tokens=T, text_dim=D, pooled_dim=P)
    spec = CacheSpec(family=fam, fingerprint="x", fields=fields, buckets=(b,), latent_channels=C, vae_downsample=ds, scaling_factor=1.0, shard_rows=64)
    d = tempfile.mkdtemp(); w = CacheWriter(d, spec); g = w.group("g", {}, "h")
    gen = torch.Generator().manual_seed(0)
    rows = {}
    for f in spec.fields:
        shape = (N, *f.row_shape(b, ds))
        if f.name == "prompt_embeds":
            x = torch.randn(shape, generator=gen)
            if has_mask:
                lens = [min(T, int(words[i % len(words)] * tpw) + 2 + (0 if fam != "sana" else 0)) for i in range(N)]
                for i, L in enumerate(lens): x[i, L:] = 0
            rows[f.name] = x
        elif f.dtype in ("bfloat16", "float16"): rows[f.name] = torch.randn(shape, generator=gen)
        elif f.dtype == "str": rows[f.name] = [str(i) for i in range(N)]
        else: rows[f.name] = np.zeros(shape, f.storage_dtype)
    if has_mask:
        m = np.zeros((N, T), np.uint8)
        for i, L in enumerate(lens): m[i, :L] = 1
        rows["prompt_mask"] = m
    g.add(b, rows); man = g.commit()
    disk = sum(man.files.values()) / N
    raw = sum(int(np.prod(f.row_shape(b, ds))) * np.dtype(f.storage_dtype).itemsize for f in spec.fields if f.dtype != "str")
    rows_out[fam] = (raw, disk)
    print(f"{fam:13s} raw {raw/1e6:6.3f} MB  on disk {disk/1e6:6.3f} MB  ratio {disk/raw:.3f}")
os.makedirs("bench/results", exist_ok=True)
json.dump({k: {"raw_bytes": r, "disk_bytes": d, "ratio": d / r} for k, (r, d) in rows_out.items()}, open("bench/results/family_bytes.json", "w"), indent=2)
