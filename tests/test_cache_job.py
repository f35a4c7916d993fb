"""The cache job end to end on CPU with the tiny SDXL model and the demo photos."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_support import snapshot

from latentforge.preprocess.job import run_cache
from latentforge.shared.cache_format import UPSCALE_METHODS
from latentforge.shared.cache_reader import CacheReader
from latentforge.shared.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def overrides(tiny: Path, data: Path, cache: Path, *extra: str) -> list[str]:
    # The demo config also has a folder copy of the same photos; these tests cache the tars only.
    sources = f"data.sources=[{{type: webdataset, path: '{data}/webdataset/{{00000..00003}}.tar'}}]"
    return [f"model.pretrained={tiny}", sources, f"cache.path={cache}", f"train.output_dir={cache.parent / 'run'}", *extra]


@pytest.fixture(scope="module")
def demo_cache(tiny_sdxl, demo_data, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("jobs") / "cache"
    config = load_config(DEMO, overrides(tiny_sdxl, demo_data, cache, "cache.latent_mode=dist", "cache.flip=true"))
    assert run_cache(config) == 0
    return cache


def test_every_field_lands_with_shape_and_dtype(demo_cache):
    reader = CacheReader(str(demo_cache))
    reader.check_compatible(family="sdxl", latent_channels=4,
                            field_widths={"prompt_embeds": 96, "pooled_prompt_embeds": 64})
    assert reader.num_samples == 2 * 28  # flip doubles every sample
    for bucket, n in reader.bucket_counts().items():
        rows = reader.read_rows(bucket, range(n))
        h, w = bucket
        assert rows["latent_mean"].shape == (n, 4, h // 8, w // 8) and rows["latent_mean"].dtype == torch.bfloat16
        assert rows["latent_std"].shape == (n, 4, h // 8, w // 8) and (rows["latent_std"].float() > 0).all()
        assert rows["prompt_embeds"].shape == (n, 77, 96) and rows["pooled_prompt_embeds"].shape == (n, 64)
        assert rows["target_size"].tolist() == [[h, w]] * n
        assert torch.isfinite(rows["latent_mean"].float()).all()
        assert rows["original_size"].dtype == torch.int32 and rows["crop_top_left"].dtype == torch.int32
        # flipped twin: same source, mirrored crop
        keys = rows["key"]
        for i, key in enumerate(keys):
            if key.endswith("#flip"):
                j = keys.index(key.removesuffix("#flip"))
                assert torch.equal(rows["content_hash"][i], rows["content_hash"][j])
    summary = json.loads((demo_cache / "summary.json").read_text())
    assert summary["samples"] == 56 and summary["skipped_total"] == 0
    _, prompts, val = reader.prompts()
    assert len(prompts) == 2 and val["prompt_embeds"].shape == (2, 77, 96)


def test_upscaled_samples_keep_their_pre_upscale_size(demo_cache):
    reader = CacheReader(str(demo_cache))
    seen = 0
    for bucket, n in reader.bucket_counts().items():
        rows = reader.read_rows(bucket, range(n), fields=["original_size", "target_size", "upscale_method"])
        for orig, target, method in zip(rows["original_size"], rows["target_size"], rows["upscale_method"], strict=True):
            scale = max(target[0] / orig[0], target[1] / orig[1])
            if scale > 1:  # enlarged: original_size is the small source, and the path is recorded
                assert int(method) == UPSCALE_METHODS["lanczos"]
                assert min(orig.tolist()) < 256
                seen += 1
            else:
                assert int(method) == UPSCALE_METHODS["none"]
    assert seen >= 4


def test_groups_record_their_source_and_training_finds_it_in_any_order(tiny_sdxl, demo_data, tmp_path):
    """The cache job writes each group's configured source into its manifest; the trainer takes `repeats`
    from the source with that path, wherever the training config lists it, and names a source that is gone."""
    from latentforge.shared.cache_format import CacheMismatchError, SourceOrigin
    from latentforge.train.data import CachedSamples

    a, b = (f"{demo_data}/webdataset/0000{i}.tar" for i in (0, 1))
    cache = tmp_path / "cache"

    def config(*sources: str):
        return load_config(DEMO, [*overrides(tiny_sdxl, demo_data, cache), f"data.sources=[{', '.join(sources)}]",
                                  "train.held_out_fraction=0"])

    assert run_cache(config(f"{{type: webdataset, path: '{a}', repeats: 3}}", f"{{type: webdataset, path: '{b}'}}")) == 0
    reader = CacheReader(str(cache))
    assert {m.group_id: m.origin for m in reader.groups} == {"s0-00000": SourceOrigin(0, "webdataset", a),
                                                            "s1-00001": SourceOrigin(1, "webdataset", b)}
    per_group = {m.group_id: m.num_samples for m in reader.groups}
    swapped = CachedSamples(reader, config(f"{{type: webdataset, path: '{b}'}}",
                                           f"{{type: webdataset, path: '{a}', repeats: 3}}"))
    assert swapped.num_train == 3 * per_group["s0-00000"] + per_group["s1-00001"]
    with pytest.raises(CacheMismatchError) as err:
        CachedSamples(reader, config(f"{{type: webdataset, path: '{b}'}}"))
    assert str(err.value).startswith(f"cache group s0-00000 came from source '{a}' (webdataset), which is not in "
                                     "data.sources") and "\n" not in str(err.value)


def test_rerun_of_finished_cache_encodes_nothing(demo_cache, tiny_sdxl, demo_data, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in (demo_cache / "shards").rglob("*") if p.is_file()}
    from latentforge.preprocess import job

    def no_encoding(*args, **kwargs):
        raise AssertionError("a finished shard was encoded again")

    monkeypatch.setattr(job.CacheJob, "cache_shard", no_encoding)
    config = load_config(DEMO, overrides(tiny_sdxl, demo_data, demo_cache, "cache.latent_mode=dist", "cache.flip=true"))
    assert run_cache(config) == 0
    after = {p: p.stat().st_mtime_ns for p in (demo_cache / "shards").rglob("*") if p.is_file()}
    assert before == after


def test_changing_one_caption_recaches_only_its_shard(tiny_sdxl, demo_data, tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(demo_data / "folder", folder)
    cache = tmp_path / "cache"
    extra = [f"data.sources=[{{type: folder, path: '{folder}', shard_size: 8}}]"]
    config = load_config(DEMO, overrides(tiny_sdxl, demo_data, cache, *extra))
    assert run_cache(config) == 0
    first = {m.group_id: m for m in CacheReader(str(cache)).groups}
    before = snapshot(cache)
    assert len(first) == 4 and len(before) == 28
    caption = sorted(folder.rglob("*.txt"))[-1]
    caption.write_text("a completely different caption about a lighthouse", encoding="utf-8")
    assert run_cache(config) == 0
    second = {m.group_id: m for m in CacheReader(str(cache)).groups}
    changed = [g for g in first if first[g].stats["finished_at"] != second[g].stats["finished_at"]]
    assert len(changed) == 1
    after = snapshot(cache)
    assert before.keys() == after.keys()
    differ = [k for k in before if not np.array_equal(before[k]["prompt_embeds"], after[k]["prompt_embeds"])]
    assert len(differ) == 1 and caption.stem in differ[0]


def _torchrun(nproc: int, args: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "latentforge.preprocess", "--config", str(DEMO), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_make_the_same_cache_as_one(demo_cache, tiny_sdxl, demo_data, tmp_path):
    cache = tmp_path / "cache2"
    _torchrun(2, overrides(tiny_sdxl, demo_data, cache, "cache.latent_mode=dist", "cache.flip=true"))
    one, two = snapshot(demo_cache), snapshot(cache)
    assert one.keys() == two.keys()
    for key in one:
        for field, value in one[key].items():
            assert np.array_equal(value, two[key][field]), (key, field)
    groups = sorted(p.name for p in (cache / "shards").iterdir() if not p.name.startswith("."))
    assert len(groups) == 4


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates_or_holes(demo_cache, tiny_sdxl, demo_data, tmp_path):
    cache = tmp_path / "cache3"
    args = overrides(tiny_sdxl, demo_data, cache, "cache.latent_mode=dist", "cache.flip=true")
    # One process needs no launcher: the job's module killed by its own hook, then re-run in this process.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LATENTFORGE_FAULT_KILL_AFTER_COMMITS": "2"}
    crashed = subprocess.run([sys.executable, "-m", "latentforge.preprocess", "--config", str(DEMO), *args],
                             capture_output=True, text=True, env=env, timeout=600)
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    committed = [p for p in (cache / "shards").iterdir() if (p / "commit.json").exists()]
    assert len(committed) == 2, "the fault hook should have killed the job after two commits"
    assert run_cache(load_config(DEMO, args)) == 0
    one, resumed = snapshot(demo_cache), snapshot(cache)
    assert one.keys() == resumed.keys()
    for key in one:
        for field, value in one[key].items():
            assert np.array_equal(value, resumed[key][field]), (key, field)


@pytest.mark.slow
def test_preparation_in_worker_processes_gives_the_same_cache_and_skips_a_crash(demo_cache, tiny_sdxl, demo_data,
                                                                                 tmp_path, monkeypatch):
    # 2 spawned preparation processes instead of threads: bit for bit the same arrays.
    cache = tmp_path / "procs"
    config = load_config(DEMO, overrides(tiny_sdxl, demo_data, cache, "cache.latent_mode=dist", "cache.flip=true",
                                         "cache.prepare_processes=2"))
    assert run_cache(config) == 0
    one, two = snapshot(demo_cache), snapshot(cache)
    assert one.keys() == two.keys()
    for key in one:
        for field, value in one[key].items():
            assert np.array_equal(value, two[key][field]), (key, field)
    # A worker that dies on a sample: the pool restarts, that sample is skipped, the others are cached.
    victim = CacheReader(str(cache)).keys(*next((b, [0]) for b in CacheReader(str(cache)).bucket_counts()))[0]
    monkeypatch.setenv("LATENTFORGE_FAULT_PREPARE_CRASH_KEY", victim.removesuffix("#flip"))
    crashed = tmp_path / "crashed"
    config = load_config(DEMO, overrides(tiny_sdxl, demo_data, crashed, "cache.prepare_processes=1",
                                         "cache.max_skip_fraction=1"))
    assert run_cache(config) == 0
    reader = CacheReader(str(crashed))
    skipped = [json.loads(p.read_text())["skipped"] for p in (crashed / "shards").glob("*/commit.json")]
    assert sum(s.get("prepare_crashed", {}).get("count", 0) for s in skipped) == 1
    keys = {k for b, n in reader.bucket_counts().items() for k in reader.keys(b, list(range(n)))}
    assert victim.removesuffix("#flip") not in keys and len(keys) == sum(reader.bucket_counts().values())
