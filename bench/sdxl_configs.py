"""The real SDXL base 1.0 component configs (stabilityai/stable-diffusion-xl-base-1.0), written out so the
benchmarks need no download, and the per-sample FLOP counts they imply.

`sdxl_flops()` builds every component on the meta device (no memory, no weights) and counts FLOPs with
`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention): the UNet forward+backward
on one 128x128 latent, the VAE encoder on one 1024x1024 image and both CLIP text encoders on one
77-token prompt. Their ratio is what `bench.caching_speedup` scales its tiny models to.
"""

from __future__ import annotations

from typing import Any

# unet/config.json (2,567,463,684 parameters).
UNET: dict[str, Any] = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
# vae/config.json (encoder + quant_conv: 34,163,664 parameters).
VAE: dict[str, Any] = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True,
}
# text_encoder/config.json: CLIP ViT-L/14 text tower (123,060,480 parameters).
TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
# text_encoder_2/config.json: OpenCLIP ViT-bigG/14 text tower with projection (694,659,840 parameters).
TEXT_ENCODER_2: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
# Measured with sdxl_flops() (diffusers 0.42.1, torch 2.14.1); used where counting is skipped (smoke runs).
REFERENCE_FLOPS = {"unet_fwd_bwd": 20.2308e12, "vae_encode": 4.8790e12, "text_encoders": 0.1112e12}


def build(component: str, device: str = "meta") -> Any:
    """One SDXL component with random (or, on meta, no) weights: unet, vae, text_encoder, text_encoder_2."""
    import torch

    with torch.device(device):
        if component == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel(**UNET)
        if component == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL(**VAE)
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        if component == "text_encoder":
            return CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER))
        if component == "text_encoder_2":
            return CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2))
    raise ValueError(f"unknown SDXL component {component!r}")


def sdxl_flops() -> dict[str, float]:
    """Per-sample FLOPs of SDXL at 1024x1024: UNet forward+backward, VAE encode, both text encoders."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    meta = {"device": "meta"}
    unet, vae = build("unet"), build("vae")
    te1, te2 = build("text_encoder"), build("text_encoder_2")

    def count(fn: Any) -> float:
        with FlopCounterMode(display=False) as fc:
            fn()
        return float(fc.get_total_flops())

    def unet_step() -> None:
        out = unet(torch.randn(1, 4, 128, 128, **meta), torch.tensor([500], **meta),
                   encoder_hidden_states=torch.randn(1, 77, 2048, **meta),
                   added_cond_kwargs={"text_embeds": torch.randn(1, 1280, **meta), "time_ids": torch.randn(1, 6, **meta)}).sample
        out.float().pow(2).mean().backward()

    def vae_encode() -> None:
        with torch.no_grad():
            vae.encode(torch.randn(1, 3, 1024, 1024, **meta))

    ids = torch.zeros(1, 77, dtype=torch.long, **meta)

    def text() -> None:
        with torch.no_grad():
            te1(ids, output_hidden_states=True)
            te2(ids, output_hidden_states=True)

    return {"unet_fwd_bwd": count(unet_step), "vae_encode": count(vae_encode), "text_encoders": count(text)}


def encode_to_train_ratio(flops: dict[str, float]) -> float:
    """(VAE encode + text encoders) / (UNet forward + backward), per sample."""
    return (flops["vae_encode"] + flops["text_encoders"]) / flops["unet_fwd_bwd"]
