"""ControlNet training from cached control images, SD 1.x and SDXL, on CPU with the tiny models:
cache (canny / a sidecar map) -> train 2 DeepSpeed steps (UNet frozen) -> validation grid with the
control beside each output -> export a ControlNetModel -> diffusers' ControlNet pipeline, 2 steps."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from test_conditioning import write_sources

from latentforge.devkit.tiny_models import build_tiny_pipeline
from latentforge.preprocess.job import run_cache
from latentforge.shared.config import ConfigError, load_config
from latentforge.train import control_images as ci
from latentforge.train.export import export_pipeline
from latentforge.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
PIPELINES = {"sd1": "StableDiffusionControlNetPipeline", "sdxl": "StableDiffusionXLControlNetPipeline"}


def _config(family: str, model: Path, tmp: Path, kind: str, *extra: str):
    folder, tar_path = write_sources(tmp / "data")
    sources = f"data.sources=[{{type: folder, path: '{folder}'}}, {{type: webdataset, path: '{tar_path}'}}]"
    return load_config(DEMO, [
        f"model.family={family}", f"model.pretrained={model}", sources, f"cache.path={tmp / 'cache'}",
        "buckets.resolutions=[128]", "cache.flip=true", f"cache.conditioning.kind={kind}",
        "cache.conditioning.sidecar=pose", "cache.max_skip_fraction=0.9", f"train.output_dir={tmp / 'run'}",
        "train.max_steps=2", "train.checkpoint_every=2", "train.validation_every=2", "train.validation_inference_steps=2",
        "train.num_workers=0", "train.held_out_fraction=0.2", "train.caption_dropout=0.5", "train.controlnet.enabled=true",
        "train.controlnet.conditioning_scale=0.8", *extra])


ZERO3_EMA = ("deepspeed={zero_optimization: {stage: 3}, bf16: {enabled: true}}", "train.ema.enabled=true")


@pytest.mark.slow
@pytest.mark.parametrize(("family", "kind", "extra"), [("sdxl", "canny", ()), ("sd1", "sidecar", ()),
                                                       ("sd1", "inpaint", ZERO3_EMA)])
def test_controlnet_cache_train_export_infer(family, kind, extra, tmp_path):
    model = build_tiny_pipeline(family, tmp_path / f"tiny-{family}")
    config = _config(family, model, tmp_path, kind, *extra)
    assert run_cache(config) == 0
    unet_before = diffusers.UNet2DConditionModel.from_pretrained(model, subfolder="unet").state_dict()

    trainer = Trainer(config)
    trainable = {n for n, p in trainer.engine.module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("controlnet.") for n in trainable)  # the UNet stays frozen
    trainer.train()
    assert len(trainer.history) == 2 and all(np.isfinite(trainer.history))
    if not extra:  # (under ZeRO-3 the module holds only this rank's slices)
        unet_after = trainer.engine.module.unet.state_dict()
        assert all(torch.equal(unet_before[k].to(unet_after[k].dtype), unet_after[k]) for k in unet_before)
    grid = np.asarray(Image.open(tmp_path / "run" / "validation" / "step-00000002.png"))
    from latentforge.train.grid_labels import CAPTION_H

    # Rows: base (the UNet alone, outputs only), then current and ema (demo.yaml's EMA is on), each with the
    # control image above each output; every row under its prompt labels.
    assert grid.shape[0] == (CAPTION_H + 128) + 2 * (CAPTION_H + 2 * 128)
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["trainable_parameters"] == sum(getattr(p, "ds_numel", p.numel())
                                                  for p in trainer.engine.module.controlnet.parameters())

    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    out = export_pipeline(checkpoint, tmp_path / "export", dtype="fp32", use_ema=bool(extra))
    controlnet = diffusers.ControlNetModel.from_pretrained(out)
    assert json.loads((out / "latentforge_export.json").read_text())["conditioning"] == kind
    if not extra:
        trained = {k.removeprefix("controlnet."): v for k, v in trainer.engine.module.state_dict().items()
                   if k.startswith("controlnet.")}
        # bf16 training: the export holds the fp32 masters, within bf16 rounding of the module's weights.
        assert all(torch.allclose(v.float(), trained[k].float(), atol=1e-2, rtol=1e-2)
                   for k, v in controlnet.state_dict().items())
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(model, controlnet=controlnet).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    control = Image.new("RGB", (128, 128))
    images = pipe("a square", image=control, num_inference_steps=2, height=128, width=128, output_type="np",
                  controlnet_conditioning_scale=0.8, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 128, 128, 3) and np.isfinite(images).all()


@pytest.mark.parametrize(("family", "extra", "conditioning", "message"), [
    ("sdxl", [], None, "holds no control images; set cache.conditioning.kind"),
    ("sana", [], "canny", "ControlNet training supports sd1, sd2, sdxl, stable_cascade, not sana"),
    ("sd1", ["train.lora.enabled=true"], "canny", "train one or the other"),
    ("sdxl", ["train.controlnet.blocks=[0, 4]"], "canny", "blocks and backbone_config are for Stable Cascade")])
def test_what_cannot_train_a_controlnet_is_one_line(family, extra, conditioning, message):
    from types import SimpleNamespace

    from latentforge.train.controlnet import controlnet_adapter
    from latentforge.train.families import adapter_for

    config = load_config(DEMO, [f"model.family={family}", "train.controlnet.enabled=true", *extra])
    with pytest.raises(ConfigError, match=message) as err:
        controlnet_adapter(adapter_for(family), config, SimpleNamespace(conditioning=conditioning), "CACHE")
    assert "\n" not in str(err.value)


# ---- control images at train time (pure functions) ------------------------------------------------------
def test_degrade_is_an_area_average_enlarged_back():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    small = torch.tensor([[2.5, 4.5], [10.5, 12.5]])  # 2x2 block means, by hand
    out = ci.degrade(x, 2)
    assert out.shape == x.shape
    want = torch.nn.functional.interpolate(small[None, None], size=(4, 4), mode="bilinear", align_corners=False)
    assert torch.allclose(out, want)
    assert ci.degrade(x, 1) is x
    assert torch.allclose(ci.degrade(torch.full((1, 3, 8, 8), 0.3), 4), torch.full((1, 3, 8, 8), 0.3))


def test_canny_maps_become_three_channel_unit_images():
    edges = torch.tensor([[[[0, 255], [255, 0]]]], dtype=torch.uint8)
    out = ci.control_input("canny", edges, torch.Generator().manual_seed(0), 4)
    assert out.shape == (1, 3, 2, 2) and torch.equal(out[0, 0], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_inpaint_masks_are_seeded_new_per_draw_and_of_every_shape():
    masks = ci.draw_masks(60, 64, 96, torch.Generator().manual_seed(3))
    assert masks.shape == (60, 1, 64, 96) and masks.dtype == torch.bool
    assert torch.equal(masks, ci.draw_masks(60, 64, 96, torch.Generator().manual_seed(3)))  # same seed, same masks
    assert not torch.equal(masks, ci.draw_masks(60, 64, 96, torch.Generator().manual_seed(4)))
    cover = masks.float().mean(dim=(1, 2, 3))
    assert (cover > 0).all() and (cover < 1).all()  # never nothing, never everything
    border = masks[:, 0, 0, :].any(1) | masks[:, 0, -1, :].any(1) | masks[:, 0, :, 0].any(1) | masks[:, 0, :, -1].any(1)
    assert border.sum() >= 10 and (~border).sum() >= 10  # outpainting borders and inner rectangles / strokes
    crop = torch.full((2, 3, 64, 96), 200, dtype=torch.uint8)
    control = ci.control_input("inpaint", crop, torch.Generator().manual_seed(3), 4)
    again = ci.draw_masks(2, 64, 96, torch.Generator().manual_seed(3))
    assert torch.equal(control == ci.MASKED, again.expand(-1, 3, -1, -1))
    assert torch.allclose(control[~again.expand(-1, 3, -1, -1)], torch.tensor(200 / 255))


@pytest.mark.slow
def test_controlnet_resume_is_exact(tmp_path):
    """Checkpoints hold the ControlNet alone (the UNet comes back from the base model); a run stopped at
    step 2 and resumed logs the losses of an uninterrupted one (degraded `image` controls, EMA on)."""
    model = build_tiny_pipeline("sd1", tmp_path / "tiny-sd1")
    config = _config("sd1", model, tmp_path, "image", "train.max_steps=4", "train.checkpoint_every=2",
                     "train.validation_every=0", "train.ema.enabled=true")
    assert run_cache(config) == 0

    def with_train(**kw):
        return config.model_copy(update={"train": config.train.model_copy(update=kw)})

    full = Trainer(config)
    full.train()
    first = Trainer(with_train(output_dir=str(tmp_path / "split")))
    first.train(until=2)
    second = Trainer(with_train(output_dir=str(tmp_path / "split"), resume="latest"))
    second.train()
    assert first.history + second.history == full.history
