"""Caption variety: tag shuffles and variant lists by hand, the train-time pick, and a cache with 3 captions
per image whose extra embeddings are the text encoder's output for those captions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_train import DEMO

from latentforge.preprocess.captions import caption_variants, shuffle_tags
from latentforge.shared.config import SourceConfig, load_config
from latentforge.train.captions import pick_caption_variants


def test_shuffle_tags_keeps_the_leading_tokens() -> None:
    caption = "sks dog, red collar, running, beach, sunset"
    out = shuffle_tags(caption, 1, "k", 1)
    assert out.split(", ")[0] == "sks dog" and sorted(out.split(", ")) == sorted(caption.split(", "))
    assert out == shuffle_tags(caption, 1, "k", 1)  # seeded by (key, variant)
    assert {shuffle_tags(caption, 1, "k", j) for j in range(1, 8)} != {out}
    assert shuffle_tags(caption, 5, "k", 3) == caption  # everything kept


def test_caption_variants_fields_then_shuffles_then_repeat() -> None:
    src = SourceConfig(type="folder", path="x", extra_caption_fields=["long", "tags"])
    meta = {"long": "a long caption", "tags": ["dog", "beach"], "other": "no"}
    assert caption_variants("a dog", meta, src, 4, "k") == ("a dog", "a long caption", "dog, beach", "a dog")
    assert caption_variants("a dog", {}, src, 2, "k") == ("a dog", "a dog")  # missing fields: repeat
    shuffled = SourceConfig(type="folder", path="x", tag_shuffle=True, keep_tokens=1)
    out = caption_variants("sks, a, b, c", {}, shuffled, 3, "key")
    assert out[0] == "sks, a, b, c" and len(set(out)) == 3 and all(o.startswith("sks, ") for o in out)


def test_pick_is_seeded_and_swaps_whole_samples() -> None:
    base = torch.zeros(5, 3, 2)
    alt = torch.stack([torch.full((5, 3, 2), float(v)) for v in (1, 2)], dim=1)  # (B, 2, 3, 2): variants 1, 2
    pooled, pooled_alt = torch.zeros(5, 4), torch.stack([torch.full((5, 4), float(v)) for v in (1, 2)], dim=1)
    batch = {"prompt_embeds": base, "prompt_embeds_alt": alt, "pooled_prompt_embeds": pooled,
             "pooled_prompt_embeds_alt": pooled_alt, "step": 3}
    out = pick_caption_variants(batch, torch.Generator().manual_seed(0))
    k = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(0))
    assert out["prompt_embeds"][:, 0, 0].tolist() == k.float().tolist()
    assert out["pooled_prompt_embeds"][:, 0].tolist() == k.float().tolist()  # text and pooled stay together
    assert "prompt_embeds_alt" not in out and out["step"] == 3 and "prompt_embeds_alt" in batch
    plain = {"prompt_embeds": base}
    g = torch.Generator().manual_seed(0)
    assert pick_caption_variants(plain, g) is plain and torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())


@pytest.mark.slow
def test_cache_with_three_captions_per_image_trains(tiny_sdxl, demo_data, tmp_path: Path) -> None:
    from latentforge.preprocess.families import load_text_encoder
    from latentforge.preprocess.job import run_cache
    from latentforge.shared.cache_reader import CacheReader
    from latentforge.train.trainer import Trainer

    folder = tmp_path / "tagged"
    folder.mkdir()
    for n, img in enumerate(sorted((demo_data / "folder").glob("*.jpg"))[:4]):
        shutil.copy(img, folder / f"img{n}.jpg")
        (folder / f"img{n}.txt").write_text(f"subject{n}, red, blue, green, yellow")
        (folder / f"img{n}.json").write_text(json.dumps({"long": f"a long description of image {n}"}))
    source = f"{{type: folder, path: '{folder}', extra_caption_fields: [long], tag_shuffle: true, keep_tokens: 1}}"
    config = load_config(DEMO, [f"model.pretrained={tiny_sdxl}", f"data.sources=[{source}]", "cache.caption_variants=3",
                                f"cache.path={tmp_path / 'cache'}", f"train.output_dir={tmp_path / 'run'}",
                                "buckets.resolutions=[128]", "upscale.enabled=false", "buckets.min_aspect=1.0",
                                "buckets.max_aspect=1.0", "train.num_workers=0", "train.validation_every=0",
                                "train.held_out_fraction=0", "train.max_steps=1", "train.micro_batch_size=2",
                                "train.ema.enabled=false", "deepspeed={zero_optimization: {stage: 0}, bf16: {enabled: false}}"])
    assert run_cache(config) == 0
    summary = json.loads((tmp_path / "cache" / "summary.json").read_text())
    extra = summary["caption_variants"]
    assert extra["per_sample"] == 3 and extra["bytes_per_sample"] > 0
    assert extra["bytes_on_disk"] < summary["bytes_on_disk"]

    reader = CacheReader(str(tmp_path / "cache"))
    (bucket, n), = reader.bucket_counts().items()
    rows = reader.read_rows(bucket, range(n), fields=["key", "prompt_embeds", "prompt_embeds_alt",
                                                       "pooled_prompt_embeds_alt"])
    assert tuple(rows["prompt_embeds_alt"].shape[:2]) == (n, 2) and tuple(rows["pooled_prompt_embeds_alt"].shape[:2]) == (n, 2)
    # Variants 1 and 2 of a sample are the text encoder's embeddings of its long caption and a tag shuffle.
    text = load_text_encoder(config, torch.device("cpu"))
    key = rows["key"][0]
    n_img = int(key[-1])
    wanted = caption_variants(f"subject{n_img}, red, blue, green, yellow", {"long": f"a long description of image {n_img}"},
                              config.data.sources[0], 3, key)
    enc = text.encode(list(wanted))
    for v in (1, 2):
        assert torch.allclose(torch.as_tensor(rows["prompt_embeds_alt"][0, v - 1]).float(),
                              torch.as_tensor(enc["prompt_embeds"][v]).to(torch.bfloat16).float(), atol=1e-2)
    trainer = Trainer(config)
    trainer.train()
    assert trainer.step == 1


def test_fingerprint_counts_variants_only_when_on() -> None:
    from latentforge.shared.cache_fingerprint import fingerprint_inputs

    cache = load_config(DEMO).cache.model_dump()
    common = {"pipeline_version": 1, "family": "sdxl", "model": {}, "buckets": {}, "upscale": {}, "upscale_weights": {}}
    before = fingerprint_inputs(cache={k: v for k, v in cache.items() if k != "caption_variants"}, **common)
    assert fingerprint_inputs(cache=cache, **common) == before  # N = 1: the fingerprint of older caches
    assert fingerprint_inputs(cache={**cache, "caption_variants": 3}, **common)["cache"]["caption_variants"] == 3


def test_variant_settings_without_variants_are_refused() -> None:
    from latentforge.shared.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.sources.0.tag_shuffle needs cache.caption_variants > 1"):
        load_config(DEMO, ["data.sources=[{type: folder, path: x, tag_shuffle: true}]"])
