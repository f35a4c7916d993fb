"""Guarantee 4: a cache that does not fit the run fails before step 1 with one line naming both sides
(another family, other text widths, other VAE / text-encoder weights, a newer or older format version, a
group whose source is no longer configured), and a
cache whose files were deleted or corrupted after commit is detected with the file and its shard (cache
group) named, through the trainer too. See docs/reliability.md."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from reliability_support import DEMO, FP32_ZERO2, run_cli

from latentforge.shared.cache_format import FORMAT_VERSION, CacheFormatError, CacheMismatchError
from latentforge.shared.cache_reader import CacheReader
from latentforge.shared.config import load_config


def train_args(model: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.pretrained={model}", f"cache.path={cache}", f"train.output_dir={out}", "train.num_workers=0",
            "train.validation_every=0", "train.held_out_fraction=0", "train.micro_batch_size=2", "train.max_steps=2",
            "train.checkpoint_every=100", FP32_ZERO2, *extra]


def start(args: list[str]):
    from latentforge.train.trainer import Trainer

    return Trainer(load_config(DEMO, args))


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text.strip(), text
    return text


@pytest.fixture
def cache_copy(small_cache, tmp_path) -> Path:
    return Path(shutil.copytree(small_cache, tmp_path / "cache"))


def groups_and_buckets(cache: Path) -> list[tuple[str, str]]:
    reader = CacheReader(str(cache))
    pairs = [(g.group_id, b) for g in sorted(reader.groups, key=lambda g: g.group_id) for b in sorted(g.bucket_counts)]
    reader.close()
    return pairs


def files_of(cache: Path, field: str) -> list[Path]:
    return sorted(p for gid, b in groups_and_buckets(cache) for p in (cache / "shards" / gid / b / field / "c").rglob("*")
                  if p.is_file())


# ------------------------------------------------------------------------------- model mismatches
def test_cache_of_another_family_fails_before_step_one(cache_copy, tiny_sdxl, tmp_path):
    spec = json.loads((cache_copy / "cache.json").read_text())
    spec["family"] = "sd1"
    (cache_copy / "cache.json").write_text(json.dumps(spec))
    with pytest.raises(CacheMismatchError) as err:
        start(train_args(tiny_sdxl, cache_copy, tmp_path / "run"))
    assert "model family: cache has sd1, model expects sdxl" in one_line(err)
    assert not (tmp_path / "run").exists()


def test_cache_with_other_text_widths_fails_before_step_one(small_cache, tiny_sdxl, tmp_path):
    other = Path(shutil.copytree(tiny_sdxl, tmp_path / "wide"))
    cfg = json.loads((other / "unet" / "config.json").read_text())
    cfg["cross_attention_dim"] = 128
    from diffusers import UNet2DConditionModel

    (other / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    UNet2DConditionModel.from_config(cfg).save_pretrained(other / "unet")
    with pytest.raises(CacheMismatchError) as err:
        start(train_args(other, small_cache, tmp_path / "run"))
    assert "prompt_embeds width: cache has 96, model expects 128" in one_line(err)
    assert not (tmp_path / "run").exists()


def _perturb(folder: Path, weights: str) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / weights
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def other_vae_model(tiny_sdxl, tmp_path_factory) -> Path:
    """Same architecture and widths as the cache's model, different VAE weights."""
    other = Path(shutil.copytree(tiny_sdxl, tmp_path_factory.mktemp("other-vae") / "model"))
    _perturb(other, "vae/diffusion_pytorch_model.safetensors")
    return other


def test_cache_from_another_vae_or_text_encoder_is_named(small_cache, tiny_sdxl, other_vae_model, tmp_path):
    reader = CacheReader(str(small_cache))
    reader.check_model_files(str(tiny_sdxl))  # the model the cache was made with
    unet_only = Path(shutil.copytree(tiny_sdxl, tmp_path / "unet-only", ignore=shutil.ignore_patterns("vae", "text_*")))
    reader.check_model_files(str(unet_only))  # nothing to compare: fine
    with pytest.raises(CacheMismatchError) as err:
        reader.check_model_files(str(other_vae_model))
    line = one_line(err)
    assert "VAE weights vae/diffusion_pytorch_model.safetensors (sha256): cache has" in line
    assert str(other_vae_model / "vae") in line
    with pytest.raises(CacheMismatchError, match="VAE weights"):  # the same VAE given as model.vae
        reader.check_model_files(str(tiny_sdxl), vae=str(other_vae_model / "vae"))
    other_text = Path(shutil.copytree(tiny_sdxl, tmp_path / "other-text"))
    weights = next(p.relative_to(other_text) for p in (other_text / "text_encoder_2").glob("*.safetensors"))
    _perturb(other_text, str(weights))
    with pytest.raises(CacheMismatchError, match=f"text encoder weights {weights}"):
        reader.check_model_files(str(other_text))


def test_trainer_refuses_a_cache_from_another_vae(small_cache, other_vae_model, tmp_path):
    with pytest.raises(CacheMismatchError, match="VAE weights"):
        start(train_args(other_vae_model, small_cache, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_trainer_refuses_a_cache_group_whose_source_is_not_configured(small_cache, tiny_sdxl, tmp_path):
    """Each group's `repeats` come from the source it records; a source gone from data.sources is named."""
    with pytest.raises(CacheMismatchError) as err:
        start(train_args(tiny_sdxl, small_cache, tmp_path / "run", "data.sources=[{type: folder, path: elsewhere}]"))
    line = one_line(err)
    assert line.startswith("cache group s0-0000") and "(webdataset), which is not in data.sources: add it back" in line
    assert not (tmp_path / "run").exists()


def test_newer_or_older_format_version_fails_before_step_one(cache_copy, tiny_sdxl, tmp_path):
    spec = json.loads((cache_copy / "cache.json").read_text())
    spec["format_version"] = FORMAT_VERSION + 1
    (cache_copy / "cache.json").write_text(json.dumps(spec))
    with pytest.raises(CacheFormatError) as err:
        start(train_args(tiny_sdxl, cache_copy, tmp_path / "run"))
    assert (f"cache format version {FORMAT_VERSION + 1} is newer than this latentforge reads "
            f"(version {FORMAT_VERSION})") in one_line(err)
    spec["format_version"] = FORMAT_VERSION - 1  # an older cache: the line names the re-cache command
    (cache_copy / "cache.json").write_text(json.dumps(spec))
    with pytest.raises(CacheFormatError) as err:
        start(train_args(tiny_sdxl, cache_copy, tmp_path / "run"))
    assert f"cache format version {FORMAT_VERSION - 1} is older" in one_line(err) and "--overwrite" in one_line(err)
    spec["format_version"] = FORMAT_VERSION
    (cache_copy / "cache.json").write_text(json.dumps(spec))
    gid = groups_and_buckets(cache_copy)[0][0]
    commit = cache_copy / "shards" / gid / "commit.json"
    doc = json.loads(commit.read_text())
    doc["format_version"] = FORMAT_VERSION + 1
    commit.write_text(json.dumps(doc))
    with pytest.raises(CacheFormatError) as err:
        start(train_args(tiny_sdxl, cache_copy, tmp_path / "run"))
    assert f"{gid}/commit.json: group format version {FORMAT_VERSION + 1} is newer than {FORMAT_VERSION}" in one_line(err)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ files changed after commit
def test_a_deleted_key_chunk_is_named_with_its_shard_before_step_one(cache_copy, tiny_sdxl, tmp_path):
    """zarr reads a missing chunk as fill values (empty keys, zero sizes): the reader must not."""
    victim = files_of(cache_copy, "key")[0]
    victim.unlink()
    gid = victim.relative_to(cache_copy / "shards").parts[0]
    with pytest.raises(CacheFormatError) as err:
        start(train_args(tiny_sdxl, cache_copy, tmp_path / "run"))
    assert f"{victim} is missing (cache group {gid})" in one_line(err)
    assert not (tmp_path / "run").exists()


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["small-field bytes", "shard index", "truncated shard", "deleted shard"])
def test_damaged_files_are_named_with_their_shard_when_read(damage, cache_copy):
    """What the trainer's batches go through (`read_rows` of the fields it trains on)."""
    field = "original_size" if damage == "small-field bytes" else "latent_mean"
    victims = files_of(cache_copy, field)
    for path in victims:
        if damage == "small-field bytes":
            _flip(path, path.stat().st_size // 2)
        elif damage == "shard index":
            _flip(path, path.stat().st_size - 10)
        elif damage == "truncated shard":
            os.truncate(path, path.stat().st_size - 1)
        else:
            path.unlink()
    expected = {"small-field bytes": "checksum mismatch", "shard index": "shard index checksum mismatch",
                "truncated shard": "does not match the committed size", "deleted shard": "is missing"}[damage]
    reader = CacheReader(str(cache_copy))
    bucket, n = next(iter(reader.bucket_counts().items()))
    with pytest.raises(CacheFormatError) as err:
        reader.read_rows(bucket, range(n), fields=["latent_mean", "original_size"])
    line = one_line(err)
    assert expected in line and "(cache group s" in line and any(str(v) in line for v in victims), line
    # verify() finds every damaged file, by shard, whatever the damage.
    problems = CacheReader(str(cache_copy)).verify(checksums=True)
    assert len(problems) == len(victims) and all("(shard s" in p for p in problems), problems


def test_bit_flips_inside_latents_are_found_by_verify(cache_copy):
    victim = files_of(cache_copy, "latent_mean")[0]
    _flip(victim, 40)  # inside the first row's compressed data; size unchanged
    problems = CacheReader(str(cache_copy)).verify(checksums=True)
    assert problems == [f"{victim}: checksum mismatch (shard {victim.relative_to(cache_copy / 'shards').parts[0]})"]


@pytest.mark.slow
def test_trainer_names_a_truncated_shard_in_one_line_from_a_dataloader_worker(cache_copy, tiny_sdxl, tmp_path):
    """Through the real CLI with a DataLoader worker process: the error crosses the worker boundary and
    is still one line naming the file and its shard; nothing trains."""
    for path in files_of(cache_copy, "latent_mean"):
        os.truncate(path, path.stat().st_size - 1)
    out = tmp_path / "run"
    args = [a for a in train_args(tiny_sdxl, cache_copy, out) if not a.startswith("train.num_workers")]
    rc, _, err = run_cli(["train", "--config", str(DEMO), *args, "train.num_workers=1"], tmp_path / "log")
    assert rc == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("latentforge train: ") and "does not match the committed size" in last, err[-3000:]
    assert "(cache group s" in last and "Traceback" not in err
    assert not (out / "train_log.jsonl").exists() and not (out / "checkpoints").exists()

