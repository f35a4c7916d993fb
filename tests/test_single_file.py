"""Single-file (ComfyUI / AUTOMATIC1111 layout) export: round trips through diffusers' `from_single_file`,
the real SDXL and SD 1.x key layouts (on meta tensors), and the export from a trained checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from latentforge.app.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _file(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """key -> dtype, and the metadata, of a .safetensors file."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}, f.metadata()


def _assert_same_fp16(loaded: torch.nn.Module, reference: torch.nn.Module) -> None:
    """The loaded weights are exactly the reference's rounded to fp16 (the file's precision)."""
    a, b = loaded.state_dict(), reference.state_dict()
    assert set(a) == set(b), set(a) ^ set(b)
    for key, value in b.items():
        assert torch.equal(a[key].float(), value.half().float()), key


def test_sdxl_pipeline_round_trips_through_from_single_file(tiny_sdxl, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    full, unet_only = tmp_path / "full.safetensors", tmp_path / "unet.safetensors"
    assert main(["export", str(tiny_sdxl), "--out", str(full), "--single-file", "--with-vae", "--with-text-encoders"]) == 0
    assert main(["export", str(tiny_sdxl), "--out", str(unet_only), "--single-file"]) == 0
    assert "UNet + VAE + text encoders, fp16" in capsys.readouterr().out
    keys, meta = _file(full)
    assert set(keys.values()) == {"F16"}
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base" and meta["latentforge.family"] == "sdxl"
    parts = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.",
             "conditioner.embedders.1.model.")
    assert all(sum(k.startswith(p) for p in parts) == 1 for k in keys) and all(any(k.startswith(p) for k in keys) for p in parts)
    assert "conditioner.embedders.1.model.text_projection" in keys
    unet_keys, unet_meta = _file(unet_only)
    assert all(k.startswith("model.diffusion_model.") for k in unet_keys) and unet_meta["latentforge.components"] == "unet"
    assert set(unet_keys) == {k for k in keys if k.startswith("model.diffusion_model.")}

    reference = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe = StableDiffusionXLPipeline.from_single_file(str(full), config=str(tiny_sdxl), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_fp16(getattr(pipe, name), getattr(reference, name))
    unet = UNet2DConditionModel.from_single_file(str(unet_only), config=str(tiny_sdxl), subfolder="unet",
                                                 local_files_only=True)
    _assert_same_fp16(unet, reference.unet)
    image = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_sd1_pipeline_round_trips(tiny_sdxl, tmp_path):
    """SD 1.x: one CLIP encoder under cond_stage_model, attention in the outer blocks, 2 layers per block."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    base = _tiny_components(tiny_sdxl)  # VAE, first text encoder, tokenizer, scheduler
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=base["text_encoder"].config.hidden_size, attention_head_dim=4)
    sd1 = StableDiffusionPipeline(vae=base["vae"], text_encoder=base["text_encoder"], tokenizer=base["tokenizer"],
                                  unet=unet, scheduler=base["scheduler"], safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
    folder = tmp_path / "tiny-sd1"
    sd1.save_pretrained(folder)
    out = tmp_path / "sd1.safetensors"
    assert main(["export", str(folder), "--out", str(out), "--single-file", "--with-vae", "--with-text-encoders"]) == 0
    keys, meta = _file(out)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in keys  # up block 0 has no attention: .1
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_fp16(getattr(loaded, name), getattr(sd1, name))


def _tiny_components(folder: Path) -> dict:
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(folder).components


SDXL_UNET = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
                 cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SD1_UNET = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8, cross_attention_dim=768)
# Keys every original checkpoint of the family has (as published by Stability AI / RunwayML), and the
# number of UNet tensors in it.
KNOWN_KEYS = {
    "sdxl": (1680, "xl_base", ["model.diffusion_model.input_blocks.4.0.skip_connection.weight",
                               "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight",
                               "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight",
                               "model.diffusion_model.output_blocks.2.2.conv.weight",
                               "model.diffusion_model.output_blocks.5.2.conv.weight",
                               "model.diffusion_model.label_emb.0.0.weight",
                               "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.bias",
                               "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
                               "conditioner.embedders.1.model.ln_final.weight"]),
    "sd1": (686, "v1", ["model.diffusion_model.output_blocks.11.0.skip_connection.weight",
                        "model.diffusion_model.output_blocks.2.1.conv.weight",
                        "model.diffusion_model.output_blocks.8.2.conv.weight",
                        "model.diffusion_model.input_blocks.9.0.op.weight",
                        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]),
}


@pytest.mark.parametrize("family", ["sdxl", "sd1"])
def test_real_geometry_gives_the_published_layout(family):
    """Full-size models on the meta device (no memory): the published key names, and diffusers reads them back."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from latentforge.train.single_file import assemble

    def clip(width: int, layers: int, heads: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                              num_attention_heads=heads, projection_dim=width, hidden_act=act)

    with torch.device("meta"):
        unet = UNet2DConditionModel(**(SDXL_UNET if family == "sdxl" else SD1_UNET))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        encoders = [CLIPTextModel(clip(768, 12, 12, "quick_gelu"))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(clip(1280, 32, 20, "gelu")))
    state = assemble(family, unet.state_dict(), unet.config, vae=(vae.state_dict(), vae.config),
                     text_encoders=tuple(e.state_dict() for e in encoders), text_hidden_size_2=1280)
    unet_tensors, model_type, known = KNOWN_KEYS[family]
    assert sum(k.startswith("model.diffusion_model.") for k in state) == unet_tensors
    assert sum(k.startswith("first_stage_model.") for k in state) == 248
    assert [k for k in known if k not in state] == []
    assert state["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert infer_diffusers_model_type(state) == model_type
    if family == "sdxl":
        assert state["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)


def test_trained_checkpoint_exports_to_a_single_file(tiny_sdxl, small_cache, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from latentforge.shared.config import load_config
    from latentforge.train.export import export_pipeline
    from latentforge.train.trainer import Trainer

    run = tmp_path / "run"
    Trainer(load_config(ROOT / "configs" / "demo.yaml", [
        f"model.pretrained={tiny_sdxl}", f"cache.path={small_cache}", f"train.output_dir={run}", "train.num_workers=0",
        "train.validation_every=0", "train.held_out_fraction=0", "train.micro_batch_size=2", "train.max_steps=2",
        "train.checkpoint_every=2", "deepspeed={zero_optimization: {stage: 0}, bf16: {enabled: false}}"])).train()
    out = tmp_path / "model.safetensors"
    assert main(["export", str(run), "--out", str(out), "--single-file"]) == 0  # run folder: newest checkpoint
    assert "trained weights; UNet, fp16" in capsys.readouterr().out
    keys, meta = _file(out)
    assert set(keys.values()) == {"F16"} and '"step": 2' in meta["latentforge.export"]

    ckpt = run / "checkpoints" / "step-00000002"
    folder = export_pipeline(ckpt, tmp_path / "diffusers")
    exported = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    loaded = UNet2DConditionModel.from_single_file(str(out), config=str(folder), subfolder="unet", local_files_only=True)
    a, b = loaded.state_dict(), exported.state_dict()
    assert set(a) == set(b)
    for key, value in b.items():  # both are the trained fp32 weights rounded to fp16
        assert torch.equal(a[key].float(), value.float()), key
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet").state_dict()
    assert any(not torch.equal(a[k].float(), base[k].half().float()) for k in base), "the file holds untrained weights"

    assert main(["export", str(ckpt), "--out", str(tmp_path / "x"), "--with-vae"]) == 2  # needs --single-file
    assert main(["export", str(ckpt), "--out", str(tmp_path / "x.ckpt"), "--single-file"]) == 2
    assert "one .safetensors file" in capsys.readouterr().err
    shutil.rmtree(run)
