"""Every model family end to end on CPU with its tiny offline model:
cache -> train (2 steps) -> export -> load the exported pipeline -> 2-step inference."""

from __future__ import annotations

from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

from latentforge.devkit.tiny_models import build_tiny_pipeline
from latentforge.preprocess.job import run_cache
from latentforge.shared.cache_reader import CacheReader
from latentforge.shared.config import load_config
from latentforge.train.export import export_pipeline
from latentforge.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
             "pixart_sigma": "PixArtSigmaPipeline", "sana": "SanaPipeline"}
FIELDS = {"sd1": {"prompt_embeds": (77, 32)}, "sd2": {"prompt_embeds": (77, 48)},
          "pixart_sigma": {"prompt_embeds": (300, 32), "prompt_mask": (300,)},
          "sana": {"prompt_embeds": (300, 32), "prompt_mask": (300,)}}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(PIPELINES))
def test_family_cache_train_export_infer(family, demo_data, tmp_path):
    model = build_tiny_pipeline(family, tmp_path / f"tiny-{family}")
    sources = f"data.sources=[{{type: webdataset, path: '{demo_data}/webdataset/0000{{0..1}}.tar'}}]"
    overrides = [f"model.family={family}", f"model.pretrained={model}", sources, f"cache.path={tmp_path / 'cache'}",
                 f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.checkpoint_every=2",
                 "train.validation_every=2", "train.validation_inference_steps=2", "train.num_workers=0",
                 "train.held_out_fraction=0.2",
                 "cache.latent_mode=mean",
                 # demo.yaml's min-SNR does not apply to flow matching, which refuses it (train/noise_options.py).
                 *(["train.snr_gamma=null"] if family == "sana" else [])]
    config = load_config(ROOT / "configs" / "demo.yaml", overrides)
    assert run_cache(config) == 0

    cache = CacheReader(str(tmp_path / "cache"))
    assert cache.spec.family == family and cache.num_samples == 16
    latent_channels, downsample = (32, 32) if family == "sana" else (4, 8)
    assert cache.spec.vae_downsample == downsample
    bucket, n = next(iter(cache.bucket_counts().items()))
    rows = cache.read_rows(bucket, range(n))
    assert rows["latent_mean"].shape == (n, latent_channels, bucket[0] // downsample, bucket[1] // downsample)
    for name, shape in FIELDS[family].items():
        assert tuple(rows[name].shape[1:]) == shape, name
    if "prompt_mask" in rows:  # padding is stored as zeros, so it compresses
        pad = rows["prompt_mask"] == 0
        assert pad.any() and not rows["prompt_embeds"][pad].any()

    trainer = Trainer(config)
    trainer.train()
    assert len(trainer.history) == 2 and all(np.isfinite(trainer.history))
    assert (tmp_path / "run" / "validation" / "step-00000002.png").is_file()  # decoded from cached embeddings

    out = export_pipeline(tmp_path / "run" / "checkpoints" / "step-00000002", tmp_path / "export")
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(out).to(torch.float32)
    extra = {"use_resolution_binning": False} if family in ("pixart_sigma", "sana") else {}
    image = pipe("a cat on a chair", num_inference_steps=2, height=64, width=64, output_type="np", **extra).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
