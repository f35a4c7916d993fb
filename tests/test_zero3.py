"""ZeRO-3 complete: EMA, validation images and held-out loss, checkpoints, exact and elastic resume, export.

Two processes on the CPU (gloo) train the tiny SDXL UNet under ZeRO-3, so every weight is split over the
ranks: the sharded EMA, the validation pipeline that every rank runs, and the export from partitioned
optimizer files are all exercised for real. The 2-process run is the reference: resumed on 2 ranks its
checkpoint must continue it exactly, resumed on 1 (and on 3 under `make soak`; universal checkpoint) within fp32
reduction noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_support import soak
from safetensors.torch import load_file
from test_elastic_resume import ATOL, CKPT, RTOL, STEPS, checkpoint, elastic_args, resume, sampler_state
from test_train import logged_losses, torchrun_train

VALIDATE = ("train.validation_every=2", "train.held_out_fraction=0.2", "train.validation_inference_steps=2")


def grid(out: Path, step: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(out / "validation" / f"step-{step:08d}.png")).astype(np.int16)


def held_out_losses(out: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("val/loss")}


def ema(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint(out, step) / "ema.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def train_base(model: Path, cache: Path, tmp_path: Path) -> Path:
    """The reference: 2 ranks train STEPS steps under ZeRO-3 with EMA and validation (checkpoint at CKPT)."""
    base = tmp_path / "w2"
    torchrun_train(2, elastic_args(model, cache, base, 3, 2, *VALIDATE))
    full = logged_losses(base)
    assert sorted(full) == [1, 2, 3, 4] and all(np.isfinite(list(full.values())))
    return base


def check_other_world(model: Path, cache: Path, base: Path, tmp_path: Path, world: int) -> None:
    """`base` resumed from its CKPT checkpoint on `world` ranks continues it within fp32 reduction noise:
    losses, sampler, EMA, validation grid and held-out loss."""
    out = tmp_path / f"w{world}"
    got = resume(model, cache, base, out, 3, world, *VALIDATE)
    full = logged_losses(base)
    np.testing.assert_allclose([got[s] for s in (3, 4)], [full[s] for s in (3, 4)], rtol=RTOL, atol=ATOL)
    assert sampler_state(out, STEPS) == sampler_state(base, STEPS)
    assert max_diff(ema(out, STEPS), ema(base, STEPS)) < 1e-5
    assert np.abs(grid(out, 4) - grid(base, 4)).max() <= 2  # other ranks render what two ranks rendered
    np.testing.assert_allclose(held_out_losses(out)[4], held_out_losses(base)[4], rtol=RTOL)


@pytest.mark.slow
def test_zero3_ema_validation_resume_and_export(unet_only_model, small_cache, tiny_sdxl, tmp_path):
    base = train_base(unet_only_model, small_cache, tmp_path)
    full = logged_losses(base)

    # Validation under ZeRO-3: every rank runs the pipeline, rank 0 writes the grid; the held-out loss is logged.
    assert sorted(held_out_losses(base)) == [2, 4]
    from latentforge.train.grid_labels import CAPTION_H, NAME_W

    # Rows base, current and ema, each two 256x256 panels under prompt labels, the row name left.
    labelled = (3 * (CAPTION_H + 256), NAME_W + 512, 3)
    assert grid(base, 2).shape == labelled and grid(base, 4).shape == labelled
    # The sharded EMA swapped in renders other pixels than the weights (decay 0.99), and the base row stays.
    row = CAPTION_H + 256
    assert not np.array_equal(grid(base, 4)[row + CAPTION_H:2 * row], grid(base, 4)[2 * row + CAPTION_H:])
    assert np.array_equal(grid(base, 2)[:row], grid(base, 4)[:row])

    # The EMA is whole in the checkpoint: every trainable parameter at its full shape.
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_only_model, subfolder="unet")
    assert {k: tuple(v.shape) for k, v in ema(base, STEPS).items()} == {n: tuple(p.shape) for n, p in unet.named_parameters()}
    assert max_diff(ema(base, CKPT), ema(base, STEPS)) > 0

    # Same world size: exact, EMA and validation included.
    same = tmp_path / "w2-resumed"
    got = resume(unet_only_model, small_cache, base, same, 3, 2, *VALIDATE)
    assert [got[s] for s in (3, 4)] == [full[s] for s in (3, 4)]
    assert max_diff(ema(same, STEPS), ema(base, STEPS)) == 0
    assert np.array_equal(grid(same, 4), grid(base, 4))
    assert held_out_losses(same)[4] == held_out_losses(base)[4]

    # Another world size (universal checkpoint; the EMA re-sliced from its whole tensors): within reduction noise.
    # One rank here (in process); three ranks under `make soak` (the slicing into 3 is checked without a run below).
    check_other_world(unet_only_model, small_cache, base, tmp_path, 1)

    # Export from the partitioned checkpoint: trained weights (fp32 masters from the optimizer files) and EMA.
    from diffusers import StableDiffusionXLPipeline

    from latentforge.train.export import export_pipeline

    trained = export_pipeline(checkpoint(base, STEPS), tmp_path / "export", base=str(tiny_sdxl), dtype="fp32")
    weights = StableDiffusionXLPipeline.from_pretrained(trained).unet.state_dict()
    assert any(not torch.equal(weights[k], v) for k, v in unet.state_dict().items()), "export holds the base weights"
    smoothed = export_pipeline(checkpoint(base, STEPS), tmp_path / "export-ema", use_ema=True, base=str(tiny_sdxl),
                               dtype="fp32")
    pipe = StableDiffusionXLPipeline.from_pretrained(smoothed)
    assert max_diff(pipe.unet.state_dict(), ema(base, STEPS)) == 0
    image = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


@soak
def test_zero3_checkpoint_resumes_on_three_processes(unet_only_model, small_cache, tmp_path):
    """The 2-rank ZeRO-3 run resumed on 3 ranks (a second world size through the universal checkpoint the
    1-rank resume above takes; the EMA's slicing into 3 ranks is `test_sharded_ema_is_the_whole_ema_sliced`)."""
    check_other_world(unet_only_model, small_cache, train_base(unet_only_model, small_cache, tmp_path), tmp_path, 3)


def _partitioned(module: torch.nn.Module, rank: int, world: int) -> torch.nn.Module:
    """A copy of `module` whose parameters carry what ZeRO-3 gives them: whole shape and size, and this
    rank's slice of the flat tensor, zero-padded to world x slice."""
    import copy
    import math

    part = copy.deepcopy(module)
    for p in part.parameters():
        size = math.ceil(p.numel() / world)
        flat = torch.cat([p.detach().reshape(-1), p.new_zeros(size * world - p.numel())])
        p.ds_shape, p.ds_numel, p.ds_tensor = p.shape, p.numel(), flat[rank * size:(rank + 1) * size].clone()
    return part


def test_sharded_ema_is_the_whole_ema_sliced():
    """Each rank's EMA of its slice is the slice of the whole EMA, and a whole EMA loads into any world size."""
    from latentforge.train.ema import Ema, ShardedEma

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 1))  # 15, 3, 3, 1 elements: padded at 2
    whole = Ema(module, 0.9, start_step=2)
    shards = [ShardedEma(_partitioned(module, r, 2), 0.9, start_step=2, rank=r, world=2) for r in range(2)]
    for step in range(1, 6):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        whole.update(module, step)
        for rank, ema in enumerate(shards):
            ema.update(_partitioned(module, rank, 2), step)
    for name, value in whole.state_dict().items():
        joined = torch.cat([ema.shadow[name] for ema in shards])[:value.numel()].view(value.shape)
        torch.testing.assert_close(joined, value, rtol=0, atol=0)
    alone = ShardedEma(_partitioned(module, 0, 1), 0.9).state_dict()  # one rank: its slices are the tensors
    assert all(torch.equal(alone[n], p) for n, p in module.named_parameters())
    for rank in range(3):  # saved by 2 ranks (whole tensors), loaded by 3
        three = ShardedEma(_partitioned(module, rank, 3), 0.9, rank=rank, world=3)
        three.load_state_dict(whole.state_dict())
        for name, value in whole.state_dict().items():
            want = _partitioned_value(value, rank, 3)
            torch.testing.assert_close(three.shadow[name], want, rtol=0, atol=0)


def _partitioned_value(value: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    import math

    size = math.ceil(value.numel() / world)
    flat = torch.cat([value.reshape(-1), value.new_zeros(size * world - value.numel())])
    return flat[rank * size:(rank + 1) * size]


def test_zero3_ema_refuses_nvme_parameter_offload():
    from test_train import DEMO

    from latentforge.shared.config import ConfigError, load_config
    from latentforge.train.distributed import deepspeed_config

    nvme = "deepspeed={zero_optimization: {stage: 3, offload_param: {device: nvme, nvme_path: /tmp}}}"
    with pytest.raises(ConfigError, match="offload_param.device=nvme"):
        deepspeed_config(load_config(DEMO, [nvme, "train.ema.enabled=true"]), 1)
    deepspeed_config(load_config(DEMO, [nvme, "train.ema.enabled=false"]), 1)
