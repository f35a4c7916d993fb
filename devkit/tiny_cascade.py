"""Tiny offline Stable Cascade: the Stage C prior pipeline, its EfficientNet encoder, and Stage B + A for validation.

Folder layout written by `build_stable_cascade(tmp_dir, seed)`:

    tmp_dir/                 StableCascadePriorPipeline (CLIP-bigG-shaped text encoder with projection, prior, scheduler)
    tmp_dir/effnet/          effnet_encoder.safetensors in the released layout (backbone.* + mapper.*) and an
                             effnet_config.json naming the tiny backbone's stages
    tmp_dir/decoder/         StableCascadeDecoderPipeline (Stage B decoder + Paella VQ model, Stage A)
    tmp_dir/controlnet_backbone.json   the tiny EfficientNet for a Stage C ControlNet
                             (`train.controlnet.backbone_config`; its prior has 4 ResBlocks, 0-3)

Real geometry, tiny widths: 16-channel Stage C latents at 1/32 of the image (five stride-2 EfficientNet stages),
a 4-channel Stage B latent, the VQ model's 4x. `resolution_multiple` 32 (the real 42.67 maps 24 latents to
1024 px) and `latent_dim_scale` 8 (real 10.67) keep the image sizes simple: 256 px -> 8x8 Stage C -> 64x64
Stage B -> 256 px decoded.
"""

from __future__ import annotations

import json
from pathlib import Path

from .clip_tokenizer import make_clip_tokenizer
from .tiny_families import _clip_encoder

# The tiny backbone: torchvision EfficientNet stages [kind, expand, kernel, stride, in, out, layers], stride 32 in all.
TINY_EFFNET = {"c_latent": 16, "last_channel": 64,
               "stages": [["fused", 1, 3, 1, 8, 8, 1], ["fused", 4, 3, 2, 8, 16, 1], ["fused", 4, 3, 2, 16, 16, 1],
                          ["mb", 4, 3, 2, 16, 32, 1], ["mb", 6, 3, 1, 32, 32, 1], ["mb", 6, 3, 2, 32, 48, 1]]}


# The ControlNet's backbone: the same tiny stages (stride 32, 64 channels out), for train.controlnet.backbone_config.
TINY_CONTROLNET_BACKBONE = {"last_channel": TINY_EFFNET["last_channel"], "stages": TINY_EFFNET["stages"]}
CONTROLNET_BACKBONE_NAME = "controlnet_backbone.json"


def _seeded(seed: int, offset: int) -> None:
    import torch

    torch.manual_seed(seed * 1000 + offset)


def save_tiny_effnet(folder: Path, seed: int) -> None:
    """A random tiny EfficientNet encoder in the released `effnet_encoder.safetensors` layout."""
    from safetensors.torch import save_file
    from torch import nn
    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

    _seeded(seed, 3)
    stages = [MBConvConfig(*s[1:], width_mult=1.0, depth_mult=1.0) if s[0] == "mb" else FusedMBConvConfig(*s[1:])
              for s in TINY_EFFNET["stages"]]
    encoder = nn.Module()
    encoder.backbone = EfficientNet(stages, dropout=0.0, last_channel=TINY_EFFNET["last_channel"]).features
    encoder.mapper = nn.Sequential(nn.Conv2d(TINY_EFFNET["last_channel"], TINY_EFFNET["c_latent"], 1, bias=False),
                                   nn.BatchNorm2d(TINY_EFFNET["c_latent"], affine=False))
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(folder / "effnet_encoder.safetensors"))
    (folder / "effnet_config.json").write_text(json.dumps(TINY_EFFNET, indent=2))


def build_stable_cascade(tmp_dir: Path, seed: int) -> None:
    """Tiny Stable Cascade (see the module docstring)."""
    from diffusers import (
        DDPMWuerstchenScheduler,
        StableCascadeDecoderPipeline,
        StableCascadePriorPipeline,
        StableCascadeUNet,
    )
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel

    tmp_dir = Path(tmp_dir)
    tokenizer = make_clip_tokenizer(pad_token="!")  # OpenCLIP bigG pads with "!", as SD 2.x
    width = 32
    _seeded(seed, 1)
    text_encoder = _clip_encoder(tokenizer, width, projection=True)
    _seeded(seed, 2)
    prior = StableCascadeUNet(in_channels=16, out_channels=16, conditioning_dim=32, block_out_channels=(32, 32),
                              num_attention_heads=(2, 2), down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1),
                              switch_level=(False,), clip_image_in_channels=768, clip_text_in_channels=width,
                              clip_text_pooled_in_channels=width, dropout=(0.1, 0.1))
    StableCascadePriorPipeline(tokenizer=tokenizer, text_encoder=text_encoder, prior=prior,
                               scheduler=DDPMWuerstchenScheduler(), resolution_multiple=32.0
                               ).save_pretrained(tmp_dir, safe_serialization=True)
    save_tiny_effnet(tmp_dir / "effnet", seed)
    (tmp_dir / CONTROLNET_BACKBONE_NAME).write_text(json.dumps(TINY_CONTROLNET_BACKBONE, indent=2))
    _seeded(seed, 4)
    decoder = StableCascadeUNet(in_channels=4, out_channels=4, conditioning_dim=32, block_out_channels=(16, 32),
                                num_attention_heads=(-1, 2), down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1),
                                down_blocks_repeat_mappers=(1, 1), up_blocks_repeat_mappers=(2, 2),
                                block_types_per_layer=(("SDCascadeResBlock", "SDCascadeTimestepBlock"),
                                                       ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock")),
                                switch_level=None, clip_text_pooled_in_channels=width, effnet_in_channels=16,
                                pixel_mapper_in_channels=3, dropout=(0.1, 0.1))
    _seeded(seed, 5)
    vqgan = PaellaVQModel(bottleneck_blocks=1, num_vq_embeddings=2, embed_dim=16)
    StableCascadeDecoderPipeline(decoder=decoder, tokenizer=tokenizer, text_encoder=text_encoder,
                                 scheduler=DDPMWuerstchenScheduler(), vqgan=vqgan, latent_dim_scale=8.0
                                 ).save_pretrained(tmp_dir / "decoder", safe_serialization=True)
