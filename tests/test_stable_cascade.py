"""Stable Cascade Stage C end to end on CPU with the tiny offline cascade (devkit/tiny_cascade.py):
cache (EfficientNet latents, CLIP-bigG fields, explicit aspect-ratio buckets) -> 2 DeepSpeed steps with the GDF
objective and a validation PNG through prior, Stage B and Paella VQ -> export -> StableCascadePriorPipeline
loads it -> 2-step inference, then the decoder on its output; and the same with LoRA (export --merge)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from latentforge.devkit.tiny_models import build_tiny_pipeline
from latentforge.preprocess.job import run_cache
from latentforge.shared.cache_reader import CacheReader
from latentforge.shared.config import load_config
from latentforge.train.export import export_pipeline
from latentforge.train.families.cascade import load_decoder
from latentforge.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RATIOS = "buckets.aspect_ratios=['1/1', '3/4', '9/16']"


def _config(model: Path, demo_data: Path, tmp: Path, *extra: str):
    sources = f"data.sources=[{{type: webdataset, path: '{demo_data}/webdataset/0000{{0..1}}.tar'}}]"
    return load_config(ROOT / "configs" / "demo.yaml", [
        "model.family=stable_cascade", f"model.pretrained={model}", sources, f"cache.path={tmp / 'cache'}",
        f"train.output_dir={tmp / 'run'}", "train.max_steps=2", "train.checkpoint_every=2", "train.backup_every=1",
        "train.keep_last=1", "train.validation_every=2", "train.validation_inference_steps=2", "train.num_workers=0",
        "train.held_out_fraction=0.2", "buckets.step=32", RATIOS, "cache.latent_mode=mean",
        "train.ema.start_step=1", "train.snr_gamma=null", *extra])


def _infer(folder: Path, model: Path) -> None:
    import diffusers

    pipe = diffusers.StableCascadePriorPipeline.from_pretrained(folder).to(torch.float32)
    out = pipe("a cat on a chair", num_inference_steps=2, height=256, width=256, output_type="pt")
    assert out.image_embeddings.shape == (1, 16, 8, 8) and torch.isfinite(out.image_embeddings).all()
    decoder = load_decoder(str(model / "decoder"))
    images = decoder(image_embeddings=out.image_embeddings, prompt_embeds=out.prompt_embeds,
                     prompt_embeds_pooled=out.prompt_embeds_pooled, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 256, 256, 3) and np.isfinite(images).all()


@pytest.fixture(scope="module")
def tiny_cascade(tmp_path_factory) -> Path:
    return build_tiny_pipeline("stable_cascade", tmp_path_factory.mktemp("models") / "tiny-stable-cascade")


@pytest.mark.slow
def test_stable_cascade_cache_train_export_infer(tiny_cascade, demo_data, tmp_path):
    config = _config(tiny_cascade, demo_data, tmp_path)
    assert run_cache(config) == 0

    cache = CacheReader(str(tmp_path / "cache"))
    assert cache.spec.family == "stable_cascade" and cache.spec.vae_downsample == 32
    assert set(cache.spec.buckets) == {(256, 256), (288, 192), (192, 288), (320, 192), (192, 320)}
    bucket, n = next(iter(cache.bucket_counts().items()))
    rows = cache.read_rows(bucket, range(n))
    assert rows["latent_mean"].shape == (n, 16, bucket[0] // 32, bucket[1] // 32)
    assert tuple(rows["prompt_embeds"].shape[1:]) == (77, 32) and tuple(rows["pooled_prompt_embeds"].shape[1:]) == (32,)

    # Another Stage C encoder than the cache's is refused, naming its file.
    import shutil

    from latentforge.devkit.tiny_cascade import save_tiny_effnet
    from latentforge.shared.cache_format import CacheMismatchError

    other = tmp_path / "other-model"
    shutil.copytree(tiny_cascade, other)
    save_tiny_effnet(other / "effnet", seed=7)
    with pytest.raises(CacheMismatchError, match="effnet/effnet_encoder.safetensors"):
        cache.check_model_files(str(other))

    trainer = Trainer(config)
    trainer.train()
    assert len(trainer.history) == 2 and all(np.isfinite(trainer.history))
    png = tmp_path / "run" / "validation" / "step-00000002.png"
    assert png.is_file()  # prior -> Stage B -> Paella VQ, from the cached prompt embeddings
    from PIL import Image

    from latentforge.train.grid_labels import CAPTION_H, NAME_W

    # Two prompts side by side, labelled; rows base, current and ema (demo.yaml's EMA is on).
    assert Image.open(png).size == (NAME_W + 256 * 2, 3 * (CAPTION_H + 256))
    # backup_every=1 keeps step 1 beside the keep_last=1 rotation.
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == ["step-00000001", "step-00000002"]

    out = export_pipeline(tmp_path / "run" / "checkpoints" / "step-00000002", tmp_path / "export")
    _infer(out, tiny_cascade)
    ema = export_pipeline(tmp_path / "run" / "checkpoints" / "step-00000002", tmp_path / "export-ema", use_ema=True)
    _infer(ema, tiny_cascade)


@pytest.mark.slow
def test_stable_cascade_lora_merge_export(tiny_cascade, demo_data, tmp_path):
    config = _config(tiny_cascade, demo_data, tmp_path, "train.lora.enabled=true", "train.lora.rank=4",
                     "train.lora.alpha=1.0", "train.lr=1e-2", "train.ema.enabled=false", "train.validation_every=0",
                     "train.lora.target_modules=['attention.to_q', 'attention.to_k', 'attention.to_v', 'attention.to_out.0']")
    assert run_cache(config) == 0
    trainer = Trainer(config)
    trainable = {n for n, p in trainer.engine.module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".attention.to_" in n for n in trainable)
    trainer.train()
    assert all(np.isfinite(trainer.history))
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    with pytest.raises(FileNotFoundError, match="--merge"):
        export_pipeline(ckpt, tmp_path / "adapter")
    _infer(export_pipeline(ckpt, tmp_path / "merged", merge=True), tiny_cascade)
