"""Conformance suite of the cache format: what the writer produces, the reader must give back exactly.

Runs against a local folder (atomic-rename commit) and an fsspec object store (`memory://`, commit by
marker), so both commit protocols are held to the same contract.
"""

from __future__ import annotations

import json
import os
import uuid

import fsspec
import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from latentforge.preprocess.cache_writer import CacheWriter, _array_template, _create_array, to_storage
from latentforge.preprocess.shard_writer import ChunkWriter, RowShardWriter
from latentforge.shared.cache_fingerprint import compute_fingerprint
from latentforge.shared.cache_format import (
    CACHE_JSON,
    COMMIT_JSON,
    FORMAT_VERSION,
    CacheFormatError,
    CacheMismatchError,
    CacheSpec,
    FieldSpec,
    decode_keys,
)
from latentforge.shared.cache_reader import CacheReader
from latentforge.shared.families import cached_fields, text_field_names
from latentforge.shared.storage import Storage

BUCKETS = ((64, 64), (64, 128), (128, 64))


def make_spec(latent_mode: str = "dist", store_dtype: str = "bfloat16", codec: str = "blosc-lz4",
              fingerprint: str = "fp-1", family: str = "sdxl") -> CacheSpec:
    fields = cached_fields(family, latent_channels=4, latent_mode=latent_mode, store_dtype=store_dtype,
                           text_tokens=77, text_dim=96, pooled_dim=64)
    return CacheSpec(family=family, fingerprint=fingerprint, fields=fields, buckets=BUCKETS, latent_channels=4,
                     vae_downsample=8, scaling_factor=0.13025, latent_mode=latent_mode, store_dtype=store_dtype,
                     codec=codec, shard_rows=4)


def make_rows(spec: CacheSpec, bucket: tuple[int, int], n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows: dict = {}
    for f in spec.fields:
        shape = (n, *f.row_shape(bucket, spec.vae_downsample))
        if f.is_text:
            rows[f.name] = [f"{seed}-{bucket[0]}x{bucket[1]}-{i}-é" for i in range(n)]
        elif f.dtype in ("bfloat16", "float16"):
            rows[f.name] = torch.randn(shape, generator=g)
        else:
            rows[f.name] = torch.randint(0, 200, shape, generator=g).numpy().astype(f.storage_dtype)
    return rows


def expected(spec: CacheSpec, name: str, values, idx):
    f = spec.field(name)
    if f.is_text:
        return [values[i] for i in idx]
    if isinstance(values, torch.Tensor):
        return values[idx].to(getattr(torch, f.dtype))
    return torch.from_numpy(values[idx])


@pytest.fixture(params=["local", "memory"])
def cache_url(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "cache")
        return
    url = f"memory://cache-{uuid.uuid4().hex}"
    yield url
    fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


def write_group(writer: CacheWriter, group_id: str, counts: dict, seed: int, source_hash: str = "h") -> dict:
    g = writer.group(group_id, {"url": f"{group_id}.tar"}, source_hash)
    data = {}
    for i, (bucket, n) in enumerate(counts.items()):
        rows = make_rows(writer.spec, bucket, n, seed * 100 + i)
        # Add in uneven pieces so buffering, aligned flushes and remainders are all exercised.
        cut = [0, min(n, 3), min(n, 9), n]
        for a, b in zip(cut, cut[1:], strict=False):
            if b > a:
                g.add(bucket, {k: v[a:b] for k, v in rows.items()})
        data[bucket] = rows
    g.commit({"too_small": {"count": 1, "examples": ["k: 10x10"]}})
    return data


@pytest.mark.parametrize("latent_mode,store_dtype,codec", [
    ("dist", "bfloat16", "blosc-lz4"), ("mean", "float16", "zstd"), ("mean", "bfloat16", "none"),
    ("dist", "bfloat16", "blosc-zstd"),
])
def test_round_trip_every_field(cache_url, latent_mode, store_dtype, codec):
    spec = make_spec(latent_mode, store_dtype, codec)
    writer = CacheWriter(cache_url, spec)
    data = {"g0": write_group(writer, "g0", {(64, 64): 11, (64, 128): 2}, seed=1),
            "g1": write_group(writer, "g1", {(64, 64): 5, (128, 64): 4}, seed=2)}
    reader = CacheReader(cache_url)
    assert reader.bucket_counts() == {(64, 64): 16, (64, 128): 2, (128, 64): 4}
    assert reader.num_samples == 22
    # Global row order of a bucket is the groups in id order, rows in write order.
    rows_64 = {k: (torch.cat([data["g0"][(64, 64)][k], data["g1"][(64, 64)][k]])
                   if isinstance(data["g0"][(64, 64)][k], torch.Tensor)
                   else (data["g0"][(64, 64)][k] + data["g1"][(64, 64)][k]
                         if isinstance(data["g0"][(64, 64)][k], list)
                         else np.concatenate([data["g0"][(64, 64)][k], data["g1"][(64, 64)][k]])))
               for k in data["g0"][(64, 64)]}
    idx = [15, 0, 11, 3, 12, 7, 7]
    out = reader.read_rows((64, 64), idx)
    for f in spec.fields:
        got, want = out[f.name], expected(spec, f.name, rows_64[f.name], idx)
        if f.is_text:
            assert got == want
        else:
            assert got.dtype == getattr(torch, f.dtype), f.name
            assert got.shape == (len(idx), *f.row_shape((64, 64), 8)), f.name
            assert torch.equal(got, want), f.name
    narrow = reader.read_rows((128, 64), [3, 1], fields=["latent_mean", "key"])
    assert set(narrow) == {"latent_mean", "key"}
    assert narrow["latent_mean"].shape == (2, 4, 16, 8)


def test_fast_reader_agrees_with_zarr_python(tmp_path):
    spec = make_spec()
    url = str(tmp_path / "c")
    data = write_group(CacheWriter(url, spec), "g0", {(64, 128): 10}, seed=3)
    reader = CacheReader(url)
    for name in ("latent_mean", "prompt_embeds", "pooled_prompt_embeds", "original_size", "key"):
        z = zarr.open_array(os.path.join(url, "shards", "g0", "64x128", name), mode="r")
        ours = reader.read_rows((64, 128), range(10), fields=[name])[name]
        theirs = z[:]
        if name == "key":
            assert ours == decode_keys(theirs) == data[(64, 128)]["key"]
        else:
            assert np.array_equal(ours.view(torch.uint16).numpy() if ours.dtype == torch.bfloat16 else ours.numpy(), theirs)
        assert z.attrs["logical_dtype"] == spec.field(name).dtype


def test_a_batch_is_one_buffer_in_shared_memory_when_asked(cache_url):
    """DataLoader workers hand the trainer one storage per batch; in shared memory it is not copied."""
    writer = CacheWriter(cache_url, make_spec())
    write_group(writer, "g0", {(64, 64): 6}, seed=4)
    write_group(writer, "g1", {(64, 64): 3}, seed=5)
    reader = CacheReader(cache_url)
    for shared in (False, True):
        batch = reader.read_rows((64, 64), [8, 0, 5, 2], shared_memory=shared)
        tensors = [v for v in batch.values() if torch.is_tensor(v)]
        assert len(tensors) >= 5
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
        assert all(t.is_shared() == shared for t in tensors)
        assert all(t.is_contiguous() for t in tensors)
    assert reader.read_rows((64, 64), [], fields=["latent_mean", "original_size"])["latent_mean"].shape[0] == 0


@pytest.mark.parametrize("codec", ["blosc-lz4", "zstd", "none"])
def test_part_filled_shards_extended_by_later_flushes_read_the_same_in_zarr_python(cache_url, codec):
    """A tiny buffer budget forces unaligned flushes: shards are written part-filled, then re-read and
    extended. Our reader and zarr-python must both see every row, in order."""
    spec = make_spec(codec=codec)  # shard_rows=4
    g = CacheWriter(cache_url, spec).group("g0", {}, "h", max_buffer_bytes=1)
    parts = [make_rows(spec, (64, 64), n, seed) for seed, n in enumerate([3, 2, 5, 1, 4])]
    for rows in parts:
        g.add((64, 64), rows)
    g.commit()
    reader = CacheReader(cache_url)
    assert reader.bucket_counts() == {(64, 64): 15}
    for name in ("latent_mean", "prompt_embeds", "pooled_prompt_embeds"):
        want = torch.cat([expected(spec, name, rows[name], list(range(len(rows[name])))) for rows in parts])
        assert torch.equal(reader.read_rows((64, 64), range(15), fields=[name])[name], want), name
        store = reader.storage.zarr_store(f"shards/g0/64x64/{name}", read_only=True)
        theirs = zarr.open_array(store, mode="r")[:]
        assert np.array_equal(theirs, want.view(torch.uint16).numpy() if want.dtype == torch.bfloat16 else want.numpy())


@pytest.mark.parametrize("codec", ["blosc-lz4", "zstd", "none"])
def test_direct_writers_write_the_bytes_zarr_python_writes(tmp_path, codec):
    """Every field, appended in unaligned parts: each chunk/shard file equals zarr-python's own, byte for
    byte, and zarr.json says the same. The direct writers are an optimisation, never a format of their own."""
    spec = make_spec(codec=codec)  # shard_rows=4
    bucket = (64, 64)
    parts = [make_rows(spec, bucket, n, seed) for seed, n in enumerate([3, 2, 5, 1, 4])]
    ours, theirs = tmp_path / "ours", tmp_path / "zarr"
    group = zarr.open_group(str(theirs), mode="w", zarr_format=3)
    storage = Storage(str(ours))
    for f in spec.fields:
        shape = tuple(f.row_shape(bucket, spec.vae_downsample))
        per_row = f.per_row(bucket, spec.vae_downsample)
        writer = (RowShardWriter if per_row else ChunkWriter)(storage, f.name, _array_template(f, shape, per_row, spec))
        reference = _create_array(group, f, shape, per_row, spec)
        for rows in parts:
            writer.append(to_storage(f, rows[f.name]))
            reference.append(to_storage(f, rows[f.name]))
    files = sorted(p.relative_to(ours).as_posix() for p in ours.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(theirs).as_posix() for p in theirs.rglob("*") if p.is_file()
                           and p.parent != theirs)
    for rel in files:
        if rel.endswith("zarr.json"):
            assert json.loads((ours / rel).read_text()) == json.loads((theirs / rel).read_text()), rel
        else:
            assert (ours / rel).read_bytes() == (theirs / rel).read_bytes(), rel


def test_all_zero_rows_round_trip(tmp_path):
    spec = make_spec()
    writer = CacheWriter(str(tmp_path), spec)
    g = writer.group("g0", {}, "h")
    rows = make_rows(spec, (64, 64), 3, 0)
    rows["latent_mean"][1] = 0
    rows["prompt_embeds"][:] = 0
    g.add((64, 64), rows)
    g.commit()
    out = CacheReader(str(tmp_path)).read_rows((64, 64), [0, 1, 2])
    assert torch.equal(out["latent_mean"], rows["latent_mean"].to(torch.bfloat16))
    assert not out["prompt_embeds"].any()


def test_incomplete_group_is_invisible(cache_url):
    spec = make_spec()
    writer = CacheWriter(cache_url, spec)
    write_group(writer, "done", {(64, 64): 3}, seed=1)
    pending = writer.group("pending", {}, "h")
    pending.add((64, 64), make_rows(spec, (64, 64), 5, 9))
    pending._flush("64x64", aligned=False)  # data on disk, no commit marker: a crash at this point
    reader = CacheReader(cache_url)
    assert [g.group_id for g in reader.groups] == ["done"]
    assert reader.bucket_counts() == {(64, 64): 3}
    assert set(writer.committed()) == {"done"}


def test_object_store_group_without_marker_is_invisible():
    url = f"memory://c-{uuid.uuid4().hex}"
    spec = make_spec()
    writer = CacheWriter(url, spec)
    write_group(writer, "g0", {(64, 64): 2}, seed=1)
    fs = fsspec.filesystem("memory")
    fs.rm(f"{url.removeprefix('memory://')}/shards/g0/{COMMIT_JSON}")
    assert CacheReader(url).groups == []


def test_resume_skips_exactly_the_valid_groups(tmp_path):
    url = str(tmp_path)
    writer = CacheWriter(url, make_spec())
    write_group(writer, "a", {(64, 64): 2}, seed=1, source_hash="ha")
    write_group(writer, "b", {(64, 64): 2}, seed=2, source_hash="hb")
    committed = writer.committed()
    assert writer.is_done("a", "ha", committed)
    assert not writer.is_done("b", "changed", committed)  # input changed -> re-cache
    assert not writer.is_done("c", "hc", committed)  # never cached
    # A new fingerprint invalidates every group; the reader hides the stale ones.
    writer2 = CacheWriter(url, make_spec(fingerprint="fp-2"))
    assert not writer2.is_done("a", "ha")
    reader = CacheReader(url)
    assert reader.groups == [] and sorted(reader.stale_groups) == ["a", "b"]
    write_group(writer2, "a", {(64, 64): 1}, seed=5, source_hash="ha")
    reader = CacheReader(url)
    assert [g.group_id for g in reader.groups] == ["a"] and reader.bucket_counts() == {(64, 64): 1}
    assert not any(name.startswith("trash") for name in os.listdir(tmp_path / "shards" / ".tmp"))


def test_recommit_replaces_group_atomically(tmp_path):
    url = str(tmp_path)
    writer = CacheWriter(url, make_spec())
    write_group(writer, "a", {(64, 64): 2}, seed=1, source_hash="h1")
    new = write_group(writer, "a", {(64, 128): 3}, seed=2, source_hash="h2")
    reader = CacheReader(url)
    assert reader.bucket_counts() == {(64, 128): 3}
    assert reader.keys((64, 128), [0, 1, 2]) == new[(64, 128)]["key"]


def test_compatibility_errors_name_both_sides(tmp_path):
    url = str(tmp_path)
    write_group(CacheWriter(url, make_spec()), "a", {(64, 64): 1}, seed=1)
    reader = CacheReader(url)
    reader.check_compatible(family="sdxl", latent_channels=4, field_widths={"prompt_embeds": 96, "pooled_prompt_embeds": 64})
    for kwargs, words in [
        ({"family": "sd1", "latent_channels": 4}, ["model family", "sdxl", "sd1"]),
        ({"family": "sdxl", "latent_channels": 16}, ["latent channels", "4", "16"]),
        ({"family": "sdxl", "latent_channels": 4, "field_widths": {"prompt_embeds": 2048}}, ["prompt_embeds", "96", "2048"]),
        ({"family": "sdxl", "latent_channels": 4, "field_widths": {"prompt_mask": 300}}, ["prompt_mask"]),
    ]:
        with pytest.raises(CacheMismatchError) as info:
            reader.check_compatible(**kwargs)
        msg = str(info.value)
        assert "\n" not in msg and all(w in msg for w in words), msg


def test_newer_format_version_is_refused(tmp_path):
    url = str(tmp_path)
    write_group(CacheWriter(url, make_spec()), "a", {(64, 64): 1}, seed=1)
    doc = json.loads((tmp_path / CACHE_JSON).read_text())
    doc["format_version"] = FORMAT_VERSION + 1
    (tmp_path / CACHE_JSON).write_text(json.dumps(doc))
    with pytest.raises(CacheFormatError, match="newer"):
        CacheReader(url)


def test_writer_refuses_other_family_in_same_path(tmp_path):
    CacheWriter(str(tmp_path), make_spec())
    spec = make_spec(family="sd1")
    with pytest.raises(CacheFormatError, match="use a new cache.path"):
        CacheWriter(str(tmp_path), spec)


def test_truncated_or_deleted_shard_is_named(tmp_path):
    url = str(tmp_path)
    write_group(CacheWriter(url, make_spec()), "g7", {(64, 64): 6}, seed=1)
    shard = tmp_path / "shards" / "g7" / "64x64" / "prompt_embeds" / "c" / "1" / "0" / "0"
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 10)
    reader = CacheReader(url)
    problems = reader.verify()
    assert len(problems) == 1 and "g7" in problems[0] and "prompt_embeds" in problems[0]
    with pytest.raises(CacheFormatError, match="g7.*modified or deleted"):
        reader.read_rows((64, 64), [5], fields=["prompt_embeds"])
    # Same size, flipped byte: only the checksum pass sees it.
    other = tmp_path / "shards" / "g7" / "64x64" / "latent_mean" / "c" / "0" / "0" / "0" / "0"
    raw = bytearray(other.read_bytes())
    raw[10] ^= 0xFF
    other.write_bytes(bytes(raw))
    assert any("checksum" in p for p in CacheReader(url).verify(checksums=True))


def test_prompts_round_trip(cache_url):
    spec = make_spec()
    writer = CacheWriter(cache_url, spec)
    names = text_field_names("sdxl")
    empty = {"prompt_embeds": torch.randn(1, 77, 96), "pooled_prompt_embeds": torch.randn(1, 64)}
    val = {"prompt_embeds": torch.randn(2, 77, 96), "pooled_prompt_embeds": torch.randn(2, 64)}
    writer.write_prompts(empty, ["a cat", "a dog"], val)
    got_empty, prompts, got_val = CacheReader(cache_url).prompts()
    assert prompts == ["a cat", "a dog"] and set(got_empty) == set(names)
    for k in names:
        assert torch.equal(got_empty[k], empty[k].to(torch.bfloat16))
        assert torch.equal(got_val[k], val[k].to(torch.bfloat16))


def test_spec_json_round_trip_and_validation():
    spec = make_spec()
    assert CacheSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="never float32"):
        FieldSpec("x", (4, "h", "w"), "float32")
    with pytest.raises(ValueError, match="not divisible"):
        CacheSpec(family="sdxl", fingerprint="f", fields=spec.fields, buckets=((60, 64),), latent_channels=4,
                  vae_downsample=8, scaling_factor=1.0)
    with pytest.raises(CacheFormatError, match="not valid JSON"):
        CacheSpec.from_json("{")


def test_fingerprint_is_canonical():
    a = compute_fingerprint({"model": "x", "buckets": [[64, 64]], "dtype": "bf16"})
    b = compute_fingerprint({"dtype": "bf16", "buckets": [[64, 64]], "model": "x"})
    assert a == b and len(a) == 32
    assert a != compute_fingerprint({"model": "y", "buckets": [[64, 64]], "dtype": "bf16"})


def test_writer_rejects_wrong_shapes_and_fields(tmp_path):
    spec = make_spec()
    g = CacheWriter(str(tmp_path), spec).group("g", {}, "h")
    rows = make_rows(spec, (64, 64), 2, 0)
    with pytest.raises(ValueError, match="row shape"):
        g.add((64, 128), rows)
    with pytest.raises(ValueError, match="missing"):
        g.add((64, 64), {k: v for k, v in rows.items() if k != "key"})
    with pytest.raises(ValueError, match="not in the cache"):
        g.add((32, 32), rows)


@settings(max_examples=25, deadline=None)
@given(counts=st.lists(st.integers(0, 9), min_size=1, max_size=3), picks=st.data())
def test_random_reads_match_written(tmp_path_factory, counts, picks):
    """Property: any multiset of rows, in any order, reads back exactly what was written."""
    url = str(tmp_path_factory.mktemp("prop"))
    spec = make_spec(latent_mode="mean")
    writer = CacheWriter(url, spec)
    written = []
    for i, n in enumerate(counts):
        if n:
            written.append(write_group(writer, f"g{i}", {(64, 64): n}, seed=i)[(64, 64)])
    total = sum(counts)
    reader = CacheReader(url)
    if not total:
        assert reader.bucket_counts() == {}
        return
    idx = picks.draw(st.lists(st.integers(0, total - 1), min_size=1, max_size=12))
    out = reader.read_rows((64, 64), idx, fields=["latent_mean", "key"])
    lat = torch.cat([w["latent_mean"] for w in written]).to(torch.bfloat16)
    keys = [k for w in written for k in w["key"]]
    assert torch.equal(out["latent_mean"], lat[idx])
    assert out["key"] == [keys[i] for i in idx]
