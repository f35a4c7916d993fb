"""Stable Cascade's pure parts, fast: the GDF objective against diffusers' Würstchen scheduler and prior pipeline,
the EfficientNet encoder in the released layout, explicit aspect-ratio buckets, the EMA's start/interval
semantics and the backup checkpoints kept outside the rotation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from latentforge.preprocess.buckets import generate_buckets, ratio_buckets
from latentforge.preprocess.effnet import EfficientNetEncoder, load_effnet, to_effnet_input
from latentforge.shared.config import load_config
from latentforge.train import gdf
from latentforge.train.checkpoint import rotating
from latentforge.train.ema import Ema

SEED_RATIOS = ["1/1", "1/2", "1/3", "2/3", "3/4", "1/5", "2/5", "3/5", "4/5", "1/6", "5/6", "9/16"]


# ---- GDF --------------------------------------------------------------------------------------------
def test_noising_matches_wuerstchen_scheduler_add_noise():
    from diffusers import DDPMWuerstchenScheduler

    t = torch.linspace(0.001, 1.0, 17)
    x0, eps = torch.randn(17, 16, 3, 3), torch.randn(17, 16, 3, 3)
    noisy, _, _ = gdf.gdf_diffuse(x0, eps, t)
    want = DDPMWuerstchenScheduler().add_noise(x0, eps, t)
    torch.testing.assert_close(noisy, want, atol=1e-5, rtol=1e-5)


def test_timestep_ratio_matches_the_prior_pipeline():
    from diffusers import StableCascadePriorPipeline

    t = torch.linspace(0.001, 1.0, 33)
    log_snr = gdf.cosine_log_snr(t)
    var = torch.sigmoid(log_snr)  # alpha_bar at each t
    want = StableCascadePriorPipeline.get_timestep_ratio_conditioning(None, torch.arange(33), var)
    torch.testing.assert_close(gdf.cosine_t_cond(log_snr), want.float(), atol=1e-5, rtol=1e-5)
    # Inside the clamp range the condition gives t back: the noise level the prior sees is the drawn one.
    inside = (var > 1e-4) & (var < 0.9999)
    torch.testing.assert_close(gdf.cosine_t_cond(log_snr)[inside], t[inside], atol=1e-4, rtol=0)


def test_shift_p2_weight_and_t_draw_by_hand():
    t = torch.tensor([0.3, 0.5, 0.7])
    base, shifted = gdf.cosine_log_snr(t), gdf.cosine_log_snr(t, shift=2.0)
    torch.testing.assert_close(shifted, base + 2 * math.log(1 / 2))
    # P2 with k = gamma = 1 is 1 / (1 + snr) = 1 - alpha_bar.
    torch.testing.assert_close(gdf.p2_loss_weight(base), 1 - torch.sigmoid(base))
    g = torch.Generator().manual_seed(0)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gdf.sample_t(1000, g), (1 - u + 0.001).clamp(0.001, 1.0))


def test_limits_clamp_the_shifted_schedule():
    lo, hi = gdf.cosine_log_snr(torch.tensor([1.0, 0.0])).tolist()
    shifted = gdf.cosine_log_snr(torch.tensor([0.999, 0.0]), shift=4.0)
    assert lo <= float(shifted.min()) and float(shifted.max()) <= hi


# ---- the EfficientNet encoder ----------------------------------------------------------------------
class _ReleasedLayout(nn.Module):
    """The original class (Stability-AI/StableCascade modules/effnet.py) without downloading ImageNet weights."""

    def __init__(self, c_latent: int = 16) -> None:
        import torchvision

        super().__init__()
        self.backbone = torchvision.models.efficientnet_v2_s(weights=None).features.eval()
        self.mapper = nn.Sequential(nn.Conv2d(1280, c_latent, kernel_size=1, bias=False),
                                    nn.BatchNorm2d(c_latent, affine=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mapper(self.backbone(x))


def test_released_layout_loads_strictly_and_gives_24x24_at_768(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    released = _ReleasedLayout().eval()
    state = {k: v.contiguous() for k, v in released.state_dict().items()}
    assert "mapper.0.weight" in state and "mapper.1.running_var" in state and "backbone.0.0.weight" in state
    save_file(state, str(tmp_path / "effnet_encoder.safetensors"))
    ours = load_effnet(tmp_path)
    assert set(ours.state_dict()) == set(state)
    assert all(ours.state_dict()[k].shape == v.shape for k, v in state.items())
    x = torch.rand(1, 3, 768, 768) * 2 - 1
    with torch.no_grad():
        got = ours(to_effnet_input(x))
        want = released(to_effnet_input(x))
    assert got.shape == (1, 16, 24, 24)
    torch.testing.assert_close(got, want)


def test_other_layout_is_one_line(tmp_path):
    from safetensors.torch import save_file

    state = EfficientNetEncoder().state_dict()
    state["mapper.0.weight"] = torch.zeros(16, 1280, 3, 3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "effnet_encoder.safetensors"))
    with pytest.raises(ValueError, match="effnet_encoder.safetensors layout") as info:
        load_effnet(tmp_path)
    assert "\n" not in str(info.value)


def test_effnet_input_is_imagenet_normalised():
    white = torch.ones(1, 3, 2, 2)
    got = to_effnet_input(white)[0, :, 0, 0]
    torch.testing.assert_close(got, torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]))


# ---- buckets ----------------------------------------------------------------------------------------
def test_seed_ratios_give_bucketeer_sizes():
    buckets = ratio_buckets(768, 32, SEED_RATIOS)
    for r in (1, 1 / 2, 9 / 16, 2 / 3):  # Bucketeer: (int(sqrt(A / r) // 32 * 32), int(sqrt(A * r) // 32 * 32))
        for q in (r, 1 / r):
            assert (int((768 ** 2 / q) ** 0.5 // 32 * 32), int((768 ** 2 * q) ** 0.5 // 32 * 32)) in buckets
    assert (768, 768) in buckets and (1024, 576) in buckets and (576, 1024) in buckets
    assert all(h % 32 == 0 and w % 32 == 0 and h * w <= 768 ** 2 for h, w in buckets)
    assert generate_buckets(768, 32, 0.25, 4.0, SEED_RATIOS) == buckets


def test_config_takes_the_seed_list_as_written(tmp_path):
    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "configs" / "stable-cascade-finetune.yaml")
    assert config.buckets.aspect_ratios == SEED_RATIOS
    from latentforge.shared.config import ConfigError

    with pytest.raises(ConfigError, match="aspect_ratios"):
        load_config(root / "configs" / "stable-cascade-finetune.yaml", ["buckets.aspect_ratios=['1/0']"])


# ---- EMA and backups --------------------------------------------------------------------------------
def test_ema_copies_until_start_then_averages_every_interval():
    model = nn.Linear(1, 1, bias=False)
    ema = Ema(model, decay=0.5, start_step=2, update_every=2)
    expect = float(model.weight.detach())
    for step, w in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], start=1):
        model.weight.data.fill_(w)
        ema.update(model, step)
        if step % 2 == 0:  # the seed: beta = ema_beta if i > ema_start_iters else 0
            expect = w if step <= 2 else 0.5 * expect + 0.5 * w
        assert float(ema.shadow["weight"]) == pytest.approx(expect)
    assert expect == pytest.approx(0.25 * 2 + 0.25 * 4 + 0.5 * 6)


def test_backups_stay_outside_the_rotation(tmp_path):
    paths = [tmp_path / f"step-{s:08d}" for s in (1000, 1500, 2000, 2500, 3000)]
    assert rotating(paths, 1000) == [paths[1], paths[3]]
    assert rotating(paths, 0) == paths
