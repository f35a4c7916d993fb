"""The diffusion objective: formulas checked against diffusers, seeded statistics, hypothesis properties."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from latentforge.preprocess.buckets import sdxl_time_ids
from latentforge.shared.config import TimestepBiasConfig
from latentforge.train.objective import (
    add_noise,
    compute_snr,
    diffusion_loss,
    drop_captions,
    lr_lambda,
    min_snr_weights,
    sample_noise,
    sample_posterior,
    sample_timesteps,
    scale_latents,
    sdxl_add_time_ids,
    timestep_weights,
    training_target,
)

PROPS = settings(max_examples=100, deadline=None)
T = 1000


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    # SDXL's training schedule.
    return DDPMScheduler(
        num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )


def reference_weights(strategy: str, multiplier: float, begin: int, end: int, portion: float, num: int):
    """diffusers' generate_timestep_weights (examples/text_to_image/train_text_to_image_sdxl.py), normalised."""
    weights = torch.ones(num)
    num_to_bias = int(portion * num)
    if strategy == "later":
        idx = slice(-num_to_bias, None)
    elif strategy == "earlier":
        idx = slice(0, num_to_bias)
    elif strategy == "range":
        idx = slice(begin, end)
    else:
        return weights / weights.sum()
    weights[idx] *= multiplier
    return weights / weights.sum()


# --- timestep weights and sampling ---------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy,multiplier,begin,end,portion",
    [
        ("none", 3.0, 0, 1000, 0.25),
        ("later", 2.0, 0, 1000, 0.25),
        ("later", 0.5, 0, 1000, 0.3),
        ("earlier", 4.0, 0, 1000, 0.1),
        ("range", 3.0, 200, 500, 0.25),
        ("range", 5.0, 0, 1000, 0.25),
        ("later", 1.0, 0, 1000, 0.5),
    ],
)
def test_weights_match_diffusers(strategy, multiplier, begin, end, portion):
    bias = TimestepBiasConfig(strategy=strategy, multiplier=multiplier, begin=begin, end=end, portion=portion)
    w = timestep_weights(T, bias)
    assert w.dtype == torch.float32 and w.shape == (T,)
    torch.testing.assert_close(w, reference_weights(strategy, multiplier, begin, end, portion, T))
    assert math.isclose(w.sum().item(), 1.0, rel_tol=1e-5)


@PROPS
@given(
    strategy=st.sampled_from(["none", "earlier", "later", "range"]),
    multiplier=st.floats(0.1, 10.0),
    portion=st.floats(0.0005, 1.0),
    num=st.integers(10, 1200),
    data=st.data(),
)
def test_weights_property(strategy, multiplier, portion, num, data):
    begin = data.draw(st.integers(0, num - 1))
    end = data.draw(st.integers(begin + 1, num))
    bias = TimestepBiasConfig(strategy=strategy, multiplier=multiplier, begin=begin, end=end, portion=portion)
    w = timestep_weights(num, bias)
    torch.testing.assert_close(w, reference_weights(strategy, multiplier, begin, end, portion, num))
    assert (w > 0).all()


def test_multiplier_one_is_uniform():
    for strategy in ("earlier", "later", "range"):
        w = timestep_weights(T, TimestepBiasConfig(strategy=strategy, multiplier=1.0, begin=100, end=300))
        torch.testing.assert_close(w, torch.full((T,), 1.0 / T))


def test_range_end_beyond_schedule_is_one_line_error():
    with pytest.raises(ValueError, match=r"^timestep_bias range \[0, 1200\)[^\n]*$"):
        timestep_weights(T, TimestepBiasConfig(strategy="range", multiplier=2.0, begin=0, end=1200))


@pytest.mark.parametrize("strategy,lo,hi", [("later", 750, 1000), ("earlier", 0, 250), ("range", 200, 500)])
def test_sampled_histogram_follows_bias(strategy, lo, hi):
    bias = TimestepBiasConfig(strategy=strategy, multiplier=3.0, begin=200, end=500, portion=0.25)
    w = timestep_weights(T, bias)
    n = 200_000
    t = sample_timesteps(n, w, gen(1))
    assert t.dtype == torch.int64 and t.shape == (n,) and t.min() >= 0 and t.max() < T
    frac = ((t >= lo) & (t < hi)).float().mean().item()
    expected = w[lo:hi].sum().item()  # e.g. later: 3*250 / (3*250 + 750) = 0.5
    assert abs(frac - expected) < 5 * math.sqrt(expected * (1 - expected) / n)


def test_same_seed_same_draws():
    w = timestep_weights(T, TimestepBiasConfig(strategy="later", multiplier=2.0))
    latents = torch.zeros(3, 4, 8, 8)
    a = (sample_timesteps(16, w, gen(7)), sample_noise(latents, gen(7), 0.1))
    b = (sample_timesteps(16, w, gen(7)), sample_noise(latents, gen(7), 0.1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Resuming from a saved generator state continues the exact stream.
    g = gen(3)
    sample_timesteps(4, w, g)
    state = g.get_state()
    first = sample_noise(latents, g, 0.05)
    g2 = torch.Generator().set_state(state)
    assert torch.equal(first, sample_noise(latents, g2, 0.05))
    assert not torch.equal(sample_timesteps(16, w, gen(7)), sample_timesteps(16, w, gen(8)))


# --- noise, posterior, scaling --------------------------------------------------------------------


def test_sample_noise_offset_and_dtype():
    latents = torch.zeros(2, 4, 16, 16, dtype=torch.bfloat16)
    plain = sample_noise(latents, gen(0), 0.0)
    offset = sample_noise(latents, gen(0), 0.5)
    assert plain.dtype == torch.bfloat16 and plain.shape == latents.shape
    # Same main draw; the difference is constant over each (sample, channel) plane.
    g = gen(0)
    base = torch.randn(latents.shape, generator=g)
    per_channel = torch.randn(2, 4, 1, 1, generator=g)
    torch.testing.assert_close(plain, base.bfloat16())
    torch.testing.assert_close(offset, (base + 0.5 * per_channel).bfloat16())
    # Offset 0 and 0.5 consume the generator identically.
    g0, g1 = gen(5), gen(5)
    sample_noise(latents, g0, 0.0)
    sample_noise(latents, g1, 0.5)
    assert torch.equal(g0.get_state(), g1.get_state())


def test_sample_posterior_and_scale():
    mean = torch.randn(4, 4, 8, 8, generator=gen(1))
    std = torch.full_like(mean, 0.5)
    draw = sample_posterior(mean, std, gen(2))
    torch.testing.assert_close(draw, mean + 0.5 * torch.randn(mean.shape, generator=gen(2)))
    torch.testing.assert_close(sample_posterior(mean, torch.zeros_like(std), gen(3)), mean)
    torch.testing.assert_close(scale_latents(mean, 0.13025), mean * 0.13025)
    torch.testing.assert_close(scale_latents(mean, 1.5305, 0.0609), (mean - 0.0609) * 1.5305)


# --- forward process, targets, SNR ----------------------------------------------------------------


def test_add_noise_and_velocity_equal_diffusers(scheduler):
    x0 = torch.randn(6, 4, 16, 16, generator=gen(0))
    noise = torch.randn(6, 4, 16, 16, generator=gen(1))
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ac = scheduler.alphas_cumprod
    torch.testing.assert_close(
        add_noise(x0, noise, t, ac), scheduler.add_noise(x0, noise, t), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        training_target("v_prediction", x0, noise, t, ac),
        scheduler.get_velocity(x0, noise, t),
        rtol=0,
        atol=1e-6,
    )
    assert training_target("epsilon", x0, noise, t, ac) is noise
    with pytest.raises(ValueError, match="prediction_type"):
        training_target("sample", x0, noise, t, ac)


def test_snr_matches_diffusers(scheduler):
    from diffusers.training_utils import compute_snr as diffusers_snr

    t = torch.arange(0, T, 37)
    torch.testing.assert_close(
        compute_snr(scheduler.alphas_cumprod, t), diffusers_snr(scheduler, t), rtol=1e-5, atol=0
    )


@PROPS
@given(snr=st.floats(1e-6, 1e6), gamma=st.floats(0.1, 20.0))
def test_min_snr_properties(snr, gamma):
    s = torch.tensor([snr], dtype=torch.float32)
    eps = min_snr_weights(s, gamma, "epsilon")
    v = min_snr_weights(s, gamma, "v_prediction")
    assert 0 < eps.item() <= 1
    assert 0 < v.item() < 1
    torch.testing.assert_close(eps, torch.clamp(s, max=gamma) / s)
    torch.testing.assert_close(v, eps * s / (s + 1))


def test_min_snr_zero_terminal_snr_has_no_nan():
    betas = DDPMScheduler(num_train_timesteps=T, rescale_betas_zero_snr=True).betas
    ac = torch.cumprod(1 - betas, 0)
    snr = compute_snr(ac, torch.tensor([0, 500, T - 1]))
    assert snr[-1] == 0
    eps, v = min_snr_weights(snr, 5.0, "epsilon"), min_snr_weights(snr, 5.0, "v_prediction")
    assert torch.isfinite(eps).all() and torch.isfinite(v).all()
    assert eps[-1] == 1 and v[-1] == 0
    with pytest.raises(ValueError):
        min_snr_weights(snr, 5.0, "sample")


def test_loss_reductions():
    pred = torch.randn(4, 4, 8, 8, generator=gen(0)).bfloat16()
    target = torch.randn(4, 4, 8, 8, generator=gen(1)).bfloat16()
    expected = F.mse_loss(pred.float(), target.float())
    loss = diffusion_loss(pred, target, None)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(diffusion_loss(pred, target, torch.ones(4)), expected)
    w = torch.tensor([0.0, 1.0, 2.0, 0.5])
    per = (pred.float() - target.float()).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(diffusion_loss(pred, target, w), (per * w).mean())


# --- conditioning dropout -------------------------------------------------------------------------


def test_drop_captions():
    b = 2000
    embeds, pooled = torch.randn(b, 77, 8), torch.randn(b, 16)
    empty, empty_pooled = torch.zeros(1, 77, 8), torch.zeros(1, 16)

    e, p, mask = drop_captions(embeds, pooled, empty, empty_pooled, 0.0, gen(0))
    assert not mask.any() and torch.equal(e, embeds) and torch.equal(p, pooled)

    e, p, mask = drop_captions(embeds, pooled, empty, empty_pooled, 1.0, gen(0))
    assert mask.all() and not e.any() and not p.any()

    e, p, mask = drop_captions(embeds, pooled, empty, empty_pooled, 0.5, gen(0))
    assert abs(mask.float().mean().item() - 0.5) < 0.05
    assert not e[mask].any() and torch.equal(e[~mask], embeds[~mask]) and torch.equal(p[~mask], pooled[~mask])
    assert torch.equal(mask, drop_captions(embeds, pooled, empty, empty_pooled, 0.5, gen(0))[2])

    e, p, mask = drop_captions(embeds, None, empty[0], None, 0.5, gen(1))  # a family without pooled
    assert p is None and not e[mask].any()
    with pytest.raises(ValueError, match="empty-prompt shape"):
        drop_captions(embeds, None, torch.zeros(1, 154, 8), None, 0.5, gen(1))


def test_time_ids_match_diffusers_pipeline():
    from diffusers import StableDiffusionXLPipeline

    # The real pipeline method on a stand-in `self`: it only reads two UNet config numbers.
    unet = SimpleNamespace(
        config=SimpleNamespace(addition_time_embed_dim=256),
        add_embedding=SimpleNamespace(linear_1=SimpleNamespace(in_features=256 * 6 + 1280)),
    )
    fake = SimpleNamespace(unet=unet)
    orig, crop, target = [(1536, 1024), (700, 900)], [(0, 64), (12, 0)], (1216, 832)
    ids = sdxl_add_time_ids(orig, crop, target, 0.0, gen(0))
    assert ids.shape == (2, 6) and ids.dtype == torch.float32
    for i in range(2):
        ref = StableDiffusionXLPipeline._get_add_time_ids(
            fake, orig[i], crop[i], target, dtype=torch.float32, text_encoder_projection_dim=1280
        )
        torch.testing.assert_close(ids[i : i + 1], ref)
        assert tuple(ids[i].int().tolist()) == sdxl_time_ids(orig[i], crop[i], target)
    # Cached (B, 2) int32 tensors work the same.
    as_tensors = sdxl_add_time_ids(
        torch.tensor(orig, dtype=torch.int32), torch.tensor(crop), torch.tensor(target), 0.0, gen(0)
    )
    torch.testing.assert_close(as_tensors, ids)


def test_time_ids_dropout():
    b = 2000
    orig = torch.tensor([[1024, 768]]).expand(b, 2)
    ids = sdxl_add_time_ids(orig, (0, 0), (1024, 1024), 0.3, gen(4))
    dropped = (ids == 0).all(dim=1)
    assert abs(dropped.float().mean().item() - 0.3) < 0.05
    assert (ids[~dropped] == torch.tensor([1024.0, 768, 0, 0, 1024, 1024])).all()
    assert not (sdxl_add_time_ids(orig, (0, 0), (1024, 1024), 1.0, gen(4))).any()


# --- learning-rate schedule -----------------------------------------------------------------------


def test_lr_lambda_shapes():
    w, m = 100, 1000
    for schedule in ("constant", "cosine", "linear"):
        assert lr_lambda(0, w, m, schedule) == pytest.approx(1 / w)  # small, but the first step learns
        assert lr_lambda(w - 1, w, m, schedule) == 1.0
        assert lr_lambda(w, w, m, schedule) == 1.0
        warm = [lr_lambda(s, w, m, schedule) for s in range(w)]
        assert all(a < b for a, b in zip(warm, warm[1:], strict=False))
    assert lr_lambda(0, 0, m, "constant") == 1.0 and lr_lambda(m + 5, w, m, "constant") == 1.0
    assert lr_lambda(m, w, m, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_lambda((w + m) // 2, w, m, "cosine") == pytest.approx(0.5)
    assert lr_lambda(m, w, m, "linear") == 0.0 and lr_lambda(m + 50, w, m, "linear") == 0.0
    for schedule in ("cosine", "linear"):
        decay = [lr_lambda(s, w, m, schedule) for s in range(w, m + 1)]
        assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    with pytest.raises(ValueError, match="lr schedule"):
        lr_lambda(0, 0, m, "step")  # type: ignore[arg-type]


@PROPS
@given(
    warmup=st.integers(0, 50),
    extra=st.integers(1, 500),
    schedule=st.sampled_from(["constant", "cosine", "linear"]),
)
def test_lr_lambda_bounded(warmup, extra, schedule):
    m = warmup + extra
    values = [lr_lambda(s, warmup, m, schedule) for s in range(m + 1)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(v > 0 for v in values[:m])  # never a wasted step before max_steps
