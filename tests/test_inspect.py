"""`latentforge inspect`: the summary, the PNGs, --verify catching NaN and truncated files by shard, and
finding the VAE through the model location cache.json records (only while its weights still match)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from latentforge.app.cli import main
from latentforge.app.inspect_draw import CELL
from latentforge.shared.cache_format import bucket_name
from latentforge.shared.cache_reader import CacheReader

BF16_NAN = 0x7FC0
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache_copy(small_cache, tmp_path) -> Path:
    """A private copy to corrupt (the session cache is shared with other tests)."""
    return Path(shutil.copytree(small_cache, tmp_path / "cache"))


def test_summary_and_pictures(small_cache, tiny_sdxl, tmp_path, capsys):
    out = tmp_path / "inspect"
    assert main(["inspect", str(small_cache), "--out", str(out), "--model", str(tiny_sdxl), "--per-bucket", "2",
                 "--verify"]) == 0
    text = capsys.readouterr().out
    reader = CacheReader(str(small_cache))
    counts = reader.bucket_counts()
    assert f"samples: {reader.num_samples} in {len(reader.groups)} committed groups" in text
    for bucket, n in counts.items():
        assert any(line.split()[:2] == [bucket_name(bucket), str(n)] for line in text.splitlines()), bucket
    for field in ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds", "original_size", "key"):
        assert f"  {field} " in text
    assert "(4, h, w)      bfloat16" in text and reader.spec.fingerprint in text
    assert "bytes per sample:" in text and "upscale paths: none" in text and "skipped: none" in text
    assert "VAE weights match the cache's fingerprint" in text and "verify: OK" in text

    hist = Image.open(out / "buckets.png")
    hist.verify()
    assert hist.size[0] >= 400 and 60 <= hist.size[1] <= 44 + 24 * len(reader.spec.buckets) + 16
    for bucket, n in counts.items():
        grid = Image.open(out / f"grid-{bucket_name(bucket)}.png")
        grid.load()
        shown = min(2, n)
        assert grid.size[0] == min(4, shown) * (CELL + 16) and 100 <= grid.size[1] <= 1200
        assert np.asarray(grid.convert("L")).std() > 5  # not a blank canvas
    reader.close()


def test_model_is_required_for_grids_only(cache_copy, tmp_path, capsys):
    """A cache written before cache.json recorded the model's location names its local model by weight
    hashes only: grids need --model, the rest does not."""
    spec = json.loads((cache_copy / "cache.json").read_text())
    assert spec.pop("model_location")["pretrained"]["path"]
    (cache_copy / "cache.json").write_text(json.dumps(spec))
    assert main(["inspect", str(cache_copy), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model" in err and "weight hashes" in err
    assert not (tmp_path / "a").exists()
    assert main(["inspect", str(cache_copy), "--out", str(tmp_path / "b"), "--per-bucket", "0"]) == 0
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["buckets.png"]


@pytest.fixture
def folder_cache(tiny_sdxl, demo_data, tmp_path) -> tuple[Path, Path]:
    """(model folder, cache): one demo tar cached from a private copy of the tiny model, to move or alter."""
    from latentforge.preprocess.job import run_cache
    from latentforge.shared.config import load_config

    model = Path(shutil.copytree(tiny_sdxl, tmp_path / "models" / "tiny-sdxl"))
    cache = tmp_path / "cache"
    config = load_config(ROOT / "configs" / "demo.yaml", [
        f"model.pretrained={model}", f"cache.path={cache}", "upscale.enabled=false", "train.output_dir=unused",
        f"data.sources=[{{type: webdataset, path: '{demo_data}/webdataset/00000.tar'}}]"])
    assert run_cache(config) == 0
    return model, cache


def test_recorded_folder_decodes_the_grids_without_model(folder_cache, tmp_path, capsys):
    model, cache = folder_cache
    location = json.loads((cache / "cache.json").read_text())["model_location"]
    assert location == {"pretrained": {"path": str(model)}, "vae": None}
    assert main(["inspect", str(cache), "--out", str(tmp_path / "out"), "--per-bucket", "1"]) == 0
    out = capsys.readouterr().out
    assert f"VAE from {model}, the folder the cache was made from; VAE weights match" in out
    assert f"loaded from pretrained: {model}" in out
    assert list((tmp_path / "out").glob("grid-*.png"))


def test_moved_model_folder_asks_for_model_in_one_line(folder_cache, tmp_path, capsys):
    model, cache = folder_cache
    model.rename(model.with_name("moved"))
    assert main(["inspect", str(cache), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"the model folder this cache was made from, {model}, is gone" in err and "--model" in err
    assert not (tmp_path / "out").exists()
    # The location is a hint, not part of the fingerprint: the moved model still fits the cache.
    assert main(["inspect", str(cache), "--out", str(tmp_path / "out"), "--per-bucket", "1",
                 "--model", str(model.with_name("moved"))]) == 0
    assert "VAE weights match the cache's fingerprint" in capsys.readouterr().out


def test_replaced_vae_weights_are_refused_in_one_line(folder_cache, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model, cache = folder_cache
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    name = sorted(state)[0]
    state[name] = state[name] + 0.5  # another VAE of the same shapes
    save_file(state, weights, metadata={"format": "pt"})
    assert main(["inspect", str(cache), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"the VAE in {model} is not the one this cache was made with" in err
    assert "vae/diffusion_pytorch_model.safetensors" in err and "--model" in err


def _first_group_bucket(cache: Path) -> tuple[str, str]:
    reader = CacheReader(str(cache))
    group = sorted(reader.groups, key=lambda g: g.group_id)[0]
    name = max(group.bucket_counts, key=group.bucket_counts.get)
    reader.close()
    return group.group_id, name


def test_verify_reports_nan_by_shard_and_reads_skip_reasons(cache_copy, capsys):
    gid, name = _first_group_bucket(cache_copy)
    arr = zarr.open_array(str(cache_copy / "shards" / gid / name / "latent_mean"), mode="r+")
    row = np.asarray(arr[0])
    row.reshape(-1)[5] = BF16_NAN
    arr[0] = row
    commit = cache_copy / "shards" / gid / "commit.json"  # skip reasons live in the manifest, outside its files
    doc = json.loads(commit.read_text())
    doc["skipped"] = {"too_small": {"count": 2, "examples": ["k1: 40x40"]}}
    commit.write_text(json.dumps(doc))

    assert main(["inspect", str(cache_copy), "--verify", "--per-bucket", "0"]) == 1
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if f"(shard {gid})" in line]
    assert any("latent_mean" in p and "1 NaN and 0 Inf" in p and "row 0" in p for p in problems), out
    assert any("checksum mismatch" in p or "committed" in p for p in problems), out  # the file changed after commit
    assert "too_small                     2   e.g. k1: 40x40" in out
    assert "summary.json of the last cache job reports: none" in out
    assert (cache_copy / "inspect" / "buckets.png").is_file()  # default --out: CACHE/inspect


def test_verify_reports_truncated_file_by_shard(cache_copy, capsys):
    gid, name = _first_group_bucket(cache_copy)
    shard_file = next((cache_copy / "shards" / gid / name / "prompt_embeds" / "c").rglob("*"))
    while shard_file.is_dir():
        shard_file = next(shard_file.iterdir())
    size = shard_file.stat().st_size
    os.truncate(shard_file, size - 100)
    assert main(["inspect", str(cache_copy), "--verify", "--per-bucket", "0"]) == 1
    out = capsys.readouterr().out
    assert f"{shard_file}: {size - 100} bytes, committed {size} (shard {gid})" in out
    assert any("prompt_embeds: unreadable" in line and f"(shard {gid})" in line for line in out.splitlines()), out
    assert out.rstrip().splitlines()[-1].startswith("verify: ") and "problems found" in out
