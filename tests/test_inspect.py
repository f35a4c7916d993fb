"""`latentforge inspect`: the summary, the PNGs, and --verify catching NaN and truncated files by shard."""

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
from latentforge.app.inspect_cache import CELL
from latentforge.shared.cache_format import bucket_name
from latentforge.shared.cache_reader import CacheReader

BF16_NAN = 0x7FC0


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


def test_model_is_required_for_grids_only(small_cache, tmp_path, capsys):
    assert main(["inspect", str(small_cache), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model" in err and "weight hashes" in err
    assert not (tmp_path / "a").exists()
    assert main(["inspect", str(small_cache), "--out", str(tmp_path / "b"), "--per-bucket", "0"]) == 0
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["buckets.png"]


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
