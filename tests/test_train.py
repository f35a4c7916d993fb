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


class _TinyDenoiser(torch.nn.Module):
    """Stands in for a UNet: its prediction depends on the noisy latents and the text embeddings."""

    def forward(self, noisy, timesteps, encoder_hidden_states):
        from types import SimpleNamespace

        return SimpleNamespace(sample=0.5 * noisy + encoder_hidden_states.mean())


def _step_setup(**train: object):
    from latentforge.train import objective as obj
    from latentforge.train.families.sd import Sd1Adapter
    from latentforge.train.step import Objective, StepSetup

    config = load_config(DEMO, ["model.family=sd1", *(f"train.{k}={v}" for k, v in train.items())])
    alphas = torch.linspace(0.99, 0.01, 1000)
    weights = obj.timestep_weights(1000, config.train.timestep_bias)
    objective = Objective(lambda x, n, g: obj.diffusion_pair(x, n, g, alphas, weights, "epsilon", config.train.snr_gamma),
                          "epsilon", alphas)
    empty = {"prompt_embeds": torch.zeros(1, 7, 8)}
    return StepSetup(Sd1Adapter(), objective, config, empty, 0.5, None, torch.device("cpu"), torch.float32)


def _rows(n: int, seed: int, std: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {"latent_mean": torch.randn(n, 4, 8, 8, generator=g), "prompt_embeds": torch.randn(n, 7, 8, generator=g)}
    if std:
        batch["latent_std"] = torch.rand(n, 4, 8, 8, generator=g)
    return batch


def test_held_out_loss_is_the_training_forward_in_evaluation_mode():
    from latentforge.train.step import forward_loss
    from latentforge.train.validation import VALIDATION_SEED, held_out_loss

    model, setup = _TinyDenoiser(), _step_setup(caption_dropout=1.0, noise_offset=0.1)
    quiet = _step_setup(caption_dropout=0.0, noise_offset=0.0)

    def loss(s, batch, seed, evaluate):
        return float(forward_loss(model, s, batch, torch.Generator().manual_seed(seed), evaluate=evaluate).loss)

    # Evaluation ignores the posterior's spread, the noise offset and dropout; training uses them all.
    assert loss(setup, _rows(3, 1), 7, True) == loss(quiet, _rows(3, 1, std=False), 7, True)
    assert loss(setup, _rows(3, 1), 7, False) != loss(quiet, _rows(3, 1), 7, False)
    assert loss(setup, _rows(3, 1), 7, False) == loss(setup, _rows(3, 1), 7, False)

    rows = {(64, 64): [0, 1, 2], (64, 128): [3, 4]}
    data = {r: _rows(1, r) for r in range(5)}

    class Reader:
        def read_rows(self, bucket, wanted):
            return {k: torch.cat([data[r][k] for r in wanted]) for k in data[0]}

    # By hand: the training step's forward over the sorted buckets' micro-batches, one seeded generator.
    g, total = torch.Generator().manual_seed(VALIDATION_SEED), 0.0
    for chunk in ([0, 1], [2], [3, 4]):
        total += float(forward_loss(model, setup, Reader().read_rows(None, chunk), g, evaluate=True).loss) * len(chunk)
    assert held_out_loss(model, setup, Reader(), rows, micro_batch_size=2) == total / 5
    assert held_out_loss(model, setup, Reader(), {}, micro_batch_size=2) is None


def test_train_state_writes_the_checkpoint_json_and_restores_in_place():
    from latentforge.train.checkpoint import TrainState
    from latentforge.train.sampler import GlobalBucketSchedule

    schedule = GlobalBucketSchedule({(64, 64): 9, (64, 128): 5}, 2, seed=3)
    saved = TrainState(engine=None, schedule=schedule, sampler=schedule.advance(schedule.initial_state(), 5), rank=0,
                       world=2, step=5, snapshot={"cache_fingerprint": "abc", "config": {"x": 1}})
    doc = json.loads(json.dumps(saved.state_dict()))
    assert list(doc) == ["step", "sampler", "world_size", "cache_fingerprint", "config"]  # trainer_state.json
    assert doc["world_size"] == 2 and doc["step"] == 5
    fresh = TrainState(engine=None, schedule=schedule, sampler=schedule.initial_state(), rank=1, world=2)
    fresh.load_state_dict(doc)
    assert (fresh.step, fresh.sampler) == (5, saved.sampler)
    other = GlobalBucketSchedule({(64, 64): 9, (64, 128): 5}, 2, seed=4)
    untouched = TrainState(engine=None, schedule=other, sampler=other.initial_state(), rank=0, world=2)
    with pytest.raises(ValueError, match="seed"):
        untouched.load_state_dict(doc)
    assert (untouched.step, untouched.sampler) == (0, other.initial_state())


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


def test_shard_window_order_resumes_exactly_and_refuses_another_order(unet_only_model, small_cache, tmp_path):
    common = ["train.max_steps=4", "train.checkpoint_every=2", "train.shuffle=shard_window",
              "train.shuffle_window_shards=1", FP32_ZERO % 2]
    full = run_in_process(train_args(unet_only_model, small_cache, tmp_path / "a", *common))
    first = run_in_process(train_args(unet_only_model, small_cache, tmp_path / "b", *common), until=2)
    resumed = run_in_process(train_args(unet_only_model, small_cache, tmp_path / "b", *common, "train.resume=latest"))
    assert first + resumed == full
    state = json.loads((tmp_path / "b" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["sampler"]["order"].startswith("shard_window:1x")
    with pytest.raises(ValueError, match="order shard_window.*train.shuffle"):
        run_in_process(train_args(unet_only_model, small_cache, tmp_path / "b", "train.max_steps=6",
                                  "train.shuffle=global", FP32_ZERO % 2, "train.resume=latest"))


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
def test_two_processes_match_one_process_and_resume_on_one(unet_only_model, small_cache, tmp_path):
    # Same global batch (4): one process accumulates two micro-batches, two processes take one each.
    # A constant lr keeps the schedule independent of max_steps, so a shorter run is a true prefix.
    # ZeRO 0 (no universal conversion on resume): the 2-rank ZeRO-2 and ZeRO-3 runs, resumed on 1 rank after
    # a conversion, are tests/test_elastic_resume.py and tests/test_zero3.py.
    flat = ("train.lr_scheduler=constant", "train.warmup_steps=0")
    one = train_args(unet_only_model, small_cache, tmp_path / "one", *flat, "train.max_steps=6",
                     "train.gradient_accumulation_steps=2", "train.checkpoint_every=100", FP32_ZERO % 0)
    baseline = run_in_process(one)
    two = train_args(unet_only_model, small_cache, tmp_path / "two", *flat, "train.max_steps=4", "train.checkpoint_every=3",
                     FP32_ZERO % 0)
    torchrun_train(2, two)
    losses = logged_losses(tmp_path / "two")
    np.testing.assert_allclose([losses[s] for s in range(1, 5)], baseline[:4], rtol=2e-4, atol=1e-5)
    # The two processes' step-3 checkpoint, resumed by one process with accumulation: same sample order.
    ckpt = tmp_path / "two" / "checkpoints" / "step-00000003"
    resumed = run_in_process(train_args(unet_only_model, small_cache, tmp_path / "resumed", *flat, "train.max_steps=6",
                                        "train.gradient_accumulation_steps=2", f"train.resume={ckpt}", FP32_ZERO % 0))
    np.testing.assert_allclose(resumed, baseline[3:], rtol=2e-4, atol=1e-5)
