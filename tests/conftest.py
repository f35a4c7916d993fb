"""Session-wide, offline fixtures: the tiny SDXL pipeline and the demo photos, built once per test run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Nothing in the tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from latentforge.devkit.tiny_models import build_tiny_pipeline

    return build_tiny_pipeline("sdxl", tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from latentforge.devkit.demo_data import write_demo_data

    root = tmp_path_factory.mktemp("demo") / "data"
    write_demo_data(root)
    return root


@pytest.fixture(scope="session")
def small_cache(tiny_sdxl, demo_data, tmp_path_factory) -> Path:
    """The demo tars cached with the tiny model (posterior kept), shared by the trainer tests."""
    from latentforge.preprocess.job import run_cache
    from latentforge.shared.config import load_config

    cache = tmp_path_factory.mktemp("train-cache") / "cache"
    sources = f"data.sources=[{{type: webdataset, path: '{demo_data}/webdataset/{{00000..00003}}.tar'}}]"
    config = load_config(ROOT / "configs" / "demo.yaml", [f"model.pretrained={tiny_sdxl}", sources, f"cache.path={cache}",
                                                         "cache.latent_mode=dist", "train.output_dir=unused"])
    assert run_cache(config) == 0
    return cache


@pytest.fixture(scope="session")
def unet_only_model(tiny_sdxl, tmp_path_factory) -> Path:
    """A model folder with only what training needs: UNet, scheduler, VAE (for validation images)."""
    folder = tmp_path_factory.mktemp("unet-only") / "model"
    shutil.copytree(tiny_sdxl, folder)
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.rmtree(folder / sub)
    return folder
