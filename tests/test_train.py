"""The trainer on CPU with the tiny SDXL model: no text encoders needed, exact resume, DeepSpeed with
several processes, resume across world sizes, export round trip."""

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

from latentforge.shared.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
FP32_ZERO = "deepspeed={zero_optimization: {stage: %d}, bf16: {enabled: false}}"


@pytest.fixture(scope="module")
def unet_only_model(tiny_sdxl, tmp_path_factory) -> Path:
    """A model folder with only what training needs: UNet, scheduler, VAE (for validation images)."""
    folder = tmp_path_factory.mktemp("unet-only") / "model"
    shutil.copytree(tiny_sdxl, folder)
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.rmtree(folder / sub)
    return folder


def train_args(model: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.pretrained={model}", f"cache.path={cache}", f"train.output_dir={out}", "train.num_workers=0",
            "train.validation_every=0", "train.held_out_fraction=0", "train.log_every=1", "train.caption_dropout=0.2",
            "train.micro_batch_size=2", *extra]


def run_in_process(args: list[str], until: int | None = None) -> list[float]:
    from latentforge.train.trainer import Trainer

    trainer = Trainer(load_config(DEMO, args))
    trainer.train(until=until)
    return trainer.history


def logged_losses(out: Path) -> dict[int, float]:
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return {row["step"]: row["loss"] for row in map(json.loads, lines)}


def test_trainer_imports_no_text_encoder():
    code = ("import sys, latentforge.train.trainer, latentforge.train.validation; "
            "bad = [m for m in sys.modules if m.startswith(('transformers.models.clip', 'transformers.tokenization', "
            "'tokenizers', 'latentforge.preprocess', 'webdataset', 'PIL.JpegImagePlugin'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_resume_is_exact_without_text_encoders_and_export_round_trips(unet_only_model, small_cache, tiny_sdxl, tmp_path):
    common = ["train.max_steps=6", "train.checkpoint_every=3", "train.ema.enabled=true", FP32_ZERO % 2]
    full = run_in_process(train_args(unet_only_model, small_cache, tmp_path / "a", *common))
    assert len(full) == 6 and all(np.isfinite(full))
    first = run_in_process(train_args(unet_only_model, small_cache, tmp_path / "b", *common), until=3)
    resumed = run_in_process(train_args(unet_only_model, small_cache, tmp_path / "b", *common, "train.resume=latest"))
    assert first == full[:3]
    assert resumed == full[3:], (resumed, full)
    ckpts = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-00000003", "step-00000006"]
    assert (tmp_path / "a" / "tensorboard").is_dir()

    from diffusers import StableDiffusionXLPipeline

    from latentforge.train.export import export_pipeline

    ckpt = tmp_path / "a" / "checkpoints" / "step-00000006"
    with pytest.raises(FileNotFoundError, match="full base pipeline"):
        export_pipeline(ckpt, tmp_path / "x")  # the training folder has no text encoders
    for ema in (False, True):
        out = export_pipeline(ckpt, tmp_path / f"export-{ema}", use_ema=ema, base=str(tiny_sdxl))
        from safetensors import safe_open

        with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        pipe = StableDiffusionXLPipeline.from_pretrained(out)
        image = pipe.to(torch.float32)("a cat", num_inference_steps=2, height=64, width=64, output_type="np").images
        assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    trained = StableDiffusionXLPipeline.from_pretrained(tmp_path / "export-False").unet.state_dict()
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl).unet.state_dict()
    assert any(not torch.equal(trained[k], base[k].half()) for k in base), "export holds the untrained weights"


def test_cache_model_mismatch_fails_before_step_one(small_cache, tmp_path, tiny_sdxl):
    other = tmp_path / "wide"
    shutil.copytree(tiny_sdxl, other)
    cfg_path = other / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["cross_attention_dim"] = 128
    cfg_path.write_text(json.dumps(cfg))
    (other / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    from diffusers import UNet2DConditionModel

    from latentforge.shared.cache_format import CacheMismatchError
    from latentforge.train.families.sdxl import SdxlAdapter

    UNet2DConditionModel.from_config(cfg).save_pretrained(other / "unet")
    with pytest.raises(CacheMismatchError, match="prompt_embeds width: cache has 96, model expects 128"):
        run_in_process(train_args(other, small_cache, tmp_path / "run", "train.max_steps=1"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert SdxlAdapter.family == "sdxl"


def torchrun_train(nproc: int, args: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "latentforge.train", "--config", str(DEMO), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_two_process_zero2_matches_one_process_and_resumes_across_world_sizes(unet_only_model, small_cache, tmp_path):
    # Same global batch (4): one process accumulates two micro-batches, two processes take one each.
    # A constant lr keeps the schedule independent of max_steps, so a 3-step run is a true prefix.
    flat = ("train.lr_scheduler=constant", "train.warmup_steps=0")
    one = train_args(unet_only_model, small_cache, tmp_path / "one", *flat, "train.max_steps=6",
                     "train.gradient_accumulation_steps=2", "train.checkpoint_every=100", FP32_ZERO % 0)
    baseline = run_in_process(one)
    two = train_args(unet_only_model, small_cache, tmp_path / "two", *flat, "train.max_steps=4", "train.checkpoint_every=100", FP32_ZERO % 2)
    torchrun_train(2, two)
    losses = logged_losses(tmp_path / "two")
    np.testing.assert_allclose([losses[s] for s in range(1, 5)], baseline[:4], rtol=2e-4, atol=1e-5)
    # Two processes train 3 steps and checkpoint; one process resumes with accumulation: same sample order.
    split = train_args(unet_only_model, small_cache, tmp_path / "split", *flat, "train.max_steps=3", "train.checkpoint_every=3", FP32_ZERO % 0)
    torchrun_train(2, split)
    resumed = run_in_process(train_args(unet_only_model, small_cache, tmp_path / "split", *flat, "train.max_steps=6",
                                        "train.gradient_accumulation_steps=2", "train.resume=latest", FP32_ZERO % 0))
    np.testing.assert_allclose(resumed, baseline[3:], rtol=2e-4, atol=1e-5)
