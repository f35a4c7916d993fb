"""Embeddings stored once: rows of a shard file whose encoded bytes are identical (samples sharing a
caption) point at one byte range of the file. Every row still reads back as written, through our reader
and through zarr-python, and the file holds each distinct chunk once."""

from __future__ import annotations

import numpy as np
import torch
import zarr
from test_cache_format import make_rows, make_spec

from latentforge.preprocess.cache_writer import CacheWriter
from latentforge.shared.cache_reader import CacheReader

BUCKET = (64, 64)


def _write(path, rows) -> None:
    spec = make_spec(codec="blosc-lz4")  # shard_rows=4
    group = CacheWriter(str(path), spec).group("g0", {}, "h")
    group.add(BUCKET, rows)
    group.commit()


def test_shared_captions_are_stored_once_and_read_back_row_for_row(tmp_path):
    spec = make_spec(codec="blosc-lz4")
    n = 12
    rows = make_rows(spec, BUCKET, n, 0)
    distinct = make_rows(spec, BUCKET, n, 1)
    caption = [0, 0, 1, 0, 2, 2, 2, 2, 3, 1, 3, 3]  # which of 4 captions each sample has
    for name in ("prompt_embeds", "pooled_prompt_embeds"):
        rows[name] = rows[name][caption].clone()
    _write(tmp_path / "shared", rows)
    _write(tmp_path / "distinct", distinct)

    reader = CacheReader(str(tmp_path / "shared"))
    got = reader.read_rows(BUCKET, list(range(n)))
    for name in ("prompt_embeds", "latent_mean"):
        assert torch.equal(got[name], rows[name].to(got[name].dtype)), name
    # zarr-python reads the same rows from the shared ranges.
    store = zarr.storage.LocalStore(str(tmp_path / "shared" / "shards" / "g0" / "64x64" / "prompt_embeds"))
    theirs = zarr.open_array(store, mode="r")[:]
    assert np.array_equal(theirs, rows["prompt_embeds"].to(torch.bfloat16).view(torch.uint16).numpy())

    def size(cache, field):
        return sum(p.stat().st_size for p in (cache / "shards" / "g0" / "64x64" / field / "c").rglob("*") if p.is_file())

    # Shards of 4 rows hold 2, 1 and 2 distinct captions: 5 chunks stored instead of 12.
    stored = sum(len(set(caption[i:i + 4])) for i in range(0, n, 4))
    assert stored == 5
    shared, full = size(tmp_path / "shared", "prompt_embeds"), size(tmp_path / "distinct", "prompt_embeds")
    index = 3 * (4 * 16 + 4)
    assert abs((shared - index) / (full - index) - stored / n) < 0.02
    reader.close()
