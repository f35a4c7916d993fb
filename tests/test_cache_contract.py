"""The cache contract in `shared/cache_format.py`, built and parsed by both stages: key encoding, group
ids and the source each group came from, model-identity names, fingerprint inputs, format versions, and
conformance with an independent Zarr v3 implementation (tensorstore)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from latentforge.preprocess.cache_writer import CacheWriter
from latentforge.shared.cache_fingerprint import (
    FP_MODEL,
    MODEL_HUB_ID,
    MODEL_TEXT,
    MODEL_VAE,
    compute_fingerprint,
    fingerprint_inputs,
    recorded_model_parts,
)
from latentforge.shared.cache_format import (
    CACHE_JSON,
    CODECS,
    KEY_BYTES,
    MAX_SOURCE_KEY_BYTES,
    CacheFormatError,
    CacheMismatchError,
    CacheSpec,
    GroupManifest,
    SourceOrigin,
    decode_keys,
    encode_keys,
    find_source,
    group_id,
    key_problem,
    parse_group_id,
    virtual_shard_name,
)
from latentforge.shared.cache_reader import CacheReader
from latentforge.shared.config import load_config
from latentforge.shared.families import cached_fields

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
BUCKETS = ((64, 64), (64, 128))
SOURCE_A = "data/a/{00000..00009}.tar"
SOURCE_B = "data/b"


def make_spec(codec: str = "blosc-lz4") -> CacheSpec:
    fields = cached_fields("sdxl", latent_channels=4, latent_mode="dist", store_dtype="bfloat16", text_tokens=8,
                           text_dim=16, pooled_dim=8)
    return CacheSpec(family="sdxl", fingerprint="fp", fields=fields, buckets=BUCKETS, latent_channels=4,
                     vae_downsample=8, scaling_factor=0.13, codec=codec, shard_rows=4)


def make_rows(spec: CacheSpec, bucket: tuple[int, int], keys: list[str], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows: dict = {}
    for f in spec.fields:
        shape = (len(keys), *f.row_shape(bucket, spec.vae_downsample))
        if f.is_text:
            rows[f.name] = keys
        elif f.dtype == "bfloat16":
            rows[f.name] = torch.randn(shape, generator=g)
        else:
            rows[f.name] = torch.randint(0, 3, shape, generator=g).numpy().astype(f.storage_dtype)
    return rows


def write(writer: CacheWriter, gid: str, counts: dict, origin: SourceOrigin | None = None) -> None:
    g = writer.group(gid, {"url": gid}, f"h-{gid}", origin=origin)
    for i, (bucket, n) in enumerate(counts.items()):
        g.add(bucket, make_rows(writer.spec, bucket, [f"{gid}/k{j}-é" for j in range(n)], seed=i))
    g.commit()


# ------------------------------------------------------------------------------------------------ keys
def test_keys_are_zero_padded_utf8_bytes_and_round_trip():
    keys = ["000000017", "", "a/b/c é ☃", "x" * KEY_BYTES]
    rows = encode_keys(keys)
    assert rows.dtype == np.uint8 and rows.shape == (4, KEY_BYTES)
    assert bytes(rows[2]).rstrip(b"\0") == "a/b/c é ☃".encode() and not rows[1].any()
    assert decode_keys(rows) == keys
    assert decode_keys(encode_keys([])) == [] and encode_keys([]).shape == (0, KEY_BYTES)
    with pytest.raises(ValueError, match="at most 256 bytes"):
        encode_keys(["x" * (KEY_BYTES + 1)])
    with pytest.raises(ValueError, match="without NUL"):
        encode_keys(["a\0b"])
    bad = encode_keys(["ab"])
    bad[0, 5] = 1  # a byte after the padding started: not a key this format writes
    with pytest.raises(ValueError, match="after its zero padding"):
        decode_keys(bad)


def test_source_keys_that_the_cache_cannot_hold_get_a_skip_reason():
    assert key_problem("000000017") is None and key_problem("é" * (MAX_SOURCE_KEY_BYTES // 2)) is None
    reason, detail = key_problem("é" * (MAX_SOURCE_KEY_BYTES // 2 + 1))
    assert reason == "key_too_long" and f"at most {MAX_SOURCE_KEY_BYTES}" in detail
    # Room is left for the suffix the cache job appends to the mirrored copy of a sample.
    assert len(encode_keys(["k" * MAX_SOURCE_KEY_BYTES + "#flip"])) == 1
    assert key_problem(b"caf\xe9".decode("utf-8", "surrogateescape"))[0] == "key_not_utf8"  # a latin-1 tar name
    assert key_problem("a\0b")[0] == "key_not_utf8"


def test_key_array_has_a_core_zarr_data_type(tmp_path):
    writer = CacheWriter(str(tmp_path), make_spec())
    write(writer, "g0", {(64, 64): 5})
    meta = json.loads((tmp_path / "shards" / "g0" / "64x64" / "key" / "zarr.json").read_text())
    assert meta["data_type"] == "uint8" and meta["shape"] == [5, KEY_BYTES]
    assert meta["attributes"] == {"logical_dtype": "utf8"} and meta["fill_value"] == 0
    assert CacheReader(str(tmp_path)).keys((64, 64), [4, 0]) == ["g0/k4-é", "g0/k0-é"]


# ------------------------------------------------------------------------------------ group ids, origin
def test_group_ids_are_built_and_parsed_in_one_place():
    assert group_id(2, "00003") == "s2-00003" and parse_group_id("s2-00003") == (2, "00003")
    assert group_id(0, virtual_shard_name(7)) == "s0-v000007"
    assert parse_group_id("s12-a_b-1") == (12, "a_b-1")
    with pytest.raises(ValueError, match="s<source index>"):
        parse_group_id("g0")
    with pytest.raises(ValueError, match="must match"):
        group_id(0, "bad/name")


def test_manifest_records_its_source_and_round_trips(tmp_path):
    origin = SourceOrigin.of(1, "webdataset", "https://host/x/{0..9}.tar?X-Amz-Signature=abc")
    assert origin.path == "https://host/x/{0..9}.tar?X-Amz-Signature=***"  # never a credential on disk
    writer = CacheWriter(str(tmp_path), make_spec())
    write(writer, "s1-00000", {(64, 64): 2}, origin)
    write(writer, "tool", {(64, 64): 1})
    doc = json.loads((tmp_path / "shards" / "s1-00000" / "commit.json").read_text())
    assert doc["origin"] == {"index": 1, "type": "webdataset", "path": origin.path}
    reader = CacheReader(str(tmp_path))
    assert reader.manifest("s1-00000").origin == origin and reader.manifest("tool").origin is None
    text = reader.manifest("s1-00000").to_json()
    assert GroupManifest.from_json(text, "x") == reader.manifest("s1-00000")


def test_sources_are_matched_by_type_and_path_not_position():
    a = SourceOrigin.of(0, "webdataset", SOURCE_A)
    configured = [("folder", SOURCE_B), ("webdataset", SOURCE_A)]
    assert find_source("s0-00001", a, configured) == 1  # reordered: still found
    assert find_source("tool", None, configured) is None
    assert find_source("s0-00001", a, [("webdataset", SOURCE_A), ("webdataset", SOURCE_A)]) == 0
    with pytest.raises(CacheMismatchError) as err:
        find_source("s0-00001", a, [("folder", SOURCE_A), ("folder", SOURCE_B)])  # same path, other type
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"cache group s0-00001 came from source '{SOURCE_A}' (webdataset)")
    assert "not in data.sources: add it back" in line


def _config(*sources: str, held_out: float = 0.0):
    return load_config(DEMO, [f"data.sources=[{', '.join(sources)}]", f"train.held_out_fraction={held_out}"])


def test_trainer_repeats_follow_each_group_source_when_sources_are_reordered(tmp_path):
    from latentforge.train.data import CachedSamples

    writer = CacheWriter(str(tmp_path), make_spec())
    write(writer, "s0-00000", {(64, 64): 3}, SourceOrigin.of(0, "webdataset", SOURCE_A))
    write(writer, "s1-v000000", {(64, 64): 2, (64, 128): 1}, SourceOrigin.of(1, "folder", SOURCE_B))
    reader = CacheReader(str(tmp_path))
    as_cached = CachedSamples(reader, _config(f"{{type: webdataset, path: '{SOURCE_A}', repeats: 3}}",
                                              f"{{type: folder, path: '{SOURCE_B}'}}"))
    assert as_cached.train_rows[(64, 64)].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 4]
    # The same sources the other way round (and a new one): each group keeps its own source's repeats.
    reordered = CachedSamples(reader, _config("{type: folder, path: 'data/new'}", f"{{type: folder, path: '{SOURCE_B}'}}",
                                              f"{{type: webdataset, path: '{SOURCE_A}', repeats: 3}}"))
    assert {b: r.tolist() for b, r in reordered.train_rows.items()} == \
        {b: r.tolist() for b, r in as_cached.train_rows.items()}
    assert reordered.bucket_sizes == {(64, 64): 11, (64, 128): 1}


def test_trainer_refuses_a_group_whose_source_was_removed_in_one_line(tmp_path):
    from latentforge.train.data import CachedSamples

    writer = CacheWriter(str(tmp_path), make_spec())
    write(writer, "s0-00000", {(64, 64): 3}, SourceOrigin.of(0, "webdataset", SOURCE_A))
    write(writer, "s1-v000000", {(64, 64): 2}, SourceOrigin.of(1, "folder", SOURCE_B))
    with pytest.raises(CacheMismatchError) as err:
        CachedSamples(CacheReader(str(tmp_path)), _config(f"{{type: webdataset, path: '{SOURCE_A}'}}"))
    assert str(err.value) == (f"cache group s1-v000000 came from source '{SOURCE_B}' (folder), which is not in "
                              "data.sources: add it back, or re-cache without it into a new cache.path")


# ------------------------------------------------------------------------------------- format version
def _as_version_1(cache: Path) -> None:
    """What a version-1 cache looked like where it matters here: the version numbers and a str key field."""
    doc = json.loads((cache / CACHE_JSON).read_text())
    doc["format_version"] = 1
    for f in doc["fields"]:
        if f["name"] == "key":
            f.update(shape=[], dtype="str")
    (cache / CACHE_JSON).write_text(json.dumps(doc))
    for commit in (cache / "shards").glob("*/commit.json"):
        m = json.loads(commit.read_text())
        m["format_version"] = 1
        m.pop("origin")
        commit.write_text(json.dumps(m))


def test_an_older_cache_fails_in_one_line_naming_the_fix_and_overwrite_takes_it_over(tmp_path):
    spec = make_spec()
    write(CacheWriter(str(tmp_path), spec), "s0-00000", {(64, 64): 2})
    _as_version_1(tmp_path)
    for attempt in (lambda: CacheReader(str(tmp_path)), lambda: CacheWriter(str(tmp_path), spec)):
        with pytest.raises(CacheFormatError) as err:
            attempt()
        line = str(err.value)
        assert "\n" not in line and "cache format version 1 is older than this latentforge reads (version 2)" in line
        assert "latentforge cache --config CONFIG --overwrite" in line and "make cache ARGS=--overwrite" in line
    writer = CacheWriter(str(tmp_path), spec, overwrite=True)  # what --overwrite does: the new spec is written
    assert not writer.is_done("s0-00000", "h-s0-00000")  # the old group is not done: it gets re-cached
    reader = CacheReader(str(tmp_path))
    assert reader.groups == [] and reader.stale_groups == ["s0-00000"]  # and is never read meanwhile
    write(writer, "s0-00000", {(64, 64): 3})
    assert CacheReader(str(tmp_path)).bucket_counts() == {(64, 64): 3}


# -------------------------------------------------------------------------- model identity, fingerprint
def test_model_identity_names_are_written_and_read_from_the_contract(tmp_path):
    from latentforge.preprocess.encoders import model_identity
    from latentforge.shared.model_check import check_model_files

    config = load_config(DEMO, ["model.pretrained=org/sdxl-base"])
    ident = model_identity(config)
    assert ident[MODEL_TEXT][MODEL_HUB_ID] == ident[MODEL_VAE][MODEL_HUB_ID] == "org/sdxl-base"
    spec = dataclasses.replace(make_spec(), fingerprint_inputs={FP_MODEL: ident})
    assert recorded_model_parts(spec) == ident
    check_model_files(spec, "cache", "org/sdxl-base")
    with pytest.raises(CacheMismatchError, match="VAE \\(hub id\\): cache has org/sdxl-base, model expects org/other"):
        check_model_files(spec, "cache", "org/other")
    assert recorded_model_parts(make_spec()) == {}


def test_fingerprint_inputs_equal_the_former_inline_assembly(tmp_path):
    """The assembly moved from the cache job into the contract; the fingerprint of a config must not move."""
    from latentforge.preprocess.job import PIPELINE_VERSION
    from latentforge.shared.file_hash import sha256_file

    weights = tmp_path / "RealESRGAN_x4plus.pth"
    weights.write_bytes(b"not really weights")
    model = {"text": {"files": {"text_encoder/model.safetensors": "ab" * 32}}, "vae": {"hub_id": "x", "revision": "main",
                                                                                       "variant": None}}
    for extra in ([], [f"upscale.model_path={weights}", "cache.flip=true", "buckets.resolutions=[256, 512]"]):
        cfg = load_config(DEMO, extra)
        upscale = cfg.upscale.model_dump()
        for key in ("model_path", "face_model_path"):  # the cache job's code before the move, verbatim
            path = upscale.pop(key)
            upscale[key.replace("_path", "_sha256")] = sha256_file(path) if path and os.path.isfile(path) else None
        before = {
            "pipeline_version": PIPELINE_VERSION,
            "family": cfg.model.family,
            "model": model,
            "cache": {k: getattr(cfg.cache, k) for k in ("latent_mode", "store_dtype", "vae_dtype", "text_dtype", "clip_skip",
                                                         "max_tokens", "flip", "max_pixels", "missing_caption", "deterministic")},
            "buckets": cfg.buckets.model_dump(),
            "upscale": upscale,
        }
        raw = cfg.upscale.model_dump()
        after = fingerprint_inputs(
            pipeline_version=PIPELINE_VERSION, family=cfg.model.family, model=model, cache=cfg.cache.model_dump(),
            buckets=cfg.buckets.model_dump(), upscale=raw,
            upscale_weights={k: sha256_file(raw[k]) if raw[k] else None for k in ("model_path", "face_model_path")})
        assert after == before
        assert compute_fingerprint(after) == compute_fingerprint(before)


# ------------------------------------------------------------------- conformance: another Zarr v3 reader
@pytest.mark.parametrize("codec", CODECS)
def test_every_array_reads_the_same_with_tensorstore(tmp_path, codec):
    """tensorstore (an independent Zarr v3 implementation) opens every array of every bucket group, the
    key included, and reads what zarr-python and `CacheReader` read."""
    ts = pytest.importorskip("tensorstore")
    spec = make_spec(codec)
    writer = CacheWriter(str(tmp_path), spec)
    write(writer, "s0-00000", {(64, 64): 6, (64, 128): 1})
    write(writer, "s0-00001", {(64, 64): 3})
    reader = CacheReader(str(tmp_path))
    arrays = 0
    for manifest in reader.groups:
        for name in manifest.bucket_counts:
            for f in spec.fields:
                path = tmp_path / "shards" / manifest.group_id / name / f.name
                theirs = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}).result()
                got = np.asarray(theirs.read().result())
                assert np.array_equal(got, zarr.open_array(str(path), mode="r")[:]), (path, "zarr-python")
                bucket = tuple(int(x) for x in name.split("x"))
                start = reader.group_ids(bucket, range(reader.bucket_counts()[bucket])).index(manifest.group_id)
                ours = reader.read_rows(bucket, range(start, start + len(got)), fields=[f.name])[f.name]
                if f.is_text:
                    assert decode_keys(got) == ours, path
                else:
                    assert np.array_equal(got, ours.view(torch.uint16).numpy() if ours.dtype == torch.bfloat16
                                          else ours.numpy()), (path, "CacheReader")
                arrays += 1
    assert arrays == 3 * len(spec.fields)
