"""The real SDXL base 1.0 component configs (stabilityai/stable-diffusion-xl-base-1.0) and the per-sample
FLOP counts they imply.

The configs are the ones the project ships in `devkit/real-configs/sdxl/` (one copy, also used by the
real-size tests); the dicts below are those files as constructor arguments, so the benchmarks need no
download.

`sdxl_flops()` builds every component on the meta device (no memory, no weights) and counts FLOPs with
`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention): the UNet forward+backward
on one 128x128 latent, the VAE encoder on one 1024x1024 image and both CLIP text encoders on one
77-token prompt. Their ratio is what `bench.caching_speedup` scales its tiny models to.
"""

from __future__ import annotations

from typing import Any

from latentforge.devkit import real_sizes

# unet/config.json (2,567,463,684 parameters).
UNET: dict[str, Any] = real_sizes.init_kwargs(real_sizes.read_json("sdxl", "unet/config.json"))
# vae/config.json (encoder + quant_conv: 34,163,664 parameters).
VAE: dict[str, Any] = real_sizes.init_kwargs(real_sizes.read_json("sdxl", "vae/config.json"))
# text_encoder/config.json: CLIP ViT-L/14 text tower (123,060,480 parameters).
TEXT_ENCODER: dict[str, Any] = real_sizes.init_kwargs(real_sizes.read_json("sdxl", "text_encoder/config.json"))
# text_encoder_2/config.json: OpenCLIP ViT-bigG/14 text tower with projection (694,659,840 parameters).
TEXT_ENCODER_2: dict[str, Any] = real_sizes.init_kwargs(real_sizes.read_json("sdxl", "text_encoder_2/config.json"))
# Measured with sdxl_flops() (diffusers 0.42.1, torch 2.14.1); used where counting is skipped (smoke runs).
REFERENCE_FLOPS = {"unet_fwd_bwd": 20.2308e12, "vae_encode": 4.8790e12, "text_encoders": 0.1112e12}


def build(component: str, device: str = "meta") -> Any:
    """One SDXL component with random (or, on meta, no) weights: unet, vae, text_encoder, text_encoder_2."""
    if component not in ("unet", "vae", "text_encoder", "text_encoder_2"):
        raise ValueError(f"unknown SDXL component {component!r}")
    return real_sizes.build_component("sdxl", component, device)


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
