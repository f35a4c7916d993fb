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
    """The demo tars cached with the tiny model (posterior kept), shared by the trainer tests.

    Cached through demo.yaml's own webdataset source path (relative, `demo/data/...`), from a folder where
    `demo/data` is the demo data: every group then records that source, so the trainer tests, which keep
    demo.yaml's data.sources, find it (a group whose source is not configured is refused)."""
    from latentforge.preprocess.job import run_cache
    from latentforge.shared.config import load_config

    demo = ROOT / "configs" / "demo.yaml"
    tars = next(s.path for s in load_config(demo).data.sources if s.type == "webdataset")
    work = tmp_path_factory.mktemp("train-cache")
    (work / "demo").mkdir()
    (work / "demo" / "data").symlink_to(demo_data, target_is_directory=True)
    cache = work / "cache"
    config = load_config(demo, [f"model.pretrained={tiny_sdxl}", f"data.sources=[{{type: webdataset, path: '{tars}'}}]",
                                f"cache.path={cache}", "cache.latent_mode=dist", "train.output_dir=unused"])
    cwd = os.getcwd()
    os.chdir(work)  # the relative source path resolves here
    try:
        assert run_cache(config) == 0
    finally:
        os.chdir(cwd)
    return cache


@pytest.fixture(scope="session")
def unet_only_model(tiny_sdxl, tmp_path_factory) -> Path:
    """A model folder with only what training needs: UNet, scheduler, VAE (for validation images)."""
    folder = tmp_path_factory.mktemp("unet-only") / "model"
    shutil.copytree(tiny_sdxl, folder)
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.rmtree(folder / sub)
    return folder
