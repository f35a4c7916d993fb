"""EDM preconditioning and loss by hand and against diffusers' EDMEulerScheduler; zero terminal SNR against
diffusers' rescale_zero_terminal_snr; input perturbation; one-line refusals of options a family ignores."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_train import DEMO

from latentforge.shared.config import ConfigError, load_config
from latentforge.train.edm import edm_loss_weight, edm_pair, edm_preconditioning, edm_scheduler_config
from latentforge.train.noise_options import (
    check_objective_options,
    sampling_scheduler,
    sampling_scheduler_config,
)


def test_preconditioning_by_hand() -> None:
    # sigma = 1, sigma_data = 0.5: sigma^2 + sd^2 = 1.25.
    c_skip, c_out, c_in, c_noise = edm_preconditioning(torch.tensor([1.0, math.e**2]), 0.5)
    assert c_skip[0].item() == pytest.approx(0.25 / 1.25)
    assert c_out[0].item() == pytest.approx(0.5 / math.sqrt(1.25))
    assert c_in[0].item() == pytest.approx(1 / math.sqrt(1.25))
    assert c_noise.tolist() == pytest.approx([0.0, 0.5])  # log(e^2) / 4
    assert edm_loss_weight(torch.tensor([1.0]), 0.5).item() == pytest.approx(1.25 / 0.25)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_pair_matches_the_edm_euler_scheduler_and_the_weighted_loss(prediction: str) -> None:
    from diffusers import EDMEulerScheduler

    config = load_config(DEMO, ["train.objective=edm", "train.snr_gamma=null"])
    sched = EDMEulerScheduler.from_config(edm_scheduler_config(config, prediction))
    x0, noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.randn(3, 4, 8, 8)
    pair = edm_pair(x0, noise, torch.Generator().manual_seed(5), -1.2, 1.2, 0.5, prediction)
    # The sigmas are exp(P_mean + P_std z) from the generator's first draws.
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(3, generator=torch.Generator().manual_seed(5)))
    x = x0 + sigma.view(-1, 1, 1, 1) * noise
    for i in range(3):
        assert torch.allclose(pair.noisy[i], sched.precondition_inputs(x[i], sigma[i]), atol=1e-6)
        assert pair.timesteps[i].item() == pytest.approx(sched.precondition_noise(sigma[i]).item(), abs=1e-6)
        # A model that outputs the target denoises exactly, through the scheduler's own output formula.
        assert torch.allclose(sched.precondition_outputs(x[i], pair.target[i], sigma[i]), x0[i], atol=1e-4)
    # Weight 1 on ||F - target||^2 is EDM's lambda(sigma) ||D - x0||^2 for any F.
    f = torch.randn_like(x0)
    for i in range(3):
        d = sched.precondition_outputs(x[i], f[i], sigma[i])
        edm = edm_loss_weight(sigma[i], 0.5) * (d - x0[i]).square().mean()
        assert ((f[i] - pair.target[i]).square().mean()).item() == pytest.approx(edm.item(), rel=1e-4)
    assert pair.weights is None


def test_edm_scheduler_export_config() -> None:
    config = load_config(DEMO, ["train.objective=edm", "train.snr_gamma=null", "train.edm.sigma_data=1.0"])
    sched = sampling_scheduler(config, {"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction"})
    assert type(sched).__name__ == "EDMEulerScheduler" and sched.config.sigma_data == 1.0
    assert sched.config.prediction_type == "v_prediction"


def _scheduler_folder(tmp_path, **extra) -> str:
    cfg = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
           "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon", **extra}
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


def test_zero_terminal_snr_matches_diffusers_and_needs_v(tmp_path) -> None:
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    from latentforge.train.families import adapter_for
    from latentforge.train.step import build_objective

    model = _scheduler_folder(tmp_path)
    config = load_config(DEMO, [f"model.pretrained={model}", "train.zero_terminal_snr=true",
                                "train.prediction_type=v_prediction"])
    objective = build_objective(config, adapter_for("sdxl"), torch.device("cpu"))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    expected = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0)
    assert torch.allclose(objective.alphas_cumprod, expected) and objective.alphas_cumprod[-1] == 0
    # Trailing timesteps at sampling: the first step starts from pure noise (t = 999).
    base = {"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "epsilon"}
    cfg = sampling_scheduler_config(config, base)
    assert cfg["_class_name"] == "DPMSolverMultistepScheduler" and cfg["timestep_spacing"] == "trailing"
    assert cfg["prediction_type"] == "v_prediction" and cfg["rescale_betas_zero_snr"]
    # A scheduler without rescaled betas (LMS) is replaced by Euler, which has both.
    assert sampling_scheduler_config(config, {"_class_name": "LMSDiscreteScheduler"})["_class_name"] == "EulerDiscreteScheduler"
    base = {"_class_name": "EulerDiscreteScheduler"}
    sched = sampling_scheduler(config, base)
    sched.set_timesteps(4)
    assert int(sched.timesteps[0]) == 999 and sched.config.rescale_betas_zero_snr
    eps = load_config(DEMO, [f"model.pretrained={model}", "train.zero_terminal_snr=true"])
    with pytest.raises(ConfigError, match=r"^train.zero_terminal_snr needs v-prediction .*prediction_type=v_prediction$"):
        build_objective(eps, adapter_for("sdxl"), torch.device("cpu"))


def test_input_perturbation_noises_the_input_not_the_target() -> None:
    from latentforge.train import objective as obj

    alphas = torch.linspace(0.99, 0.01, 1000)
    x0, noise, other = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    weights = torch.full((1000,), 1e-3)
    plain = obj.diffusion_pair(x0, noise, torch.Generator().manual_seed(0), alphas, weights, "epsilon", None)
    pert = obj.diffusion_pair(x0, noise, torch.Generator().manual_seed(0), alphas, weights, "epsilon", None,
                              input_noise=other)
    assert torch.equal(plain.target, pert.target) and torch.equal(pert.timesteps, plain.timesteps)
    assert torch.allclose(pert.noisy, obj.add_noise(x0, other, plain.timesteps, alphas))


@pytest.mark.parametrize("override", ["train.snr_gamma=5.0", "train.timestep_bias.strategy=later",
                                      "train.zero_terminal_snr=true", "train.objective=edm",
                                      "train.input_perturbation=0.1"])
def test_flow_family_refuses_ddpm_options_in_one_line(override: str) -> None:
    config = load_config(DEMO, ["model.family=sana", "train.snr_gamma=null", override])
    with pytest.raises(ConfigError) as err:
        check_objective_options(config, "flow")
    assert "\n" not in str(err.value) and "does not apply to sana" in str(err.value)
    check_objective_options(load_config(DEMO, ["model.family=sana", "train.snr_gamma=null"]), "flow")


def test_edm_refuses_min_snr_and_non_unet_families() -> None:
    with pytest.raises(ConfigError, match="train.snr_gamma does not apply with train.objective=edm"):
        check_objective_options(load_config(DEMO, ["train.objective=edm"]), "diffusion")
    pixart = load_config(DEMO, ["model.family=pixart_sigma", "train.objective=edm", "train.snr_gamma=null"])
    with pytest.raises(ConfigError, match="^train.objective=edm is for the UNet families"):
        check_objective_options(pixart, "diffusion", unet=False)


@pytest.mark.slow
def test_edm_trains_validates_and_exports_with_edm_euler(unet_only_model, small_cache, tiny_sdxl, tmp_path) -> None:
    from diffusers import StableDiffusionXLPipeline
    from test_train import FP32_ZERO, run_in_process, train_args

    from latentforge.train.export import export_pipeline

    out = tmp_path / "run"
    losses = run_in_process(train_args(unet_only_model, small_cache, out, "train.max_steps=2", "train.checkpoint_every=2",
                                       "train.objective=edm", "train.snr_gamma=null", "train.input_perturbation=0.1",
                                       "train.validation_every=2", "train.validation_inference_steps=2",
                                       "train.ema.enabled=false", FP32_ZERO % 0))
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert list((out / "validation").glob("step-*.png"))  # the grid was sampled with EDMEulerScheduler
    exported = export_pipeline(out / "checkpoints" / "step-00000002", tmp_path / "export", base=str(tiny_sdxl))
    pipe = StableDiffusionXLPipeline.from_pretrained(exported)
    assert type(pipe.scheduler).__name__ == "EDMEulerScheduler" and pipe.scheduler.config.sigma_data == 0.5
    image = pipe.to(torch.float32)("a cat", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
