"""LoRA through peft under DeepSpeed: adapter-only checkpoints, exact resume, adapter and merged exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from reliability_support import soak

from latentforge.shared.config import load_config
from latentforge.train.export import export_pipeline
from latentforge.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def lora_args(model: Path, cache: Path, out: Path, stage: int) -> list[str]:
    return [f"model.pretrained={model}", f"cache.path={cache}", f"train.output_dir={out}", "train.num_workers=0",
            "train.validation_every=0", "train.held_out_fraction=0", "train.max_steps=4", "train.checkpoint_every=2",
            "train.lora.enabled=true", "train.lora.rank=4", "train.lr=1e-2", "train.ema.enabled=false",
            f"deepspeed={{zero_optimization: {{stage: {stage}}}, bf16: {{enabled: false}}}}"]


def test_lora_checkpoints_resume_and_export(tiny_sdxl, small_cache, tmp_path):
    full = Trainer(load_config(ROOT / "configs/demo.yaml", lora_args(tiny_sdxl, small_cache, tmp_path / "a", 2)))
    trainable = {n for n, p in full.engine.module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    full.train()
    first = Trainer(load_config(ROOT / "configs/demo.yaml", lora_args(tiny_sdxl, small_cache, tmp_path / "b", 2)))
    first.train(until=2)
    resumed = Trainer(load_config(ROOT / "configs/demo.yaml",
                                  [*lora_args(tiny_sdxl, small_cache, tmp_path / "b", 2), "train.resume=latest"]))
    resumed.train()
    assert first.history + resumed.history == full.history

    ckpt = tmp_path / "a" / "checkpoints" / "step-00000004"
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert module and all("lora_" in k for k in module), "a LoRA checkpoint must not hold the frozen base"

    adapter = export_pipeline(ckpt, tmp_path / "adapter")
    merged = export_pipeline(ckpt, tmp_path / "merged", merge=True, dtype="fp32")
    assert (adapter / "pytorch_lora_weights.safetensors").stat().st_size < 1_000_000

    def image(pipe):
        return pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    plain = image(base)
    base.load_lora_weights(adapter)
    with_lora = image(base)
    fused = image(StableDiffusionXLPipeline.from_pretrained(merged))
    assert not np.allclose(plain, with_lora), "the adapter changed nothing"
    np.testing.assert_allclose(fused, with_lora, atol=2e-3)


def test_runs_compare_side_by_side(tiny_sdxl, small_cache, tmp_path):
    """Two runs leave run_summary.json and TensorBoard hparams that a person can put next to each other."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name, lr in (("r1", "1e-4"), ("r2", "1e-3")):
        args = [*lora_args(tiny_sdxl, small_cache, tmp_path / name, 0)[:-1], "train.max_steps=2", f"train.lr={lr}",
                "deepspeed={zero_optimization: {stage: 0}, bf16: {enabled: false}}"]
        Trainer(load_config(ROOT / "configs/demo.yaml", args)).train()
    summaries = [json.loads((tmp_path / n / "run_summary.json").read_text()) for n in ("r1", "r2")]
    assert [s["hparams"]["lr"] for s in summaries] == [1e-4, 1e-3]
    assert all(s["steps"] == 2 and s["hparams"]["lora_rank"] == 4 for s in summaries)
    acc = EventAccumulator(str(tmp_path / "r1" / "tensorboard"))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"]
    assert any("hparams" in tag for tag in acc.Tags().get("tensors", [])) or acc.PluginTagToContent("hparams")


LORA_ZERO3 = ("train.lora.enabled=true", "train.lora.rank=4", "train.lr=1e-2", "train.validation_every=4",
              "train.held_out_fraction=0.2", "train.validation_inference_steps=2")


def lora_zero3_run(model: Path, cache: Path, tmp_path: Path) -> Path:
    """Two ranks train LoRA under ZeRO-3 (elastic_args: checkpoints at CKPT and STEPS, validation at STEPS)."""
    from test_elastic_resume import STEPS, elastic_args
    from test_train import torchrun_train

    base = tmp_path / "w2"
    torchrun_train(2, elastic_args(model, cache, base, 3, 2, *LORA_ZERO3))
    assert (base / "validation" / f"step-{STEPS:08d}.png").is_file()
    return base


@soak
def test_lora_under_zero3_resumes_exactly_on_the_same_ranks(unet_only_model, small_cache, tmp_path):
    """The 2-rank LoRA ZeRO-3 run resumed on 2 ranks continues it exactly. In `make test` the same
    proof is split: exact same-rank ZeRO-3 resume (full weights) in test_zero3, exact LoRA resume in
    test_lora_checkpoints_resume_and_export."""
    from test_elastic_resume import resume
    from test_train import logged_losses

    base = lora_zero3_run(unet_only_model, small_cache, tmp_path)
    full = logged_losses(base)
    got = resume(unet_only_model, small_cache, base, tmp_path / "resumed", 3, 2, *LORA_ZERO3)
    assert [got[s] for s in (3, 4)] == [full[s] for s in (3, 4)]


@pytest.mark.slow
def test_lora_under_zero3_checkpoints_and_export(unet_only_model, small_cache, tiny_sdxl, tmp_path):
    """Two ranks, every adapter weight split between them: adapter-only checkpoints and the adapter
    exported from the partitioned optimizer files."""
    from test_elastic_resume import CKPT, STEPS, checkpoint

    base = lora_zero3_run(unet_only_model, small_cache, tmp_path)

    ckpt = checkpoint(base, STEPS)
    for rank in (0, 1):  # each rank's file names the adapters only; the frozen base is the base model's
        states = torch.load(ckpt / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)
        assert states["module"] and all("lora_" in k for k in states["module"]) and not states["frozen_param_shapes"]
    from latentforge.train.checkpoint_weights import trained_state_dict

    adapters = trained_state_dict(ckpt, use_ema=False)
    assert adapters and all("lora_" in k for k in adapters)
    assert any(not torch.equal(adapters[k], v) for k, v in trained_state_dict(checkpoint(base, CKPT), False).items())

    out = export_pipeline(ckpt, tmp_path / "adapter")
    assert (export_pipeline(ckpt, tmp_path / "adapter-ema", use_ema=True) / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    plain = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(out)
    tuned = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert not np.allclose(plain, tuned), "the adapter changed nothing"
