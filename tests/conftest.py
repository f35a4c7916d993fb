"""Offline fixtures: the tiny SDXL pipeline and the demo photos (built once per test run), and a small cache
copied to a loopback S3 server (per test)."""

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


@pytest.fixture
def s3_cache(small_cache, monkeypatch):
    """small_cache copied to s3://<fresh bucket>/c on a loopback server; botocore's own retries off, so the
    reader's retries are what is tested. Yields (server, url, storage options)."""
    import uuid

    from latentforge.devkit.object_store import loopback_s3, upload_tree

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    with loopback_s3() as server:
        # moto keeps its buckets per process, shared by every server in it: a bucket name of our own.
        url = f"s3://lf-objstore-{uuid.uuid4().hex[:12]}/c"
        upload_tree(server.endpoint, str(small_cache), url)
        opts = {"endpoint_url": server.endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}}
        yield server, url, opts
